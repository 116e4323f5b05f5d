"""cflow.config: const.py -> Config, defaults, overrides, and every validation error."""

import ast
import dataclasses
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cflow import zones
from cflow.config import DEFAULTS, SETTINGS, Config, load_config
from cflow.errors import CflowError, ConfigError
from cflow.local import LOCAL_PROJECT
from cflow.zones import KNOWN_ZONES

REPO = Path(__file__).resolve().parents[2]


class Project:
    """A user's folder (``dir``); calling it writes const.py there and returns its path."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder

    def __call__(self, body: str = "") -> Path:
        path = self.dir / "const.py"
        path.write_text(textwrap.dedent(body))
        return path


@pytest.fixture
def project(tmp_path):
    """A user's folder with a runnable task script and a tasks file."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.sh").write_text("#!/bin/bash\necho \"$@\"\n")
    (tmp_path / "tasks.txt").write_text("a.csv\nb.csv\n")
    return Project(tmp_path)


def config_error(path, overrides=None):
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message


def test_empty_const_gives_the_defaults(project):
    config = load_config(project(""))
    assert config.target == "local"
    assert config.worker_node_cnt == 5
    assert config.vm_name_prefix == "cflow-worker"
    assert config.vm_type == "e2-standard-2"
    assert config.vm_zone == "us-central1-a"
    assert config.vm_compute_service_account == "default"
    assert config.task_module_cmd == ("bash", "task/task.sh")
    assert config.tasks == "tasks.txt"
    assert config.tasks_kind == "file"
    assert config.tasks_file == project.dir / "tasks.txt"
    assert config.max_attempts == 3
    assert config.task_timeout == 3600
    assert config.combine == "concat"
    assert config.vm_spot is True
    assert config.vm_boot == "stock"
    assert config.vm_stock_image == "projects/debian-cloud/global/images/family/debian-12"
    assert config.vm_disk_gb == 10
    assert config.lease_seconds == 60
    assert config.credential_file is None
    assert config.project == LOCAL_PROJECT
    assert config.bucket == f"{LOCAL_PROJECT}-cflow"
    assert config.base_dir == project.dir
    assert config.config_path == project.dir / "const.py"
    assert config.result_dir == project.dir / "output"
    assert config.zones[0] == "us-central1-a"


def test_shipped_const_py_sets_exactly_the_declared_settings_and_defaults(project):
    shutil.copy(REPO / "const.py", project.dir / "const.py")
    namespace: dict[str, Any] = {}
    exec((REPO / "const.py").read_text(), namespace)
    shipped = {name: value for name, value in namespace.items() if name.isupper()}
    assert list(shipped) == [setting.name for setting in SETTINGS]  # same names, in the order they are checked
    assert shipped == {setting.name: setting.default for setting in SETTINGS}
    assert shipped == DEFAULTS
    config = load_config(project.dir / "const.py")
    assert config.hourly_price() == DEFAULTS["PRICES"]["e2-standard-2"]["spot"]


def test_shipped_const_py_comments_every_setting():
    """Each assignment sits in a block of lines (no blank line between) that has a comment."""
    lines = (REPO / "const.py").read_text().splitlines()
    for statement in ast.parse("\n".join(lines)).body:
        assert isinstance(statement, ast.Assign), ast.dump(statement)
        row = statement.lineno - 1
        while row > 0 and lines[row - 1].strip() and not lines[row - 1].lstrip().startswith("#"):
            row -= 1
        name = statement.targets[0].id if isinstance(statement.targets[0], ast.Name) else "?"
        assert row > 0 and lines[row - 1].lstrip().startswith("#"), f"{name} in const.py has no comment above it"


def test_every_setting_is_declared_once_with_one_line_of_help():
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.name.isupper() and setting.attribute == setting.name.lower()
        assert setting.help.strip() and "\n" not in setting.help, setting.name
        assert callable(setting.check), setting.name
    config_fields = [field.name for field in dataclasses.fields(Config)]
    assert config_fields == [setting.attribute for setting in SETTINGS] + ["config_path", "base_dir"]


def test_shipped_tasks_txt_holds_the_125_demo_shards():
    from cflow.demo_data import make_shards
    from cflow.tasks import parse_tasks_text

    items = parse_tasks_text((REPO / "tasks.txt").read_text())
    assert items == [[name] for name in make_shards(count=125, rows=1)]
    assert items[0] == ["shards/part-000.csv"] and items[-1] == ["shards/part-124.csv"]


def test_values_in_const_py_are_used(project):
    path = project(
        """
        import os
        _HELPER = 7  # private helper names are allowed
        WORKER_NODE_CNT = _HELPER * 2
        TARGET = "gcp"
        PROJECT_NAME = "my-project-123"
        BUCKET = "my.bucket_name-1"
        VM_ZONE = "me-west9-z"  # unknown but well-formed: allowed on GCP
        VM_FALLBACK_ZONES = ("us-east1-b",)
        VM_SPOT = False
        VM_LABELS = {"team": "research"}
        TASK_MODULE_CMD = ["python3", "-u", "task/run.py", "--flag"]
        TASKS = ["a 'b c'", ["d e", "f"]]
        PRICES = {"e2-micro": {"standard": 1, "spot": 0.5}}
        VM_TYPE = "e2-micro"
        """
    )
    (project.dir / "task" / "run.py").write_text("print(1)\n")
    config = load_config(path)
    assert config.worker_node_cnt == 14
    assert config.project == "my-project-123"
    assert config.bucket == "my.bucket_name-1"
    assert config.zones == ("me-west9-z", "us-east1-b")
    assert config.task_module_cmd == ("python3", "-u", "task/run.py", "--flag")
    assert config.tasks == (("a", "b c"), ("d e", "f"))
    assert config.tasks_kind == "list" and config.tasks_file is None
    assert config.hourly_price() == 1
    assert config.hourly_price(spot=True) == 0.5
    assert config.hourly_price("n9-unknown") is None
    assert dict(config.vm_labels) == {"team": "research"}


def test_config_is_frozen_and_its_mappings_read_only(project):
    config = load_config(project("VM_LABELS = {'a': 'b'}\n"))
    # Each write below is one mypy refuses too; the test shows it fails at run time as well.
    with pytest.raises(AttributeError):
        config.worker_node_cnt = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.vm_labels["x"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.prices["e2-micro"]["spot"] = 0  # type: ignore[index]


def test_overrides_win_and_are_checked(project):
    path = project("WORKER_NODE_CNT = 2\n")
    config = load_config(path, {"WORKER_NODE_CNT": 9, "MAX_ATTEMPTS": 1, "TARGET": None})
    assert config.worker_node_cnt == 9
    assert config.max_attempts == 1
    assert config.target == "local"  # None means the flag was not given
    other_tasks = project.dir / "other.txt"
    other_tasks.write_text("x\n")
    assert load_config(path, {"TASKS": str(other_tasks)}).tasks_file == other_tasks
    message = config_error(path, {"WORKER_NODE_CNT": 0})
    assert "WORKER_NODE_CNT (from the command line) must be a positive integer, got 0" in message
    message = config_error(path, {"WORKERS": 3})
    assert "WORKERS (from the command line) is not a CFlow setting" in message


def test_gcp_override_requires_a_project(project):
    message = config_error(project(""), {"TARGET": "gcp"})
    assert "PROJECT_NAME is not set" in message


def test_to_dict_is_json_safe_and_complete(project):
    (project.dir / "credential").mkdir()
    (project.dir / "credential" / "key.json").write_text("{}")
    config = load_config(project("CREDENTIAL_FILE = 'credential/key.json'\nVM_LABELS = {'a': 'b'}\n"))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["worker_node_cnt"] == 5
    assert data["task_module_cmd"] == ["bash", "task/task.sh"]
    assert data["credential_file"] == str(project.dir / "credential" / "key.json")
    assert data["vm_labels"] == {"a": "b"}
    assert data["prices"]["e2-standard-2"] == {"standard": 0.067, "spot": 0.020}
    assert data["project"] == LOCAL_PROJECT
    assert data["config_path"] == str(project.dir / "const.py")
    assert set(data) >= {field.lower() for field in DEFAULTS}


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.py")
    assert "no such settings file" in message
    assert isinstance(ConfigError("x"), CflowError)


def test_folder_instead_of_file(tmp_path):
    assert "is a folder" in config_error(tmp_path)


def test_syntax_error_names_the_line(project):
    message = config_error(project("WORKER_NODE_CNT = 5\nVM_TYPE = 'e2\n"))
    assert message.startswith(f"{project.dir / 'const.py'}:2: invalid Python")


def test_runtime_error_names_the_line(project):
    message = config_error(project("A_OK = 1\n\nWORKER_NODE_CNT = undefined_name\n"))
    assert ":3: NameError" in message and "undefined_name" in message


def test_unknown_setting_suggests_the_right_name(project):
    message = config_error(project("WORKER_NODE_COUNT = 5\n"))
    assert "WORKER_NODE_COUNT is not a CFlow setting; did you mean WORKER_NODE_CNT?" in message


def test_unknown_setting_without_a_close_match(project):
    message = config_error(project("ZZZZ = 5\n"))
    assert "ZZZZ is not a CFlow setting" in message and "did you mean" not in message


def test_lowercase_and_private_names_are_ignored(project):
    load_config(project("helper = 3\n_MINE = 4\n"))


@pytest.mark.parametrize(
    "body, expected",
    [
        ("WORKER_NODE_CNT = -3", "WORKER_NODE_CNT must be a positive integer, got -3 (set it to the number of worker VMs)"),
        ("WORKER_NODE_CNT = 0", "WORKER_NODE_CNT must be a positive integer, got 0"),
        ("WORKER_NODE_CNT = '5'", "WORKER_NODE_CNT must be a positive integer, got '5'"),
        ("WORKER_NODE_CNT = True", "WORKER_NODE_CNT must be a positive integer, got True"),
        ("WORKER_NODE_CNT = 2.0", "WORKER_NODE_CNT must be a positive integer, got 2.0"),
        ("MAX_ATTEMPTS = 0", "MAX_ATTEMPTS must be a positive integer, got 0"),
        ("TASK_TIMEOUT = 0", "TASK_TIMEOUT must be a positive number of seconds, got 0"),
        ("TASK_TIMEOUT = float('inf')", "TASK_TIMEOUT must be a positive number of seconds, got inf"),
        ("TASK_TIMEOUT = '1h'", "TASK_TIMEOUT must be a positive number of seconds"),
        ("VM_DISK_GB = 5", "VM_DISK_GB must be an integer of at least 10, got 5"),
        ("LEASE_SECONDS = 5", "LEASE_SECONDS must be an integer from 10 to 600, got 5"),
        ("LEASE_SECONDS = 601", "LEASE_SECONDS must be an integer from 10 to 600, got 601"),
        ("VM_SPOT = 'yes'", "VM_SPOT must be True or False, got 'yes'"),
        ("TARGET = 'aws'", "TARGET must be 'local' or 'gcp', got 'aws'"),
        ("COMBINE = 'merge'", "COMBINE must be 'concat' or 'none', got 'merge'"),
        ("VM_BOOT = 'docker'", "VM_BOOT must be 'stock' or 'image', got 'docker'"),
        ("VM_ZONE = 'us-central1'", "VM_ZONE must be a Compute Engine zone like 'us-central1-a', got 'us-central1'"),
        ("VM_ZONE = 'US-CENTRAL1-A'", "VM_ZONE must be a Compute Engine zone"),
        ("VM_ZONE = 5", "VM_ZONE must be a Compute Engine zone"),
        ("VM_ZONE = 'me-west9-z'", "VM_ZONE is 'me-west9-z', which the local cloud does not serve"),
        ("VM_FALLBACK_ZONES = 'us-east1-b'", "VM_FALLBACK_ZONES must be a list of zones"),
        ("VM_FALLBACK_ZONES = ['us-east1-q']", "VM_FALLBACK_ZONES is 'us-east1-q', which the local cloud does not serve"),
        ("VM_FALLBACK_ZONES = ['us-central1-a']", "VM_FALLBACK_ZONES lists 'us-central1-a' twice"),
        ("VM_NAME_PREFIX = 'Cflow'", "VM_NAME_PREFIX must be lowercase letters"),
        ("VM_NAME_PREFIX = 'cflow-'", "VM_NAME_PREFIX must be lowercase letters"),
        ("VM_NAME_PREFIX = '1cflow'", "VM_NAME_PREFIX must be lowercase letters"),
        ("VM_NAME_PREFIX = 'a' * 41", "at most 40 characters"),
        ("VM_TYPE = 'big one'", "VM_TYPE must be a machine type like 'e2-standard-2'"),
        ("VM_STOCK_IMAGE = 'debian-12'", "VM_STOCK_IMAGE must look like 'projects/PROJECT/global/images/family/FAMILY'"),
        ("VM_BOOT = 'image'", "VM_IMAGE_NAME is not set, and VM_BOOT is 'image'"),
        ("VM_IMAGE_NAME = 'family/My_Image'", "VM_IMAGE_NAME is not an image name or 'family/NAME'"),
        ("VM_COMPUTE_SERVICE_ACCOUNT = 'robot'", "VM_COMPUTE_SERVICE_ACCOUNT must be 'default' or a service account email"),
        ("VM_LABELS = ['a']", "VM_LABELS must be a dict"),
        ("VM_LABELS = {'Team': 'x'}", "VM_LABELS has an invalid key 'Team'"),
        ("VM_LABELS = {'team': 'X Y'}", "VM_LABELS has an invalid value 'X Y' for key 'team'"),
        ("VM_LABELS = {'cflow-run': 'x'}", "VM_LABELS has key 'cflow-run'; keys starting with 'cflow-' are CFlow's own"),
        ("VM_NETWORK = 'My Net'", "VM_NETWORK must be a VPC network's name, or 'projects/HOST_PROJECT/global/networks/NAME'"),
        ("VM_NETWORK = 'projects/p/regions/r/networks/n'", "VM_NETWORK must be a VPC network's name"),
        ("VM_SUBNETWORK = 'Sub_1'", "VM_SUBNETWORK must be a subnetwork's name"),
        ("VM_SUBNETWORK = 'sub'\nVM_FALLBACK_ZONES = ['us-east1-b']",
         "VM_SUBNETWORK is one region's subnetwork, but the zones (VM_ZONE, VM_FALLBACK_ZONES) span us-central1, us-east1"),
        ("VM_SUBNETWORK = 'projects/host-1/regions/us-east1/subnetworks/s'",
         "VM_SUBNETWORK is in region us-east1, but the zones (VM_ZONE, VM_FALLBACK_ZONES) are in us-central1"),
        ("VM_EXTERNAL_IP = 'no'", "VM_EXTERNAL_IP must be True or False, got 'no'"),
        ("MAX_RUN_HOURS = 0", "MAX_RUN_HOURS must be a number of hours from 0.0083 (30 s) to 2880 (120 days, GCE's limit), got 0"),
        ("MAX_RUN_HOURS = 24 * 121", "MAX_RUN_HOURS must be a number of hours from"),
        ("MAX_RUN_HOURS = '24'", "MAX_RUN_HOURS must be a number of hours from"),
        ("TOPIC_NAME = 'goog-topic'", "TOPIC_NAME must start with a letter"),
        ("SUBSCRIPTION_NAME = '9sub'", "SUBSCRIPTION_NAME must start with a letter"),
        ("TOPIC_NAME = 't' * 201", "at most 200 characters"),
        ("BUCKET = 'ab'", "BUCKET must be 3 to 63 characters long"),
        ("BUCKET = 'My-Bucket'", "BUCKET may hold only lowercase letters"),
        ("BUCKET = 'bucket-'", "BUCKET may hold only lowercase letters"),
        ("BUCKET = 'a..b'", "BUCKET must not have empty dot-separated parts"),
        ("BUCKET = 'goog-data'", "BUCKET must not start with 'goog' or contain 'google'"),
        ("BUCKET = 'my-google-data'", "BUCKET must not start with 'goog' or contain 'google'"),
        ("BUCKET = '192.168.5.4'", "BUCKET must not be an IP address"),
        ("BUCKET = 'a' * 64", "BUCKET must be 3 to 63 characters long"),
        ("PROJECT_NAME = 5", "PROJECT_NAME must be None or a project id string"),
        ("TARGET = 'gcp'\nPROJECT_NAME = 'My Project'", "PROJECT_NAME must be a GCP project id"),
        ("RESULT_DIR = ''", "RESULT_DIR must be a folder path"),
        ("PRICES = {'e2-micro': 0.1}", "PRICES entry 'e2-micro' must map a machine type"),
        ("PRICES = {'e2-micro': {'standard': -1, 'spot': 0}}", "PRICES entry 'e2-micro' has standard price -1, not a non-negative number"),
        ("TASK_MODULE_CMD = ''", "TASK_MODULE_CMD is empty"),
        ("TASK_MODULE_CMD = 5", "TASK_MODULE_CMD must be a string or a list of strings"),
        ("TASK_MODULE_CMD = 'bash \"task/task.sh'", "TASK_MODULE_CMD cannot be split into arguments (No closing quotation)"),
        ("TASKS = 7", "TASKS must be a file path, a gs:// prefix or a list of items"),
        ("TASKS = ''", "TASKS is an empty string"),
        ("TASKS = 'missing.txt'", "TASKS names the tasks file missing.txt, which does not exist"),
        ("TASKS = 'gs://'", "TASKS is a gs:// URL with no bucket"),
        ("TASKS = 'gs://Bad_Bucket/x/'", "TASKS names bucket 'Bad_Bucket', which may hold only lowercase letters"),
        ("TASKS = ['ok', 'it\\'s']", "TASKS item 1 (\"it's\") cannot be split into fields: No closing quotation"),
        ("TASKS = [['a', 3]]", "TASKS item 0 (['a', 3]) must be a string or a list of strings"),
        ("TASKS = [['a\\x00b']]", "TASKS item 0 (['a\\x00b']) has a field with a NUL character"),
    ],
)
def test_invalid_values_name_file_and_field(project, body, expected):
    message = config_error(project(body + "\n"))
    assert expected in message, message
    assert message.endswith(")"), message  # every message ends with how to fix it


def test_gcp_accepts_unknown_well_formed_zones_but_local_does_not(project):
    body = "TARGET = 'gcp'\nPROJECT_NAME = 'my-project-1'\nVM_ZONE = 'africa-south1-a'\nVM_FALLBACK_ZONES = []\n"
    assert load_config(project(body)).vm_zone == "africa-south1-a"
    assert "local cloud does not serve" in config_error(project(body), {"TARGET": "local"})
    message = config_error(project("VM_ZONE = 'us-central1-z'\n"))
    assert "did you mean 'us-central1-" in message


def test_errors_come_in_the_order_of_const_py(project):
    message = config_error(project("VM_DISK_GB = 5\nVM_BOOT = 'image'\n"))
    assert "VM_IMAGE_NAME is not set" in message
    message = config_error(project("LEASE_SECONDS = 5\nVM_FALLBACK_ZONES = ['us-central1-a']\nVM_ZONE = 'us-central1-q'\n"))
    assert "VM_ZONE is 'us-central1-q'" in message
    message = config_error(project("BUCKET = 'ab'\nTARGET = 'gcp'\n"))
    assert "PROJECT_NAME is not set" in message


def test_zone_list_and_regions_come_from_one_place():
    assert KNOWN_ZONES[:4] == ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f")
    assert len(KNOWN_ZONES) == len(set(KNOWN_ZONES)) == sum(len(letters) for letters in zones.REGION_ZONES.values())
    assert zones.region_of("europe-west4-c") == "europe-west4"
    assert zones.region_of("me-west9-z") == "me-west9"  # a zone CFlow does not know has a region too
    assert all(zone.startswith(zones.region_of(zone) + "-") for zone in KNOWN_ZONES)


def test_the_local_compute_emulator_serves_exactly_the_known_zones():
    from cflow.local.compute.catalog import Catalog

    catalog = Catalog("http://127.0.0.1:1/compute/v1/")
    assert catalog.zone_names() == sorted(KNOWN_ZONES)
    assert all(catalog.region_of(zone) == zones.region_of(zone) for zone in KNOWN_ZONES)


def test_every_known_zone_is_well_formed_and_usable_locally(project):
    for zone in KNOWN_ZONES:
        config = load_config(project(f"VM_ZONE = {zone!r}\nVM_FALLBACK_ZONES = []\n"))
        assert config.vm_zone == zone


def test_good_image_names_are_accepted(project):
    for image in ("my-image", "family/my-family", "projects/other-proj/global/images/family/base"):
        config = load_config(project(f"VM_BOOT = 'image'\nVM_IMAGE_NAME = {image!r}\n"))
        assert config.vm_image_name == image


def test_bash_script_must_exist(project):
    message = config_error(project("TASK_MODULE_CMD = 'bash task/nope.sh'\n"))
    assert "TASK_MODULE_CMD runs task/nope.sh, which does not exist" in message


def test_direct_script_must_be_executable(project):
    script = project.dir / "task" / "task.sh"
    script.chmod(0o644)
    message = config_error(project("TASK_MODULE_CMD = 'task/task.sh --fast'\n"))
    assert "not executable" in message and "chmod +x task/task.sh" in message
    script.chmod(0o755)
    assert load_config(project("TASK_MODULE_CMD = './task/task.sh --fast'\n")).task_module_cmd == ("./task/task.sh", "--fast")


def test_script_through_an_interpreter_need_not_be_executable(project):
    (project.dir / "task" / "task.sh").chmod(0o644)
    load_config(project("TASK_MODULE_CMD = 'bash task/task.sh'\n"))


def test_script_outside_task_folder_is_refused(project):
    (project.dir / "run.sh").write_text("echo\n")
    message = config_error(project("TASK_MODULE_CMD = 'bash run.sh'\n"))
    assert "outside task/" in message
    message = config_error(project("TASK_MODULE_CMD = 'bash task/../run.sh'\n"))
    assert "outside task/" in message


def test_commands_without_a_local_script_are_not_checked(project):
    for command in ("python3 -c 'print(1)'", "python3 -m mytool", "/usr/bin/env true", "echo"):
        assert load_config(project(f"TASK_MODULE_CMD = {command!r}\n")).task_module_cmd[0]


def test_credential_file_must_be_inside_credential_folder(project):
    (project.dir / "credential").mkdir()
    (project.dir / "key.json").write_text("{}")
    message = config_error(project("CREDENTIAL_FILE = 'key.json'\n"))
    assert "CREDENTIAL_FILE is key.json, which is not a file in credential/" in message
    message = config_error(project("CREDENTIAL_FILE = 'credential/../key.json'\n"))
    assert "not a file in credential/" in message
    message = config_error(project("CREDENTIAL_FILE = 'credential/missing.json'\n"))
    assert "CREDENTIAL_FILE is credential/missing.json, which does not exist" in message
    message = config_error(project("CREDENTIAL_FILE = 3\n"))
    assert "CREDENTIAL_FILE must be None or a path" in message


def test_relative_paths_resolve_against_const_py_not_cwd(project, tmp_path_factory, monkeypatch):
    path = project("")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(path)
    assert config.tasks_file == project.dir / "tasks.txt"


def test_relative_const_path_is_named_as_given(project, monkeypatch):
    project("WORKER_NODE_CNT = -1\n")
    monkeypatch.chdir(project.dir)
    with pytest.raises(ConfigError) as caught:
        load_config("const.py")
    assert str(caught.value).startswith("const.py: WORKER_NODE_CNT must be a positive integer, got -1")
    assert load_config("const.py", {"WORKER_NODE_CNT": 1}).base_dir == project.dir


def test_gcs_tasks(project):
    config = load_config(project("TASKS = 'gs://my-bucket/inputs/'\n"))
    assert config.tasks_kind == "gcs"
    assert config.tasks_gcs == ("my-bucket", "inputs/")


def test_config_type_is_a_dataclass_with_snake_case_fields():
    names = {field for field in Config.__dataclass_fields__}
    assert {name.lower() for name in DEFAULTS} <= names
    assert {"config_path", "base_dir"} <= names

