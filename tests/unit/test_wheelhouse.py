"""The stock workers' wheelhouse (cflow.wheelhouse): what goes in, one archive per set of versions, cached, published once."""

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cflow import fleet, wheelhouse
from cflow.config import load_config
from cflow.gcp import layout
from cflow.package import WORKER_PACKAGES
from cflow.wheelhouse import (
    DEBIAN_12,
    BuiltWheelhouse,
    PipDownloader,
    WheelhouseCache,
    WheelhouseError,
    WheelhouseRef,
    WheelhouseSpec,
    write_archive,
)

REPO = Path(__file__).resolve().parents[2]
# A real wheel's name longer than a plain tar header holds.
LONG_WHEEL = "charset_normalizer-3.4.7-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
WHEELS = {
    "pip-26.3-py3-none-any.whl": b"pip",
    "google_auth-2.63.0-py3-none-any.whl": b"auth",
    LONG_WHEEL: b"charset",
}
SPEC = WheelhouseSpec(packages=("google-auth",), pins=("google-auth==2.63.0",))


def fake_download(wheels=WHEELS, calls=None):
    def download(spec, dest, log_path):
        if calls is not None:
            calls.append(spec)
        for name, content in wheels.items():
            (dest / name).write_bytes(content)
        log_path.write_text("downloaded\n")

    return download


def test_the_spec_is_this_controllers_worker_packages_at_its_versions_for_debian_12():
    spec = WheelhouseSpec.for_this_controller()
    assert spec.packages == WORKER_PACKAGES and spec.platform == DEBIAN_12
    pins = dict(pin.split("==") for pin in spec.pins)
    assert pins["google-cloud-pubsub"] == importlib.metadata.version("google-cloud-pubsub")
    assert all(not pin.startswith("#") for pin in spec.pins)


def test_the_key_follows_the_versions_and_the_platform_only():
    same = WheelhouseSpec(packages=("google-auth",), pins=("google-auth==2.63.0",))
    assert SPEC.key == same.key and len(SPEC.key) == 16
    assert dataclasses.replace(SPEC, pins=("google-auth==2.64.0",)).key != SPEC.key
    assert dataclasses.replace(SPEC, platform=dataclasses.replace(DEBIAN_12, python_version="3.12")).key != SPEC.key
    assert dataclasses.replace(SPEC, installer="pip==25.0").key != SPEC.key


def test_pip_is_told_the_workers_python_and_binary_wheels_only():
    arguments = DEBIAN_12.pip_arguments()
    assert arguments[:7] == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    platforms = arguments[8::2]
    # glibc 2.36 is Debian 12's: the newest manylinux tag first, so pip prefers it.
    assert platforms[0] == "manylinux_2_36_x86_64" and "manylinux_2_37_x86_64" not in platforms
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(platforms)


def members(path):
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def test_the_archive_holds_the_requirements_the_wheels_and_pip_and_its_bytes_depend_on_the_wheels_only(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, names in ((first, list(WHEELS)), (second, list(reversed(WHEELS)))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(WHEELS[name])
    os.utime(second / LONG_WHEEL, (1, 1))  # another download's file times

    write_archive(first, tmp_path / "a.tar")
    write_archive(second, tmp_path / "b.tar")

    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    content = members(tmp_path / "a.tar")
    assert content == {
        "requirements.txt": b"charset_normalizer==3.4.7\ngoogle_auth==2.63.0\n",
        "pip.whl": b"pip",
        "wheels/google_auth-2.63.0-py3-none-any.whl": b"auth",
        f"wheels/{LONG_WHEEL}": b"charset",
    }


def test_an_archive_without_exactly_one_pip_wheel_or_with_other_files_is_refused(tmp_path):
    (tmp_path / "google_auth-2.63.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(WheelhouseError, match="0 pip wheels"):
        write_archive(tmp_path, tmp_path.parent / "x.tar")
    (tmp_path / "pip-26.3-py3-none-any.whl").write_bytes(b"pip")
    (tmp_path / "notes.txt").write_text("?")
    with pytest.raises(WheelhouseError, match=r"notes\.txt is not a wheel's file name"):
        write_archive(tmp_path, tmp_path.parent / "x.tar")


def test_the_cache_downloads_once_per_spec(tmp_path):
    calls = []
    cache = WheelhouseCache(tmp_path, download=fake_download(calls=calls), say=lambda line: None)

    built = cache.ensure(SPEC)
    again = WheelhouseCache(tmp_path, download=fake_download(calls=calls)).ensure(SPEC)

    assert calls == [SPEC]
    assert built == again and built.path == tmp_path / SPEC.key / "wheelhouse.tar"
    assert built.sha256 == hashlib.sha256(built.path.read_bytes()).hexdigest() and built.size == built.path.stat().st_size
    # The wheels are in the archive: they are not kept beside it, and nothing is left half-made.
    assert not (built.path.parent / "wheels").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [SPEC.key, f"{SPEC.key}.lock", f"{SPEC.key}.log"]


def test_a_failed_download_leaves_nothing_that_looks_ready(tmp_path):
    def failing(spec, dest, log_path):
        (dest / "google_auth-2.63.0-py3-none-any.whl").write_bytes(b"half")
        raise WheelhouseError("no wheel of x")

    # What a killed download left behind is cleared first.
    (tmp_path / f"{SPEC.key}.partial").mkdir(parents=True)
    (tmp_path / f"{SPEC.key}.partial" / "junk").write_text("old")
    with pytest.raises(WheelhouseError, match="no wheel of x"):
        WheelhouseCache(tmp_path, download=failing, say=lambda line: None).ensure(SPEC)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{SPEC.key}.lock"]

    built = WheelhouseCache(tmp_path, download=fake_download(), say=lambda line: None).ensure(SPEC)
    assert built.path.is_file()


def completed(returncode):
    return subprocess.CompletedProcess([], returncode)


def pip_run(returncode, output, commands=None):
    def run(command, stdout, **options):
        if commands is not None:
            commands.append(command)
        stdout.write(output.encode())
        return completed(returncode)

    return run


def test_pip_download_gets_the_pinned_packages_and_pip_for_the_workers_platform(tmp_path):
    commands = []
    (tmp_path / "wheels").mkdir()
    PipDownloader(run=pip_run(0, "Successfully downloaded", commands))(SPEC, tmp_path / "wheels", tmp_path / "pip.log")
    (command,) = commands
    assert command[1:4] == ["-m", "pip", "download"]
    assert command[command.index("--dest") + 1] == str(tmp_path / "wheels")
    assert (tmp_path / "constraints.txt").read_text() == "google-auth==2.63.0\n"
    assert command[-2:] == ["google-auth", wheelhouse.INSTALLER] and "--only-binary=:all:" in command


def test_a_package_with_no_wheel_for_the_workers_fails_in_one_line_naming_it(tmp_path):
    (tmp_path / "wheels").mkdir()
    output = (
        "ERROR: Could not find a version that satisfies the requirement grpcio==0.1 (from versions: none)\n"
        "ERROR: No matching distribution found for grpcio==0.1\n"
    )
    with pytest.raises(WheelhouseError) as caught:
        PipDownloader(run=pip_run(1, output))(SPEC, tmp_path / "wheels", tmp_path / "pip.log")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("no wheel of grpcio==0.1 for the workers (Debian 12, CPython 3.11, x86_64)")
    assert str(tmp_path / "pip.log") in message


def test_an_unreachable_index_fails_in_one_line_with_pips_last_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    output = "WARNING: Retrying ...\nERROR: Could not install packages due to an OSError: connection refused\n"
    with pytest.raises(WheelhouseError) as caught:
        PipDownloader(run=pip_run(1, output))(SPEC, tmp_path / "wheels", tmp_path / "pip.log")
    assert "exit status 1: ERROR: Could not install packages due to an OSError: connection refused" in str(caught.value)
    assert "\n" not in str(caught.value)


class FakeBucket:
    bucket_name = "b"

    def __init__(self, present=False):
        self.present = present
        self.uploads = []

    def upload_wheelhouse(self, sha256, path):
        self.uploads.append((sha256, path))
        return not self.present

    def wheelhouse_url(self, sha256):
        return f"gs://b/{layout.wheelhouse(sha256)}"


def test_publish_uploads_only_what_the_bucket_lacks_and_names_it_by_its_sha256(tmp_path):
    built = BuiltWheelhouse(path=tmp_path / "w.tar", sha256="ab" * 32, size=2_000_000)
    said = []
    ref = wheelhouse.publish(FakeBucket(present=False), built, said.append)
    assert ref == WheelhouseRef(url=f"gs://b/cflow/wheelhouse/{'ab' * 32}.tar", sha256="ab" * 32)
    assert said == [f"uploaded the workers' wheelhouse (2.0 MB) to {ref.url}"]
    said.clear()
    assert wheelhouse.publish(FakeBucket(present=True), built, said.append) == ref and said == []


def test_the_object_name_is_only_ever_a_sha256():
    assert layout.wheelhouse("0f" * 32) == f"cflow/wheelhouse/{'0f' * 32}.tar"
    for bad in ("../x", "AB" * 32, "ab" * 31):
        with pytest.raises(ValueError):
            layout.wheelhouse(bad)


def config_with(tmp_path, **settings):
    lines = {"TASK_MODULE_CMD": "bash task/task.sh", "TASKS": ["a"], **settings}
    (tmp_path / "task").mkdir(exist_ok=True)
    (tmp_path / "task" / "task.sh").write_text("true\n")
    (tmp_path / "const.py").write_text("".join(f"{name} = {value!r}\n" for name, value in lines.items()))
    return load_config(str(tmp_path / "const.py"), {})


@pytest.mark.parametrize(
    "settings, vm_root, expected",
    [
        ({"TARGET": "gcp", "PROJECT_NAME": "my-project", "BUCKET": "my-bucket"}, None, True),
        ({"TARGET": "gcp", "PROJECT_NAME": "my-project", "BUCKET": "my-bucket", "VM_BOOT": "image", "VM_IMAGE_NAME": "family/f"}, None, False),
        ({"TARGET": "local"}, None, False),
        ({"TARGET": "local"}, "debian-12", True),
        ({"TARGET": "local", "VM_BOOT": "image", "VM_IMAGE_NAME": "family/f"}, "debian-12", False),
    ],
    ids=["gcp-stock", "gcp-image", "local-shared-python", "local-real-root", "local-real-root-image"],
)
def test_only_workers_that_install_at_boot_need_a_wheelhouse(tmp_path, settings, vm_root, expected):
    assert wheelhouse.needed(config_with(tmp_path, **settings), vm_root) is expected


def test_a_run_that_needs_none_makes_none_and_asks_no_service(tmp_path):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"{name} called")

    config = config_with(tmp_path, TARGET="local")
    assert wheelhouse.prepare_for_run(config, Untouchable(), None, cache=Untouchable()) is None


def test_the_workers_metadata_names_the_wheelhouse_and_its_sha256(tmp_path):
    config = config_with(tmp_path, TARGET="gcp", PROJECT_NAME="my-project", BUCKET="my-bucket")
    ref = WheelhouseRef(url="gs://b/cflow/wheelhouse/x.tar", sha256="cd" * 32)
    items = {item["key"]: item["value"] for item in fleet.worker_instance_properties(config, "r", "gs://b/p", "init", ref)["metadata"]["items"]}
    assert items["cflow-wheelhouse"] == ref.url and items["cflow-wheelhouse-sha256"] == "cd" * 32
    plain = fleet.worker_instance_properties(config, "r", "gs://b/p", "init")["metadata"]["items"]
    assert not [item for item in plain if item["key"].startswith("cflow-wheelhouse")]
    assert WheelhouseRef.from_dict(ref.to_dict()) == ref and WheelhouseRef.from_dict(None) is None


def test_init_sh_reads_the_names_the_controller_writes_and_installs_with_no_index():
    init = (REPO / "init.sh").read_text()
    assert f'attribute("{wheelhouse.METADATA_URL}")' in init and f'attribute("{wheelhouse.METADATA_SHA256}")' in init
    assert f'"$wheelhouse/{wheelhouse.ARCHIVE_INSTALLER}/pip" install --isolated --no-index' in init
    assert f'"$wheelhouse/{wheelhouse.ARCHIVE_WHEELS.rstrip("/")}" -r "$wheelhouse/{wheelhouse.ARCHIVE_REQUIREMENTS}"' in init
    # No apt-get and no index on the stock path any more (comments aside).
    code = [line for line in init.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "apt-get" in line or "pip install -q --disable-pip-version-check" in line]


def test_an_archive_member_never_leaves_its_folder(tmp_path):
    # init.sh extracts with tarfile's "data" filter; our archive has only plain relative members.
    folder = tmp_path / "w"
    folder.mkdir()
    for name, content in WHEELS.items():
        (folder / name).write_bytes(content)
    write_archive(folder, tmp_path / "w.tar")
    with tarfile.open(tmp_path / "w.tar") as archive:
        for member in archive.getmembers():
            assert member.isfile() and not member.name.startswith(("/", "..")) and member.mode == 0o644
            assert tarfile.data_filter(member, str(tmp_path)) is not None


def test_the_image_build_vm_reads_the_same_wheelhouse_with_read_only_storage():
    from cflow.image import BUILD_SCOPES, build_script, build_vm_body

    ref = WheelhouseRef(url="gs://my-bucket/cflow/wheelhouse/x.tar", sha256="ef" * 32)
    body = build_vm_body("b", "us-central1-a", "img", 10, {}, "script", ref, "workers@p.iam.gserviceaccount.com")
    items = {item["key"]: item["value"] for item in body["metadata"]["items"]}
    assert items["cflow-wheelhouse"] == ref.url and items["cflow-wheelhouse-sha256"] == ref.sha256
    assert body["serviceAccounts"] == [{"email": "workers@p.iam.gserviceaccount.com", "scopes": list(BUILD_SCOPES)}]
    assert BUILD_SCOPES == ("https://www.googleapis.com/auth/devstorage.read_only",)
    # An emulated build VM uses this machine's packages: no wheelhouse, no account.
    assert "serviceAccounts" not in build_vm_body("b", "us-central1-a", "img", 10, {}, "script")
    script = build_script("#!/bin/bash\necho init\n")
    assert 'CFLOW_INIT_INSTALL_ONLY=1 bash "$ROOT/opt/cflow/init.sh"' in script and "apt-get" not in script
