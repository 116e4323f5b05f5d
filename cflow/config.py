"""const.py -> a validated, frozen ``Config``.

``load_config(path, overrides)`` runs the user's const.py in a fresh namespace
(it is the user's file, not part of the package), takes its UPPERCASE names,
applies command-line overrides, checks every field and returns a ``Config``.
Every problem is a ``ConfigError`` whose message is one line naming the file
and the field, what is wrong and how to fix it.
"""

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import shlex
import types
from pathlib import Path

from cflow.errors import ConfigError
from cflow.local import LOCAL_PROJECT

logger = logging.getLogger(__name__)

# The zones CFlow knows; the local Compute emulator serves exactly these. On
# GCP a well-formed zone missing here is accepted, since Google adds zones.
KNOWN_ZONES = (
    "us-central1-a",
    "us-central1-b",
    "us-central1-c",
    "us-central1-f",
    "us-east1-b",
    "us-east1-c",
    "us-east1-d",
    "us-west1-a",
    "us-west1-b",
    "us-west1-c",
    "europe-west1-b",
    "europe-west1-c",
    "europe-west1-d",
    "europe-west4-a",
    "europe-west4-b",
    "europe-west4-c",
    "asia-east1-a",
    "asia-east1-b",
    "asia-east1-c",
)

TARGETS = ("local", "gcp")
COMBINE_MODES = ("concat", "none")
VM_BOOT_MODES = ("stock", "image")

# Only this folder of the user's is shipped to the workers, so the task's
# script has to live in it.
TASK_DIR = "task"
CREDENTIAL_DIR = "credential"

# Workers are named PREFIX-RUNID-N; 63 is GCE's limit, the rest is the suffix's.
MAX_VM_NAME_PREFIX = 40
# Topic and subscription names get "-RUNID" appended; Pub/Sub allows 255.
MAX_PUBSUB_PREFIX = 200
# Pub/Sub's ack deadline range.
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 10, 600
MIN_DISK_GB = 10
# GCE's own limit on labels per resource; CFlow adds its own.
MAX_USER_LABELS = 60
RESERVED_LABEL_PREFIX = "cflow-"

# The defaults of every setting; the shipped const.py spells out the same values.
DEFAULTS = {
    "TARGET": "local",
    "PROJECT_NAME": None,
    "BUCKET": None,
    "TASK_MODULE_CMD": "bash task/task.sh",
    "TASKS": "tasks.txt",
    "MAX_ATTEMPTS": 3,
    "TASK_TIMEOUT": 3600,
    "COMBINE": "concat",
    "RESULT_DIR": "output",
    "WORKER_NODE_CNT": 5,
    "VM_NAME_PREFIX": "cflow-worker",
    "VM_TYPE": "e2-standard-2",
    "VM_ZONE": "us-central1-a",
    "VM_FALLBACK_ZONES": ["us-central1-b", "us-central1-c", "us-central1-f"],
    "VM_SPOT": True,
    "VM_BOOT": "stock",
    "VM_STOCK_IMAGE": "projects/debian-cloud/global/images/family/debian-12",
    "VM_IMAGE_NAME": None,
    "VM_DISK_GB": 10,
    "VM_COMPUTE_SERVICE_ACCOUNT": "default",
    "VM_LABELS": {},
    "TOPIC_NAME": "cflow-topic",
    "SUBSCRIPTION_NAME": "cflow-sub",
    "LEASE_SECONDS": 60,
    "CREDENTIAL_FILE": None,
    "PRICES": {
        "e2-micro": {"standard": 0.0084, "spot": 0.0025},
        "e2-small": {"standard": 0.0168, "spot": 0.0050},
        "e2-medium": {"standard": 0.0335, "spot": 0.0101},
        "e2-standard-2": {"standard": 0.067, "spot": 0.020},
        "e2-standard-4": {"standard": 0.134, "spot": 0.040},
        "e2-standard-8": {"standard": 0.268, "spot": 0.080},
        "n2-standard-2": {"standard": 0.097, "spot": 0.029},
        "n2-standard-4": {"standard": 0.194, "spot": 0.058},
        "c2-standard-4": {"standard": 0.209, "spot": 0.063},
    },
}

GCE_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
ZONE_RE = re.compile(r"[a-z]+(-[a-z]+)*[0-9]+-[a-z]")
PROJECT_ID_RE = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
MACHINE_TYPE_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+")
IMAGE_PATH_RE = re.compile(
    r"(https://www\.googleapis\.com/compute/v1/)?projects/[a-z][-a-z0-9.:]*[a-z0-9]"
    r"/global/images/(family/)?[a-z]([-a-z0-9]*[a-z0-9])?"
)
PUBSUB_PREFIX_RE = re.compile(r"[A-Za-z][-A-Za-z0-9._~%+]*")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
LABEL_KEY_RE = re.compile(r"[a-z][-_a-z0-9]{0,62}")
LABEL_VALUE_RE = re.compile(r"[-_a-z0-9]{0,63}")
BUCKET_CHARS_RE = re.compile(r"[a-z0-9]([-_.a-z0-9]*[a-z0-9])?")
# Interpreter options after which the next argument is code, not a script file.
INLINE_CODE_OPTIONS = {"-c", "-m", "-e", "-E", "--command", "--eval"}
SCRIPT_SUFFIXES = (".sh", ".bash", ".py", ".r", ".pl", ".rb", ".js", ".jl")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's validated settings; see const.py for what each field means.

    Paths are absolute. ``tasks`` is the TASKS value normalised: a file path
    string as written (see ``tasks_file``), a ``gs://`` prefix string, or a
    tuple of items, each a tuple of argument strings. Mappings are read-only.
    """

    target: str
    project_name: str | None
    bucket: str
    task_module_cmd: tuple[str, ...]
    tasks: str | tuple[tuple[str, ...], ...]
    max_attempts: int
    task_timeout: float
    combine: str
    result_dir: Path
    worker_node_cnt: int
    vm_name_prefix: str
    vm_type: str
    vm_zone: str
    vm_fallback_zones: tuple[str, ...]
    vm_spot: bool
    vm_boot: str
    vm_stock_image: str
    vm_image_name: str | None
    vm_disk_gb: int
    vm_compute_service_account: str
    vm_labels: types.MappingProxyType
    topic_name: str
    subscription_name: str
    lease_seconds: int
    credential_file: Path | None
    prices: types.MappingProxyType
    config_path: Path
    base_dir: Path

    @property
    def is_local(self):
        """True when the run goes to the cloud in a box."""
        return self.target == "local"

    @property
    def project(self):
        """The project the run uses: ``LOCAL_PROJECT`` locally, else PROJECT_NAME."""
        return LOCAL_PROJECT if self.is_local else self.project_name

    @property
    def zones(self):
        """VM_ZONE then the fallback zones, in the order to try them."""
        return (self.vm_zone, *self.vm_fallback_zones)

    @property
    def tasks_kind(self):
        """Where the items come from: ``"file"``, ``"list"`` or ``"gcs"``."""
        if isinstance(self.tasks, tuple):
            return "list"
        return "gcs" if self.tasks.startswith("gs://") else "file"

    @property
    def tasks_file(self):
        """The tasks file's absolute path, or None when TASKS is not a file."""
        return self.base_dir / self.tasks if self.tasks_kind == "file" else None

    @property
    def tasks_gcs(self):
        """``(bucket, prefix)`` of a ``gs://`` TASKS, or None for the other kinds."""
        return split_gcs_url(self.tasks) if self.tasks_kind == "gcs" else None

    def hourly_price(self, vm_type=None, spot=None):
        """Estimated USD per VM-hour from PRICES.

        Args:
            vm_type: machine type; defaults to ``vm_type``.
            spot: Spot price if True; defaults to ``vm_spot``.
        Returns:
            The price, or None when PRICES has no entry for the machine type.
        """
        entry = self.prices.get(vm_type or self.vm_type)
        if entry is None:
            return None
        return entry["spot" if (self.vm_spot if spot is None else spot) else "standard"]

    def to_dict(self):
        """The settings as JSON-safe data (str, numbers, bools, None, lists, dicts), for the run's record."""
        result = {field.name: _json_safe(getattr(self, field.name)) for field in dataclasses.fields(self)}
        result["project"] = self.project
        return result


def _json_safe(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_safe(element) for element in value]
    if isinstance(value, (dict, types.MappingProxyType)):
        return {key: _json_safe(element) for key, element in value.items()}
    return value


def split_gcs_url(url):
    """Split ``gs://BUCKET/PREFIX`` into ``(bucket, prefix)``; prefix may be empty.

    Raises:
        ValueError: the string is not a ``gs://`` URL with a bucket.
    """
    if not isinstance(url, str) or not url.startswith("gs://"):
        raise ValueError(f"not a gs:// URL: {url!r}")
    bucket, _, prefix = url[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"gs:// URL has no bucket: {url!r}")
    return bucket, prefix


def bucket_name_problem(name):
    """Why ``name`` is not a valid Cloud Storage bucket name, or None if it is."""
    if not isinstance(name, str):
        return "must be a string"
    if not BUCKET_CHARS_RE.fullmatch(name):
        return "may hold only lowercase letters, digits, '-', '_' and '.', and must start and end with a letter or digit"
    parts = name.split(".")
    if len(name) < 3 or len(name) > (222 if len(parts) > 1 else 63):
        return "must be 3 to 63 characters long (up to 222 when it has dots)"
    if any(not part or len(part) > 63 for part in parts):
        return "must not have empty dot-separated parts or parts longer than 63 characters"
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return "must not start with 'goog' or contain 'google'"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return "must not be an IP address"


def _short_repr(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def args_problem(args):
    """Why a work item's argument list cannot reach a process's argv, or None.

    argv cannot hold NUL, and Pub/Sub carries the item as UTF-8, which lone
    surrogates cannot be encoded in.
    """
    for arg in args:
        if not isinstance(arg, str):
            return f"has a field that is not a string: {_short_repr(arg)}"
        if "\0" in arg:
            return "has a field with a NUL character, which a command line cannot carry"
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return f"has a field that is not valid Unicode text: {_short_repr(arg)}"
    return None


class _Checker:
    """Checks the raw settings one field at a time; the first problem raises.

    Args:
        label: the settings file as the user named it, for messages.
        base_dir: the directory of const.py.
        overridden: names of fields that came from the command line.
    """

    def __init__(self, label, base_dir, overridden):
        self.label = label
        self.base_dir = base_dir
        self.overridden = overridden

    def fail(self, field, problem, fix):
        """Raise the one-line ConfigError for ``field``."""
        where = f"{field} (from the command line)" if field in self.overridden else field
        raise ConfigError(f"{self.label}: {where} {problem} ({fix})")

    def choice(self, field, value, choices):
        if value not in choices:
            options = " or ".join(repr(choice) for choice in choices)
            self.fail(field, f"must be {options}, got {_short_repr(value)}", f"set it to {options}")
        return value

    def positive_int(self, field, value, fix, minimum=1, maximum=None):
        in_range = _is_int(value) and value >= minimum and (maximum is None or value <= maximum)
        if not in_range:
            if maximum is not None:
                wanted = f"an integer from {minimum} to {maximum}"
            elif minimum == 1:
                wanted = "a positive integer"
            else:
                wanted = f"an integer of at least {minimum}"
            self.fail(field, f"must be {wanted}, got {_short_repr(value)}", fix)
        return value

    def boolean(self, field, value, fix):
        if not isinstance(value, bool):
            self.fail(field, f"must be True or False, got {_short_repr(value)}", fix)
        return value

    def string(self, field, value, fix):
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string, got {_short_repr(value)}", fix)
        return value

    def zone(self, field, value, target):
        fix = f"use a zone such as {DEFAULTS['VM_ZONE']!r}"
        if not isinstance(value, str) or not ZONE_RE.fullmatch(value):
            self.fail(field, f"must be a Compute Engine zone like 'us-central1-a', got {_short_repr(value)}", fix)
        if value not in KNOWN_ZONES:
            if target == "local":
                close = difflib.get_close_matches(value, KNOWN_ZONES, n=1)
                suggestion = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    field,
                    f"is {value!r}, which the local cloud does not serve",
                    f"{suggestion}the local cloud serves {', '.join(KNOWN_ZONES)}",
                )
            logger.debug("zone %s is not in CFlow's list of known zones; using it as given", value)
        return value

    def gce_name(self, field, value, max_length, fix):
        if not isinstance(value, str) or not GCE_NAME_RE.fullmatch(value) or len(value) > max_length:
            self.fail(
                field,
                f"must be lowercase letters, digits and '-', start with a letter, not end with '-', "
                f"and be at most {max_length} characters, got {_short_repr(value)}",
                fix,
            )
        return value

    def pubsub_prefix(self, field, value):
        fix = f"use letters, digits and '-', e.g. {DEFAULTS[field]!r}"
        if (
            not isinstance(value, str)
            or not PUBSUB_PREFIX_RE.fullmatch(value)
            or len(value) > MAX_PUBSUB_PREFIX
            or value.lower().startswith("goog")
        ):
            self.fail(
                field,
                f"must start with a letter, hold only letters, digits and -._~%+, not start with 'goog', "
                f"and be at most {MAX_PUBSUB_PREFIX} characters, got {_short_repr(value)}",
                fix,
            )
        return value

    def bucket(self, field, value, fix):
        problem = bucket_name_problem(value)
        if problem:
            self.fail(field, f"{problem}, got {_short_repr(value)}", fix)
        return value

    def split_command(self, field, value, fix):
        if isinstance(value, str):
            try:
                argv = shlex.split(value, comments=False, posix=True)
            except ValueError as error:
                self.fail(field, f"cannot be split into arguments ({error}): {_short_repr(value)}", fix)
        elif isinstance(value, (list, tuple)) and all(isinstance(arg, str) for arg in value):
            argv = list(value)
        else:
            self.fail(field, f"must be a string or a list of strings, got {_short_repr(value)}", fix)
        if not argv:
            self.fail(field, "is empty", fix)
        problem = args_problem(argv)
        if problem:
            self.fail(field, problem, fix)
        return tuple(argv)


def _script_in_command(argv):
    """The script file a command runs, and whether it must be executable.

    Returns:
        ``(path, must_be_executable)``; ``(None, False)`` when the command runs
        no file of the user's that can be checked here (a program from PATH
        with inline code, or an absolute path that only exists on the worker).
    """
    program = argv[0]
    if "/" in program:
        return (None, False) if os.path.isabs(program) else (program, True)
    for arg in argv[1:]:
        if arg in INLINE_CODE_OPTIONS:
            return None, False
        if arg.startswith("-"):
            continue
        if "/" in arg or arg.lower().endswith(SCRIPT_SUFFIXES):
            return (None, False) if os.path.isabs(arg) else (arg, False)
    return None, False


def _check_task_command(checker, argv):
    field = "TASK_MODULE_CMD"
    script, must_be_executable = _script_in_command(argv)
    if script is None:
        return
    path = checker.base_dir / script
    inside_task_dir = os.path.normpath(path).startswith(os.path.normpath(checker.base_dir / TASK_DIR) + os.sep)
    if not inside_task_dir:
        checker.fail(
            field,
            f"runs {script}, which is outside {TASK_DIR}/, the only folder sent to the workers",
            f"move the script into {TASK_DIR}/ and point TASK_MODULE_CMD at it",
        )
    if not path.is_file():
        checker.fail(
            field,
            f"runs {script}, which does not exist in {checker.base_dir}",
            f"create {script}, or fix the path (it is relative to the directory of const.py)",
        )
    if must_be_executable and not os.access(path, os.X_OK):
        checker.fail(
            field,
            f"runs {script} directly, but it is not executable",
            f"run `chmod +x {script}`, or start the command with its interpreter, e.g. 'bash {script}'",
        )


def _check_tasks(checker, value):
    field = "TASKS"
    fix = "set TASKS to a tasks file such as 'tasks.txt', a list of items, or 'gs://BUCKET/PREFIX/'"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value.startswith("gs://"):
            try:
                bucket, _ = split_gcs_url(value)
            except ValueError:
                checker.fail(field, f"is a gs:// URL with no bucket: {value!r}", "write it as 'gs://BUCKET/PREFIX/'")
            problem = bucket_name_problem(bucket)
            if problem:
                checker.fail(field, f"names bucket {bucket!r}, which {problem}", "fix the bucket name in the gs:// URL")
            return value
        if not value:
            checker.fail(field, "is an empty string", fix)
        path = checker.base_dir / value
        if not path.is_file():
            checker.fail(
                field,
                f"names the tasks file {value}, which does not exist in {checker.base_dir}",
                "create it (one item per line) or fix the path, which is relative to the directory of const.py",
            )
        return value
    if not isinstance(value, (list, tuple)):
        checker.fail(field, f"must be a file path, a gs:// prefix or a list of items, got {_short_repr(value)}", fix)
    items = []
    for position, item in enumerate(value):
        where = f"item {position} ({_short_repr(item, 40)})"
        if isinstance(item, str):
            try:
                args = shlex.split(item, comments=False, posix=True)
            except ValueError as error:
                checker.fail(field, f"{where} cannot be split into fields: {error}", "balance its quotes")
        elif isinstance(item, (list, tuple)) and all(isinstance(arg, str) for arg in item):
            args = list(item)
        else:
            checker.fail(field, f"{where} must be a string or a list of strings", fix)
        problem = args_problem(args)
        if problem:
            checker.fail(field, f"{where} {problem}", "remove that character")
        items.append(tuple(args))
    return tuple(items)


def _check_credential_file(checker, value):
    field = "CREDENTIAL_FILE"
    if value is None:
        return None
    fix = f"put the key file in {CREDENTIAL_DIR}/ and set CREDENTIAL_FILE = '{CREDENTIAL_DIR}/KEY.json', or None"
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        checker.fail(field, f"must be None or a path, got {_short_repr(value)}", fix)
    path = (checker.base_dir / value).resolve()
    credential_dir = (checker.base_dir / CREDENTIAL_DIR).resolve()
    if not path.is_relative_to(credential_dir) or path == credential_dir:
        checker.fail(field, f"is {os.fspath(value)}, which is not a file in {CREDENTIAL_DIR}/", fix)
    if not path.is_file():
        checker.fail(field, f"is {os.fspath(value)}, which does not exist", fix)
    return path


def _check_labels(checker, value):
    field = "VM_LABELS"
    fix = "use lowercase keys and values of letters, digits, '-' and '_', e.g. {'team': 'research'}"
    if not isinstance(value, dict):
        checker.fail(field, f"must be a dict, got {_short_repr(value)}", fix)
    if len(value) > MAX_USER_LABELS:
        checker.fail(field, f"has {len(value)} labels, more than {MAX_USER_LABELS}", "drop some labels")
    for key, label_value in value.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.fullmatch(key):
            checker.fail(field, f"has an invalid key {_short_repr(key)}", fix)
        if key.startswith(RESERVED_LABEL_PREFIX):
            checker.fail(field, f"has key {key!r}; keys starting with {RESERVED_LABEL_PREFIX!r} are CFlow's own", "rename it")
        if not isinstance(label_value, str) or not LABEL_VALUE_RE.fullmatch(label_value):
            checker.fail(field, f"has an invalid value {_short_repr(label_value)} for key {key!r}", fix)
    return types.MappingProxyType(dict(value))


def _check_prices(checker, value):
    field = "PRICES"
    fix = "write it as {'e2-standard-2': {'standard': 0.067, 'spot': 0.020}, ...} in USD per hour"
    if not isinstance(value, dict):
        checker.fail(field, f"must be a dict, got {_short_repr(value)}", fix)
    prices = {}
    for vm_type, entry in value.items():
        if not isinstance(vm_type, str) or not isinstance(entry, dict) or set(entry) != {"standard", "spot"}:
            checker.fail(field, f"entry {_short_repr(vm_type)} must map a machine type to {{'standard': X, 'spot': Y}}", fix)
        for kind, price in entry.items():
            if not _is_number(price) or price < 0:
                checker.fail(field, f"entry {vm_type!r} has {kind} price {_short_repr(price)}, not a non-negative number", fix)
        prices[vm_type] = types.MappingProxyType(dict(entry))
    return types.MappingProxyType(prices)


def _check_all(checker, raw):
    """Validate and normalise ``raw`` (FIELD -> value); returns Config keyword arguments."""
    c = checker
    target = c.choice("TARGET", raw["TARGET"], TARGETS)

    project_name = raw["PROJECT_NAME"]
    if target == "gcp":
        if project_name is None:
            c.fail("PROJECT_NAME", "is not set, and TARGET is 'gcp'", "set it to your GCP project id, or use TARGET = 'local'")
        if not isinstance(project_name, str) or not PROJECT_ID_RE.fullmatch(project_name):
            c.fail(
                "PROJECT_NAME",
                f"must be a GCP project id (6-30 lowercase letters, digits and '-'), got {_short_repr(project_name)}",
                "copy the project id from the Cloud console",
            )
    elif project_name is not None and not isinstance(project_name, str):
        c.fail("PROJECT_NAME", f"must be None or a project id string, got {_short_repr(project_name)}", "fix its value")
    project = LOCAL_PROJECT if target == "local" else project_name

    bucket = raw["BUCKET"]
    bucket = c.bucket("BUCKET", f"{project}-cflow" if bucket is None else bucket, "use a valid bucket name, or None for PROJECT-cflow")

    task_module_cmd = c.split_command(
        "TASK_MODULE_CMD", raw["TASK_MODULE_CMD"], "set it to the command that runs your task, e.g. 'bash task/task.sh'"
    )
    _check_task_command(c, task_module_cmd)
    tasks = _check_tasks(c, raw["TASKS"])

    max_attempts = c.positive_int("MAX_ATTEMPTS", raw["MAX_ATTEMPTS"], "set it to how many failed attempts an item gets, e.g. 3")
    task_timeout = raw["TASK_TIMEOUT"]
    if not _is_number(task_timeout) or task_timeout <= 0:
        c.fail("TASK_TIMEOUT", f"must be a positive number of seconds, got {_short_repr(task_timeout)}", "set it to e.g. 3600")
    combine = c.choice("COMBINE", raw["COMBINE"], COMBINE_MODES)
    result_dir = raw["RESULT_DIR"]
    if not isinstance(result_dir, (str, os.PathLike)) or not os.fspath(result_dir):
        c.fail("RESULT_DIR", f"must be a folder path, got {_short_repr(result_dir)}", "set it to e.g. 'output'")

    worker_node_cnt = c.positive_int("WORKER_NODE_CNT", raw["WORKER_NODE_CNT"], "set it to the number of worker VMs")
    vm_name_prefix = c.gce_name(
        "VM_NAME_PREFIX", raw["VM_NAME_PREFIX"], MAX_VM_NAME_PREFIX, f"use e.g. {DEFAULTS['VM_NAME_PREFIX']!r}"
    )
    vm_type = raw["VM_TYPE"]
    if not isinstance(vm_type, str) or not MACHINE_TYPE_RE.fullmatch(vm_type):
        c.fail("VM_TYPE", f"must be a machine type like 'e2-standard-2', got {_short_repr(vm_type)}", "pick one from the Compute Engine machine types")

    vm_zone = c.zone("VM_ZONE", raw["VM_ZONE"], target)
    fallback = raw["VM_FALLBACK_ZONES"]
    if not isinstance(fallback, (list, tuple)):
        c.fail("VM_FALLBACK_ZONES", f"must be a list of zones, got {_short_repr(fallback)}", "write it as ['us-central1-b', ...] or []")
    seen = {vm_zone}
    for zone in fallback:
        c.zone("VM_FALLBACK_ZONES", zone, target)
        if zone in seen:
            c.fail("VM_FALLBACK_ZONES", f"lists {zone!r} twice (VM_ZONE counts too)", "remove the repeat")
        seen.add(zone)

    vm_spot = c.boolean("VM_SPOT", raw["VM_SPOT"], "True for Spot VMs, False for standard VMs")
    vm_boot = c.choice("VM_BOOT", raw["VM_BOOT"], VM_BOOT_MODES)
    vm_stock_image = raw["VM_STOCK_IMAGE"]
    if not isinstance(vm_stock_image, str) or not IMAGE_PATH_RE.fullmatch(vm_stock_image):
        c.fail(
            "VM_STOCK_IMAGE",
            f"must look like 'projects/PROJECT/global/images/family/FAMILY', got {_short_repr(vm_stock_image)}",
            f"use e.g. {DEFAULTS['VM_STOCK_IMAGE']!r}",
        )
    vm_image_name = raw["VM_IMAGE_NAME"]
    if vm_image_name is not None or vm_boot == "image":
        image_fix = "set it to your image's name, or 'family/NAME' for the newest image of a family"
        if vm_image_name is None:
            c.fail("VM_IMAGE_NAME", "is not set, and VM_BOOT is 'image'", image_fix + ", or use VM_BOOT = 'stock'")
        if not isinstance(vm_image_name, str) or not (
            IMAGE_PATH_RE.fullmatch(vm_image_name)
            or (GCE_NAME_RE.fullmatch(vm_image_name.removeprefix("family/")) and len(vm_image_name.removeprefix("family/")) <= 63)
        ):
            c.fail("VM_IMAGE_NAME", f"is not an image name or 'family/NAME': {_short_repr(vm_image_name)}", image_fix)
    vm_disk_gb = c.positive_int("VM_DISK_GB", raw["VM_DISK_GB"], f"set it to {MIN_DISK_GB} or more", minimum=MIN_DISK_GB)
    account = raw["VM_COMPUTE_SERVICE_ACCOUNT"]
    if account != "default" and not (isinstance(account, str) and EMAIL_RE.fullmatch(account)):
        c.fail(
            "VM_COMPUTE_SERVICE_ACCOUNT",
            f"must be 'default' or a service account email, got {_short_repr(account)}",
            "use 'default' or NAME@PROJECT.iam.gserviceaccount.com",
        )
    vm_labels = _check_labels(c, raw["VM_LABELS"])
    topic_name = c.pubsub_prefix("TOPIC_NAME", raw["TOPIC_NAME"])
    subscription_name = c.pubsub_prefix("SUBSCRIPTION_NAME", raw["SUBSCRIPTION_NAME"])
    lease_seconds = c.positive_int(
        "LEASE_SECONDS",
        raw["LEASE_SECONDS"],
        f"Pub/Sub allows {MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS}",
        minimum=MIN_LEASE_SECONDS,
        maximum=MAX_LEASE_SECONDS,
    )
    credential_file = _check_credential_file(c, raw["CREDENTIAL_FILE"])
    prices = _check_prices(c, raw["PRICES"])

    return dict(
        target=target,
        project_name=project_name,
        bucket=bucket,
        task_module_cmd=task_module_cmd,
        tasks=tasks,
        max_attempts=max_attempts,
        task_timeout=task_timeout,
        combine=combine,
        result_dir=c.base_dir / result_dir,
        worker_node_cnt=worker_node_cnt,
        vm_name_prefix=vm_name_prefix,
        vm_type=vm_type,
        vm_zone=vm_zone,
        vm_fallback_zones=tuple(fallback),
        vm_spot=vm_spot,
        vm_boot=vm_boot,
        vm_stock_image=vm_stock_image,
        vm_image_name=vm_image_name,
        vm_disk_gb=vm_disk_gb,
        vm_compute_service_account=account,
        vm_labels=vm_labels,
        topic_name=topic_name,
        subscription_name=subscription_name,
        lease_seconds=lease_seconds,
        credential_file=credential_file,
        prices=prices,
    )


def _unknown_name_error(label, name, from_command_line):
    suggestion = difflib.get_close_matches(name, list(DEFAULTS), n=1, cutoff=0.6)
    hint = f"did you mean {suggestion[0]}?" if suggestion else f"known settings are listed in {label}"
    where = f"{name} (from the command line)" if from_command_line else name
    return ConfigError(f"{label}: {where} is not a CFlow setting; {hint} (fix the name, or start names of your own helpers with _)")


def _one_line(text):
    return " ".join(str(text).split())


def _run_settings_file(path, label):
    """Run const.py in a fresh namespace and return it; errors become ConfigErrors with a line number."""
    try:
        source = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such settings file (pass the path of your const.py, or run where it is)") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a folder, not a settings file (pass the path of const.py itself)") from None
    except OSError as error:
        raise ConfigError(f"{label}: cannot be read: {_one_line(error.strerror or error)} (check its permissions)") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as error:
        raise ConfigError(
            f"{label}:{error.lineno}: invalid Python: {_one_line(error.msg)} (fix the syntax on line {error.lineno})"
        ) from None
    except ValueError as error:
        raise ConfigError(f"{label}: cannot be compiled: {_one_line(error)} (save it as plain UTF-8 Python)") from None
    namespace = {"__name__": "cflow_settings", "__file__": str(path)}
    try:
        exec(code, namespace)
    except Exception as error:
        lineno = None
        traceback = error.__traceback__
        while traceback is not None:
            if traceback.tb_frame.f_code.co_filename == str(path):
                lineno = traceback.tb_lineno
            traceback = traceback.tb_next
        where = f"{label}:{lineno}" if lineno else label
        raise ConfigError(
            f"{where}: {type(error).__name__}: {_one_line(error)} (const.py must run as plain Python; fix that line)"
        ) from None
    return namespace


def load_config(path, overrides=None):
    """Load, check and freeze the settings in const.py.

    Args:
        path: const.py's path (str or Path). Relative paths inside it (TASKS,
            CREDENTIAL_FILE, TASK_MODULE_CMD's script, RESULT_DIR) resolve
            against its directory.
        overrides: optional dict FIELD -> value from command-line flags
            (e.g. ``{"WORKER_NODE_CNT": 10, "TARGET": "gcp"}``); None values
            are skipped so unset flags can be passed straight through. They
            are checked like the file's values; file paths given here should
            be absolute, since relative ones resolve against const.py's folder.
    Returns:
        A frozen ``Config``.
    Raises:
        ConfigError: the file is missing, does not run, names an unknown
            setting, or a value is invalid; one line naming file and field.
    """
    label = os.fspath(path)
    config_path = Path(path).absolute()
    base_dir = config_path.parent
    namespace = _run_settings_file(config_path, label)

    raw = dict(DEFAULTS)
    for name, value in namespace.items():
        if name.startswith("_") or not name.isupper():
            continue
        if name not in DEFAULTS:
            raise _unknown_name_error(label, name, from_command_line=False)
        raw[name] = value
    overridden = set()
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in DEFAULTS:
            raise _unknown_name_error(label, name, from_command_line=True)
        raw[name] = value
        overridden.add(name)

    fields = _check_all(_Checker(label, base_dir, overridden), raw)
    return Config(config_path=config_path, base_dir=base_dir, **fields)
