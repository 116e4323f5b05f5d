"""The run's package pins what init.sh installs to the controller's versions (constraints.txt)."""

import importlib.metadata
import io
import re
import shutil
import tarfile
from pathlib import Path

from cflow.package import CONSTRAINTS_NAME, WORKER_PACKAGES, build_package, worker_constraints

REPO = Path(__file__).resolve().parents[2]


def pins_of(text):
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_package_carries_the_controllers_versions(tmp_path):
    for name in ("init.sh", "startup-signal.py", "shutdown-signal.py"):
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.sh").write_text("echo hi\n")
    with tarfile.open(fileobj=io.BytesIO(build_package(tmp_path))) as archive:
        pins = pins_of(archive.extractfile(CONSTRAINTS_NAME).read().decode())
    # What init.sh installs, and what they need (grpcio through google-api-core[grpc]), each at the controller's version.
    for name in (*WORKER_PACKAGES, "google-api-core", "grpcio", "protobuf"):
        assert pins[name] == importlib.metadata.version(name), name


def test_the_workers_wheelhouse_is_made_from_the_same_pins():
    # init.sh installs from the run's wheelhouse (cflow.wheelhouse), downloaded at the versions constraints.txt lists.
    from cflow.wheelhouse import WheelhouseSpec

    spec = WheelhouseSpec.for_this_controller()
    assert spec.packages == WORKER_PACKAGES
    assert pins_of(spec.constraints_text()) == pins_of(worker_constraints())


class FakeDistribution:
    def __init__(self, name, version, requires=()):
        self.metadata = {"Name": name}
        self.version = version
        self.requires = list(requires)


def test_requirements_are_followed_through_extras_only_when_asked():
    installed = {
        "top": FakeDistribution("top", "1.0", ["core[grpc]>=1", "Helper_Lib; python_version >= '3'", "docs-tool; extra == 'docs'", "absent>=2"]),
        "core": FakeDistribution("core", "2.5+local.7", ["grpc-thing; extra == \"grpc\"", "other-extra-only; extra == 'async'"]),
        "grpc-thing": FakeDistribution("grpc-thing", "1.85.3"),
        "helper-lib": FakeDistribution("Helper_Lib", "0.3"),
        "docs-tool": FakeDistribution("docs-tool", "9"),
        "other-extra-only": FakeDistribution("other-extra-only", "1"),
    }

    def distribution(name):
        try:
            return installed[re.sub(r"[-_.]+", "-", name).lower()]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    text = worker_constraints(["top"], distribution)
    assert text.startswith("#")
    # the extra asked for is followed, the others are not; a local label is dropped; a missing package stays unpinned
    assert pins_of(text) == {"top": "1.0", "core": "2.5", "grpc-thing": "1.85.3", "helper-lib": "0.3"}
