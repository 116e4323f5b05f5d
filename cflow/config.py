"""const.py -> a validated, frozen ``Config``; every setting is declared once, here.

``load_config(path, overrides)`` runs the user's const.py in a fresh namespace
(it is the user's file, not part of the package), takes its UPPERCASE names,
applies command-line overrides, checks every setting and returns a ``Config``.
Every problem is a ``ConfigError`` whose message is one line naming the file
and the setting, what is wrong and how to fix it.

Where things live:

- ``Config``: the table of settings. Each setting is one field declared with
  ``setting(default, help, check)``; the field's order is the order settings
  are checked in (and the order of the shipped const.py). ``SETTINGS`` (the
  table as ``Setting`` objects), ``DEFAULTS``, the unknown-name suggestions
  and ``Config.to_dict()`` all come from these fields.
- Checks: ``Checker`` runs them and raises the one-line error; generic ones
  (``_one_of``, ``_positive_int``, ``_boolean``) and one ``_check_*`` function
  per setting that needs its own; "Checks that read other settings" holds
  every cross-field rule (e.g. VM_BOOT = "image" needs VM_IMAGE_NAME).
- Zones: ``cflow.zones`` (shared with the local Compute emulator).

How to add a setting:

1. Add a field to ``Config`` where it belongs among the others::

       max_run_hours: float = setting(24, "hours after which GCE deletes a worker", _check_max_run_hours)

   The field name is the setting's name in lowercase; its type is the type of
   the checked value. The check is ``check(checker, name, value)``: it returns
   the value as Config holds it, or calls ``checker.fail(name, problem, fix)``.
   A check that needs another setting reads its checked value with
   ``checker.earlier("OTHER")`` (only settings declared above it can be read,
   so errors come in const.py's order); put it under "Checks that read other
   settings".
2. Add the setting to the shipped const.py, with the same default and a
   comment saying what it means (tests/unit/test_config.py holds the two to
   each other).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import re
import shlex
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar, dataclass_transform

from cflow.errors import ConfigError
from cflow.local import LOCAL_PROJECT
from cflow.zones import KNOWN_ZONES, region_of

logger = logging.getLogger(__name__)

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

GCE_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Shared VPC: a network or subnetwork of another (host) project, by its path.
NETWORK_PATH_RE = re.compile(r"projects/(?P<project>[a-z][-a-z0-9.:]*[a-z0-9])/global/networks/(?P<name>[a-z]([-a-z0-9]*[a-z0-9])?)")
SUBNETWORK_PATH_RE = re.compile(
    r"projects/(?P<project>[a-z][-a-z0-9.:]*[a-z0-9])/regions/(?P<region>[a-z]+(-[a-z]+)*[0-9]+)/subnetworks/(?P<name>[a-z]([-a-z0-9]*[a-z0-9])?)"
)
# GCE's bounds on scheduling.maxRunDuration: 30 seconds to 120 days.
MIN_RUN_HOURS, MAX_RUN_HOURS = 30 / 3600, 120 * 24
ZONE_RE = re.compile(r"[a-z]+(-[a-z]+)*[0-9]+-[a-z]")
PROJECT_ID_RE = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
MACHINE_TYPE_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+")
# An accelerator type as `gcloud compute accelerator-types list` names it, e.g. "nvidia-tesla-t4".
GPU_TYPE_RE = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+")
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


# ---------------------------------------------------------------- helpers other modules use


def split_gcs_url(url: str) -> tuple[str, str]:
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


def bucket_name_problem(name: object) -> str | None:
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


def args_problem(args: Iterable[object]) -> str | None:
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


def _project_for(target: str, project_name: str | None) -> str | None:
    """The project a run uses: ``LOCAL_PROJECT`` for the local target, else PROJECT_NAME."""
    return LOCAL_PROJECT if target == "local" else project_name


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# ---------------------------------------------------------------- the checker


class Checker:
    """Runs every setting's check in declaration order; the first problem raises.

    Args:
        label: the settings file as the user named it, for messages.
        base_dir: the directory of const.py; relative paths resolve against it.
        overridden: names of settings that came from the command line.
    """

    def __init__(self, label: str, base_dir: Path, overridden: Collection[str]) -> None:
        self.label = label
        self.base_dir = base_dir
        self.overridden = overridden
        self._checked: dict[str, Any] = {}

    def fail(self, name: str, problem: str, fix: str) -> NoReturn:
        """Raise the one-line error about setting ``name``.

        Args:
            name: the setting, e.g. ``"VM_ZONE"``.
            problem: what is wrong, phrased to follow the name ("must be ...").
            fix: how to fix it; shown in parentheses at the end.
        Raises:
            ConfigError: always.
        """
        where = f"{name} (from the command line)" if name in self.overridden else name
        raise ConfigError(f"{self.label}: {where} {problem} ({fix})")

    def earlier(self, name: str) -> Any:
        """The checked value of a setting declared above the one being checked.

        Raises:
            LookupError: ``name`` is not checked yet; a check may only read
                settings declared above its own (a bug in this module).
        """
        if name not in self._checked:
            raise LookupError(f"a setting's check read {name}, which is not declared above it in Config")
        return self._checked[name]

    def check_all(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Check every setting of ``raw`` (NAME -> value as written).

        Returns:
            NAME -> the value as ``Config`` holds it, for every setting.
        Raises:
            ConfigError: the first setting, in declaration order, that is invalid.
        """
        for declared in SETTINGS:
            self._checked[declared.name] = declared.check(self, declared.name, raw[declared.name])
        return dict(self._checked)


# A setting's check: ``check(checker, name, value)`` returns the value as
# Config holds it, or calls ``checker.fail``.
SettingCheck = Callable[[Checker, str, Any], Any]


# ---------------------------------------------------------------- generic checks


def _one_of(choices: tuple[str, ...]) -> SettingCheck:
    """A check that the value is one of ``choices``."""

    def check(checker: Checker, name: str, value: Any) -> Any:
        if value not in choices:
            options = " or ".join(repr(choice) for choice in choices)
            checker.fail(name, f"must be {options}, got {_short_repr(value)}", f"set it to {options}")
        return value

    return check


def _positive_int(fix: str, minimum: int = 1, maximum: int | None = None) -> SettingCheck:
    """A check that the value is an integer from ``minimum`` to ``maximum`` (None: no upper bound)."""

    def check(checker: Checker, name: str, value: Any) -> Any:
        in_range = _is_int(value) and value >= minimum and (maximum is None or value <= maximum)
        if not in_range:
            if maximum is not None:
                wanted = f"an integer from {minimum} to {maximum}"
            elif minimum == 1:
                wanted = "a positive integer"
            else:
                wanted = f"an integer of at least {minimum}"
            checker.fail(name, f"must be {wanted}, got {_short_repr(value)}", fix)
        return value

    return check


def _boolean(fix: str) -> SettingCheck:
    """A check that the value is True or False."""

    def check(checker: Checker, name: str, value: Any) -> Any:
        if not isinstance(value, bool):
            checker.fail(name, f"must be True or False, got {_short_repr(value)}", fix)
        return value

    return check


# ---------------------------------------------------------------- checks of one setting


def _script_in_command(argv: tuple[str, ...]) -> tuple[str | None, bool]:
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


def _check_task_command(checker: Checker, name: str, value: Any) -> tuple[str, ...]:
    fix = "set it to the command that runs your task, e.g. 'bash task/task.sh'"
    if isinstance(value, str):
        try:
            argv = shlex.split(value, comments=False, posix=True)
        except ValueError as error:
            checker.fail(name, f"cannot be split into arguments ({error}): {_short_repr(value)}", fix)
    elif isinstance(value, (list, tuple)) and all(isinstance(arg, str) for arg in value):
        argv = list(value)
    else:
        checker.fail(name, f"must be a string or a list of strings, got {_short_repr(value)}", fix)
    if not argv:
        checker.fail(name, "is empty", fix)
    problem = args_problem(argv)
    if problem:
        checker.fail(name, problem, fix)

    script, must_be_executable = _script_in_command(tuple(argv))
    if script is not None:
        path = checker.base_dir / script
        inside_task_dir = os.path.normpath(path).startswith(os.path.normpath(checker.base_dir / TASK_DIR) + os.sep)
        if not inside_task_dir:
            checker.fail(
                name,
                f"runs {script}, which is outside {TASK_DIR}/, the only folder sent to the workers",
                f"move the script into {TASK_DIR}/ and point TASK_MODULE_CMD at it",
            )
        if not path.is_file():
            checker.fail(
                name,
                f"runs {script}, which does not exist in {checker.base_dir}",
                f"create {script}, or fix the path (it is relative to the directory of const.py)",
            )
        if must_be_executable and not os.access(path, os.X_OK):
            checker.fail(
                name,
                f"runs {script} directly, but it is not executable",
                f"run `chmod +x {script}`, or start the command with its interpreter, e.g. 'bash {script}'",
            )
    return tuple(argv)


def _check_tasks(checker: Checker, name: str, value: Any) -> str | tuple[tuple[str, ...], ...]:
    fix = "set TASKS to a tasks file such as 'tasks.txt', a list of items, or 'gs://BUCKET/PREFIX/'"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value.startswith("gs://"):
            try:
                bucket, _ = split_gcs_url(value)
            except ValueError:
                checker.fail(name, f"is a gs:// URL with no bucket: {value!r}", "write it as 'gs://BUCKET/PREFIX/'")
            problem = bucket_name_problem(bucket)
            if problem:
                checker.fail(name, f"names bucket {bucket!r}, which {problem}", "fix the bucket name in the gs:// URL")
            return value
        if not value:
            checker.fail(name, "is an empty string", fix)
        path = checker.base_dir / value
        if not path.is_file():
            checker.fail(
                name,
                f"names the tasks file {value}, which does not exist in {checker.base_dir}",
                "create it (one item per line) or fix the path, which is relative to the directory of const.py",
            )
        return value
    if not isinstance(value, (list, tuple)):
        checker.fail(name, f"must be a file path, a gs:// prefix or a list of items, got {_short_repr(value)}", fix)
    items = []
    for position, item in enumerate(value):
        where = f"item {position} ({_short_repr(item, 40)})"
        if isinstance(item, str):
            try:
                args = shlex.split(item, comments=False, posix=True)
            except ValueError as error:
                checker.fail(name, f"{where} cannot be split into fields: {error}", "balance its quotes")
        elif isinstance(item, (list, tuple)) and all(isinstance(arg, str) for arg in item):
            args = list(item)
        else:
            checker.fail(name, f"{where} must be a string or a list of strings", fix)
        problem = args_problem(args)
        if problem:
            checker.fail(name, f"{where} {problem}", "remove that character")
        items.append(tuple(args))
    return tuple(items)


def _check_task_timeout(checker: Checker, name: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        checker.fail(name, f"must be a positive number of seconds, got {_short_repr(value)}", "set it to e.g. 3600")
    return value


def _check_result_dir(checker: Checker, name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        checker.fail(name, f"must be a folder path, got {_short_repr(value)}", "set it to e.g. 'output'")
    return checker.base_dir / value


def _check_vm_name_prefix(checker: Checker, name: str, value: Any) -> str:
    if not isinstance(value, str) or not GCE_NAME_RE.fullmatch(value) or len(value) > MAX_VM_NAME_PREFIX:
        checker.fail(
            name,
            f"must be lowercase letters, digits and '-', start with a letter, not end with '-', "
            f"and be at most {MAX_VM_NAME_PREFIX} characters, got {_short_repr(value)}",
            f"use e.g. {DEFAULTS[name]!r}",
        )
    return value


def _check_vm_type(checker: Checker, name: str, value: Any) -> str:
    if not isinstance(value, str) or not MACHINE_TYPE_RE.fullmatch(value):
        checker.fail(name, f"must be a machine type like 'e2-standard-2', got {_short_repr(value)}", "pick one from the Compute Engine machine types")
    return value


def _check_gpu_type(checker: Checker, name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not GPU_TYPE_RE.fullmatch(value) or len(value) > 63:
        checker.fail(
            name,
            f"must be None or an accelerator type like 'nvidia-tesla-t4', got {_short_repr(value)}",
            "pick one from `gcloud compute accelerator-types list`, or None for workers without a GPU",
        )
    return value


def _check_stock_image(checker: Checker, name: str, value: Any) -> str:
    if not isinstance(value, str) or not IMAGE_PATH_RE.fullmatch(value):
        checker.fail(
            name,
            f"must look like 'projects/PROJECT/global/images/family/FAMILY', got {_short_repr(value)}",
            f"use e.g. {DEFAULTS[name]!r}",
        )
    return value


def _check_service_account(checker: Checker, name: str, value: Any) -> str:
    if value != "default" and not (isinstance(value, str) and EMAIL_RE.fullmatch(value)):
        checker.fail(
            name,
            f"must be 'default' or a service account email, got {_short_repr(value)}",
            "use 'default' or NAME@PROJECT.iam.gserviceaccount.com",
        )
    return value


def _check_labels(checker: Checker, name: str, value: Any) -> types.MappingProxyType[str, str]:
    fix = "use lowercase keys and values of letters, digits, '-' and '_', e.g. {'team': 'research'}"
    if not isinstance(value, dict):
        checker.fail(name, f"must be a dict, got {_short_repr(value)}", fix)
    if len(value) > MAX_USER_LABELS:
        checker.fail(name, f"has {len(value)} labels, more than {MAX_USER_LABELS}", "drop some labels")
    for key, label_value in value.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.fullmatch(key):
            checker.fail(name, f"has an invalid key {_short_repr(key)}", fix)
        if key.startswith(RESERVED_LABEL_PREFIX):
            checker.fail(name, f"has key {key!r}; keys starting with {RESERVED_LABEL_PREFIX!r} are CFlow's own", "rename it")
        if not isinstance(label_value, str) or not LABEL_VALUE_RE.fullmatch(label_value):
            checker.fail(name, f"has an invalid value {_short_repr(label_value)} for key {key!r}", fix)
    return types.MappingProxyType(dict(value))


def _check_pubsub_prefix(checker: Checker, name: str, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not PUBSUB_PREFIX_RE.fullmatch(value)
        or len(value) > MAX_PUBSUB_PREFIX
        or value.lower().startswith("goog")
    ):
        checker.fail(
            name,
            f"must start with a letter, hold only letters, digits and -._~%+, not start with 'goog', "
            f"and be at most {MAX_PUBSUB_PREFIX} characters, got {_short_repr(value)}",
            f"use letters, digits and '-', e.g. {DEFAULTS[name]!r}",
        )
    return value


def _check_credential_file(checker: Checker, name: str, value: Any) -> Path | None:
    if value is None:
        return None
    fix = f"put the key file in {CREDENTIAL_DIR}/ and set CREDENTIAL_FILE = '{CREDENTIAL_DIR}/KEY.json', or None"
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        checker.fail(name, f"must be None or a path, got {_short_repr(value)}", fix)
    path = (checker.base_dir / value).resolve()
    credential_dir = (checker.base_dir / CREDENTIAL_DIR).resolve()
    if not path.is_relative_to(credential_dir) or path == credential_dir:
        checker.fail(name, f"is {os.fspath(value)}, which is not a file in {CREDENTIAL_DIR}/", fix)
    if not path.is_file():
        checker.fail(name, f"is {os.fspath(value)}, which does not exist", fix)
    return path


def _check_prices(checker: Checker, name: str, value: Any) -> types.MappingProxyType[str, types.MappingProxyType[str, float]]:
    fix = "write it as {'e2-standard-2': {'standard': 0.067, 'spot': 0.020}, ...} in USD per hour"
    if not isinstance(value, dict):
        checker.fail(name, f"must be a dict, got {_short_repr(value)}", fix)
    prices = {}
    for vm_type, entry in value.items():
        if not isinstance(vm_type, str) or not isinstance(entry, dict) or set(entry) != {"standard", "spot"}:
            checker.fail(name, f"entry {_short_repr(vm_type)} must map a machine type to {{'standard': X, 'spot': Y}}", fix)
        for kind, price in entry.items():
            if not _is_number(price) or price < 0:
                checker.fail(name, f"entry {vm_type!r} has {kind} price {_short_repr(price)}, not a non-negative number", fix)
        prices[vm_type] = types.MappingProxyType(dict(entry))
    return types.MappingProxyType(prices)


def _check_preemptions_before_standard(checker: Checker, name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        checker.fail(name, f"must be None or a positive integer, got {_short_repr(value)}",
                     "set it to how many preemptions move an item to a standard VM, e.g. 3, or None for never")
    return int(value)


def _check_stockout_fallback_minutes(checker: Checker, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or value < 0:
        checker.fail(name, f"must be None or a number of minutes of at least 0, got {_short_repr(value)}",
                     "set it to e.g. 10, or None to wait for Spot capacity however long it takes")
    return float(value)


# ---------------------------------------------------------------- checks that read other settings
#
# Every rule that involves more than one setting lives here. Each is the check
# of the setting its error names and reads the others with checker.earlier(),
# so it runs, and reports, at that setting's place in const.py's order.


def _check_project_name(checker: Checker, name: str, value: Any) -> str | None:
    """PROJECT_NAME: required, and a real project id, when TARGET is 'gcp'."""
    if checker.earlier("TARGET") == "gcp":
        if value is None:
            checker.fail(name, "is not set, and TARGET is 'gcp'", "set it to your GCP project id, or use TARGET = 'local'")
        if not isinstance(value, str) or not PROJECT_ID_RE.fullmatch(value):
            checker.fail(
                name,
                f"must be a GCP project id (6-30 lowercase letters, digits and '-'), got {_short_repr(value)}",
                "copy the project id from the Cloud console",
            )
    elif value is not None and not isinstance(value, str):
        checker.fail(name, f"must be None or a project id string, got {_short_repr(value)}", "fix its value")
    return value


def _check_bucket(checker: Checker, name: str, value: Any) -> str:
    """BUCKET: None stands for PROJECT-cflow, the project following TARGET and PROJECT_NAME."""
    if value is None:
        value = f"{_project_for(checker.earlier('TARGET'), checker.earlier('PROJECT_NAME'))}-cflow"
    problem = bucket_name_problem(value)
    if problem:
        checker.fail(name, f"{problem}, got {_short_repr(value)}", "use a valid bucket name, or None for PROJECT-cflow")
    return value


def _check_one_zone(checker: Checker, name: str, value: Any) -> str:
    """A zone must be well-formed; a local run accepts only the zones the local cloud serves."""
    fix = f"use a zone such as {DEFAULTS['VM_ZONE']!r}"
    if not isinstance(value, str) or not ZONE_RE.fullmatch(value):
        checker.fail(name, f"must be a Compute Engine zone like 'us-central1-a', got {_short_repr(value)}", fix)
    if value not in KNOWN_ZONES:
        if checker.earlier("TARGET") == "local":
            import difflib  # only on this error path: workers import this module and never need it

            close = difflib.get_close_matches(value, KNOWN_ZONES, n=1)
            suggestion = f"did you mean {close[0]!r}? " if close else ""
            checker.fail(
                name,
                f"is {value!r}, which the local cloud does not serve",
                f"{suggestion}the local cloud serves {', '.join(KNOWN_ZONES)}",
            )
        logger.debug("zone %s is not in CFlow's list of known zones; using it as given", value)
    return value


def _check_fallback_zones(checker: Checker, name: str, value: Any) -> tuple[str, ...]:
    """VM_FALLBACK_ZONES: zones as for VM_ZONE, none listed twice, VM_ZONE included."""
    if not isinstance(value, (list, tuple)):
        checker.fail(name, f"must be a list of zones, got {_short_repr(value)}", "write it as ['us-central1-b', ...] or []")
    seen = {checker.earlier("VM_ZONE")}
    for zone in value:
        _check_one_zone(checker, name, zone)
        if zone in seen:
            checker.fail(name, f"lists {zone!r} twice (VM_ZONE counts too)", "remove the repeat")
        seen.add(zone)
    return tuple(value)


def _check_network(checker: Checker, name: str, value: Any) -> str:
    if not isinstance(value, str) or not (
        (GCE_NAME_RE.fullmatch(value) and len(value) <= 63) or NETWORK_PATH_RE.fullmatch(value)
    ):
        checker.fail(
            name,
            f"must be a VPC network's name, or 'projects/HOST_PROJECT/global/networks/NAME' for a Shared VPC, got {_short_repr(value)}",
            "use e.g. 'default'; `gcloud compute networks list` shows yours",
        )
    return value


def _check_max_run_hours(checker: Checker, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not MIN_RUN_HOURS <= value <= MAX_RUN_HOURS:
        checker.fail(
            name,
            f"must be a number of hours from {MIN_RUN_HOURS:.4f} (30 s) to {MAX_RUN_HOURS} (120 days, GCE's limit), got {_short_repr(value)}",
            "set it to more than a worker ever needs, e.g. 24",
        )
    return float(value)


def _check_subnetwork(checker: Checker, name: str, value: Any) -> str | None:
    """VM_SUBNETWORK: a subnetwork is regional, so every zone of the run must be in its region."""
    if value is None:
        return None
    fix = "set it to a subnetwork of VM_NETWORK in the zones' region (`gcloud compute networks subnets list`), or None"
    path = SUBNETWORK_PATH_RE.fullmatch(value) if isinstance(value, str) else None
    if not isinstance(value, str) or not (path or (GCE_NAME_RE.fullmatch(value) and len(value) <= 63)):
        checker.fail(
            name,
            f"must be a subnetwork's name, or 'projects/HOST_PROJECT/regions/REGION/subnetworks/NAME', got {_short_repr(value)}",
            fix,
        )
    zones = (checker.earlier("VM_ZONE"), *checker.earlier("VM_FALLBACK_ZONES"))
    regions = sorted({region_of(zone) for zone in zones})
    if path and regions != [path.group("region")]:
        checker.fail(
            name,
            f"is in region {path.group('region')}, but the zones (VM_ZONE, VM_FALLBACK_ZONES) are in {', '.join(regions)}",
            f"pick zones in {path.group('region')}, or a subnetwork in theirs",
        )
    if len(regions) > 1:
        checker.fail(
            name,
            f"is one region's subnetwork, but the zones (VM_ZONE, VM_FALLBACK_ZONES) span {', '.join(regions)}",
            "keep the zones in one region, or set VM_SUBNETWORK = None to use the network's subnetwork in each",
        )
    return value


def _check_gpu_count(checker: Checker, name: str, value: Any) -> int:
    """VM_GPU_COUNT: a positive number of cards; more than the default means nothing without VM_GPU_TYPE."""
    if not _is_int(value) or value < 1:
        checker.fail(name, f"must be a positive integer, got {_short_repr(value)}", "set it to the number of GPUs per worker, e.g. 1")
    if value != DEFAULTS[name] and checker.earlier("VM_GPU_TYPE") is None:
        checker.fail(
            name,
            f"is {value}, but VM_GPU_TYPE is None, so the workers get no GPU",
            "set VM_GPU_TYPE, e.g. 'nvidia-tesla-t4', or leave VM_GPU_COUNT at 1",
        )
    return value


def _check_image_name(checker: Checker, name: str, value: Any) -> str | None:
    """VM_IMAGE_NAME: required when VM_BOOT is 'image'; when set, an image name or 'family/NAME'."""
    if value is None and checker.earlier("VM_BOOT") != "image":
        return None
    fix = "set it to your image's name, or 'family/NAME' for the newest image of a family"
    if value is None:
        checker.fail(name, "is not set, and VM_BOOT is 'image'", fix + ", or use VM_BOOT = 'stock'")
    if not isinstance(value, str) or not (
        IMAGE_PATH_RE.fullmatch(value)
        or (GCE_NAME_RE.fullmatch(value.removeprefix("family/")) and len(value.removeprefix("family/")) <= 63)
    ):
        checker.fail(name, f"is not an image name or 'family/NAME': {_short_repr(value)}", fix)
    return value


def _check_max_cost(checker: Checker, name: str, value: Any) -> float | None:
    """MAX_COST_USD: a positive number of dollars, and PRICES must price VM_TYPE and VM_GPU_TYPE (the cap is counted from them)."""
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        checker.fail(name, f"must be None or a positive number of US dollars, got {_short_repr(value)}", "set it to e.g. 20.0, or None for no cap")
    vm_type = checker.earlier("VM_TYPE")
    if vm_type not in checker.earlier("PRICES"):
        checker.fail(name, f"is set, but PRICES has no price for VM_TYPE {vm_type!r}, so the cost cannot be counted",
                     f"add {vm_type!r} to PRICES, or set MAX_COST_USD = None")
    gpu_type = checker.earlier("VM_GPU_TYPE")
    if gpu_type is not None and gpu_type not in checker.earlier("PRICES"):
        checker.fail(name, f"is set, but PRICES has no price for VM_GPU_TYPE {gpu_type!r}, so the cost cannot be counted",
                     f"add {gpu_type!r} to PRICES, or set MAX_COST_USD = None")
    return float(value)


# ---------------------------------------------------------------- the table of settings


class Setting(NamedTuple):
    """One setting of const.py, as declared by a ``Config`` field.

    A NamedTuple rather than a frozen dataclass because defining it costs a
    fraction at import time, which every worker pays too.

    Attributes:
        name: the name in const.py, e.g. ``"WORKER_NODE_CNT"``.
        default: the value when const.py does not set it, as a user would
            write it; the shipped const.py spells out the same value.
        help: what the setting means, in one line.
        check: ``check(checker, name, value)``, which returns the value as
            ``Config`` holds it or raises through ``checker.fail``.
    """

    name: str
    default: Any
    help: str
    check: SettingCheck

    @property
    def attribute(self) -> str:
        """The ``Config`` attribute the setting fills: its name in lowercase."""
        return self.name.lower()


_SETTING_KEY = "cflow_setting"


def setting(default: Any, help: str, check: SettingCheck) -> Any:
    """Declare a ``Config`` field as a setting of const.py (see the module docstring).

    Args:
        default: the value when const.py does not set it, as a user would write it.
        help: what the setting means, in one line.
        check: ``check(checker, name, value)`` -> the value as Config holds it.
    Returns:
        A dataclass field with no dataclass default: ``load_config`` fills every field.
    """
    return dataclasses.field(metadata={_SETTING_KEY: (default, help, check)})


_ConfigClass = TypeVar("_ConfigClass")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(setting,))
def _settings_table(cls: type[_ConfigClass]) -> type[_ConfigClass]:
    """Make ``cls`` a frozen, keyword-only dataclass whose ``setting()`` fields are the settings.

    A plain ``@dataclass`` would do at run time; ``dataclass_transform`` tells
    type checkers and linters that ``setting()`` declares a field with no
    default, rather than being a default value itself.
    """
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


# ESTIMATE ONLY: rough us-central1 on-demand and Spot USD per VM-hour (and per GPU-hour), the PRICES default.
_DEFAULT_PRICES = {
    "e2-micro": {"standard": 0.0084, "spot": 0.0025},
    "e2-small": {"standard": 0.0168, "spot": 0.0050},
    "e2-medium": {"standard": 0.0335, "spot": 0.0101},
    "e2-standard-2": {"standard": 0.067, "spot": 0.020},
    "e2-standard-4": {"standard": 0.134, "spot": 0.040},
    "e2-standard-8": {"standard": 0.268, "spot": 0.080},
    "n2-standard-2": {"standard": 0.097, "spot": 0.029},
    "n2-standard-4": {"standard": 0.194, "spot": 0.058},
    "c2-standard-4": {"standard": 0.209, "spot": 0.063},
    "n1-standard-1": {"standard": 0.0475, "spot": 0.0100},
    "n1-standard-2": {"standard": 0.095, "spot": 0.020},
    "n1-standard-4": {"standard": 0.190, "spot": 0.040},
    "n1-standard-8": {"standard": 0.380, "spot": 0.080},
    # GPUs, USD per GPU-hour (a worker pays its machine type plus VM_GPU_COUNT of these): us-central1
    # list prices of cloud.google.com/compute/gpus-pricing as of 2024; Spot GPU prices change monthly.
    "nvidia-tesla-t4": {"standard": 0.35, "spot": 0.11},
    "nvidia-tesla-p4": {"standard": 0.60, "spot": 0.216},
    "nvidia-tesla-p100": {"standard": 1.46, "spot": 0.43},
    "nvidia-tesla-v100": {"standard": 2.48, "spot": 0.74},
}


@_settings_table
class Config:
    """One run's validated settings, and the table that declares every setting.

    Each ``setting(...)`` field is one setting of const.py (see const.py for
    what each means); the last two fields say where const.py is. Paths are
    absolute. ``tasks`` is the TASKS value normalised: a file path string as
    written (see ``tasks_file``), a ``gs://`` prefix string, or a tuple of
    items, each a tuple of argument strings. Mappings are read-only.
    """

    # Where to run.
    target: str = setting("local", "where the run goes: 'local' (the cloud in a box) or 'gcp'", _one_of(TARGETS))
    project_name: str | None = setting(None, "your GCP project id; required for TARGET = 'gcp', ignored locally", _check_project_name)
    bucket: str = setting(None, "Cloud Storage bucket for the run's package, outputs, logs and done markers; None: PROJECT-cflow", _check_bucket)
    # The work.
    task_module_cmd: tuple[str, ...] = setting(
        "bash task/task.sh", "the command run once per item, the item's fields appended; its script must be under task/", _check_task_command
    )
    tasks: str | tuple[tuple[str, ...], ...] = setting(
        "tasks.txt", "the work items: a tasks file, a list of items, or 'gs://BUCKET/PREFIX/' (one item per object)", _check_tasks
    )
    stage_inputs: bool = setting(
        False, "True: item fields that are gs:// objects are downloaded before the task and passed as local paths; "
        "False (default): fields reach the task as written",
        _boolean("True to download the items' gs:// objects before each task, False to pass fields as written"),
    )
    max_attempts: int = setting(
        3, "failed attempts before an item is recorded as failed; preemptions never count",
        _positive_int("set it to how many failed attempts an item gets, e.g. 3"),
    )
    task_timeout: float = setting(3600, "seconds one attempt may run before it is killed and counts as failed", _check_task_timeout)
    combine: str = setting("concat", "'concat' joins each output file across items in item order; 'none' keeps outputs per item", _one_of(COMBINE_MODES))
    result_dir: Path = setting("output", "folder on the controller for the combined result, one subfolder per run", _check_result_dir)
    combine_download: bool = setting(
        True, "True: download each combined file into RESULT_DIR/RUN_ID; False: leave it in the bucket's combined/ folder",
        _boolean("True to download the combined files, False to leave them in the bucket"),
    )
    # The workers.
    worker_node_cnt: int = setting(5, "number of worker VMs (fewer when fewer items are left)", _positive_int("set it to the number of worker VMs"))
    vm_name_prefix: str = setting("cflow-worker", "workers are named PREFIX-RUNID-N", _check_vm_name_prefix)
    vm_type: str = setting("e2-standard-2", "machine type of each worker", _check_vm_type)
    vm_gpu_type: str | None = setting(
        None, "GPU type of each worker, e.g. 'nvidia-tesla-t4' (an N1 VM_TYPE); None: no GPU", _check_gpu_type
    )
    vm_gpu_count: int = setting(1, "GPUs of VM_GPU_TYPE per worker (only with VM_GPU_TYPE)", _check_gpu_count)
    vm_zone: str = setting("us-central1-a", "zone of the workers", _check_one_zone)
    vm_fallback_zones: tuple[str, ...] = setting(
        ["us-central1-b", "us-central1-c", "us-central1-f"], "zones tried in order when VM_ZONE has no capacity left", _check_fallback_zones
    )
    vm_spot: bool = setting(
        True, "True: Spot VMs (cheaper, may be preempted; nothing is lost); False: standard VMs",
        _boolean("True for Spot VMs, False for standard VMs"),
    )
    vm_boot: str = setting("stock", "'stock' boots VM_STOCK_IMAGE and installs at boot; 'image' boots VM_IMAGE_NAME", _one_of(VM_BOOT_MODES))
    vm_stock_image: str = setting(
        "projects/debian-cloud/global/images/family/debian-12", "the public image VM_BOOT = 'stock' boots", _check_stock_image
    )
    vm_image_name: str | None = setting(None, "your image for VM_BOOT = 'image': a name in PROJECT_NAME, or 'family/NAME'", _check_image_name)
    vm_disk_gb: int = setting(
        10, "boot disk size of each worker, in GB", _positive_int(f"set it to {MIN_DISK_GB} or more", minimum=MIN_DISK_GB)
    )
    vm_compute_service_account: str = setting(
        "default", "service account the workers run as: 'default' or an email address", _check_service_account
    )
    vm_labels: types.MappingProxyType[str, str] = setting({}, "extra labels on every worker; keys starting with 'cflow-' are CFlow's own", _check_labels)
    vm_network: str = setting("default", "the VPC network of the workers: a name, or 'projects/HOST/global/networks/NAME'", _check_network)
    vm_subnetwork: str | None = setting(
        None, "the workers' subnetwork in the zones' region; None: the network's own subnetwork there", _check_subnetwork
    )
    vm_external_ip: bool = setting(
        True, "True: each worker gets an external IP; False: none (needs Private Google Access or Cloud NAT)",
        _boolean("True for an external IP per worker, False for none"),
    )
    max_run_hours: float | None = setting(
        24, "hours after which GCE deletes a worker even if this controller is gone; None: no limit", _check_max_run_hours
    )
    # Plumbing.
    topic_name: str = setting("cflow-topic", "name prefix of the run's Pub/Sub topic; the run id is appended", _check_pubsub_prefix)
    subscription_name: str = setting("cflow-sub", "name prefix of the run's Pub/Sub subscription; the run id is appended", _check_pubsub_prefix)
    lease_seconds: int = setting(
        60, "seconds a worker holds an item before Pub/Sub redelivers it elsewhere",
        _positive_int(f"Pub/Sub allows {MIN_LEASE_SECONDS} to {MAX_LEASE_SECONDS}", minimum=MIN_LEASE_SECONDS, maximum=MAX_LEASE_SECONDS),
    )
    credential_file: Path | None = setting(
        None, "a service-account key in credential/ for the controller only; None: Application Default Credentials", _check_credential_file
    )
    prices: types.MappingProxyType[str, types.MappingProxyType[str, float]] = setting(
        _DEFAULT_PRICES, "ESTIMATE ONLY: USD per hour by machine type and GPU type, {'standard': X, 'spot': Y}, for the cost shown",
        _check_prices,
    )
    # Spot, then standard; backup tasks; the cost cap.
    spot_preemptions_before_standard: int | None = setting(
        3, "preemptions after which an item moves to a standard VM; None: it stays on Spot however often it is preempted",
        _check_preemptions_before_standard,
    )
    standard_workers_max: int = setting(
        2, "most standard workers for the items moved off Spot; they live only while such items wait or run",
        _positive_int("set it to how many standard VMs may run the items moved off Spot, e.g. 2"),
    )
    spot_stockout_fallback_minutes: float | None = setting(
        None, "minutes every zone may be out of Spot capacity before standard workers are created instead; None: never",
        _check_stockout_fallback_minutes,
    )
    backup_tasks: bool = setting(
        True, "True: once the queue is drained, idle workers run second copies of the slowest items; False for side effects",
        _boolean("True to run backup copies of the slowest items, False if a task must never run twice at once"),
    )
    max_cost_usd: float | None = setting(
        None, "ESTIMATE from PRICES: at this cost the run stops creating, lets running items finish and cancels the rest; None: no cap",
        _check_max_cost,
    )
    # Not settings: where const.py is.
    config_path: Path
    base_dir: Path

    @property
    def is_local(self) -> bool:
        """True when the run goes to the cloud in a box."""
        return self.target == "local"

    @property
    def project(self) -> str:
        """The project the run uses: ``LOCAL_PROJECT`` locally, else PROJECT_NAME (checked to be set on GCP)."""
        project = _project_for(self.target, self.project_name)
        if project is None:  # load_config refuses this; a Config built by hand may not
            raise ConfigError("PROJECT_NAME: not set; TARGET = \"gcp\" needs your project id in const.py")
        return project

    @property
    def zones(self) -> tuple[str, ...]:
        """VM_ZONE then the fallback zones, in the order to try them."""
        return (self.vm_zone, *self.vm_fallback_zones)

    @property
    def tasks_kind(self) -> str:
        """Where the items come from: ``"file"``, ``"list"`` or ``"gcs"``."""
        if isinstance(self.tasks, tuple):
            return "list"
        return "gcs" if self.tasks.startswith("gs://") else "file"

    @property
    def tasks_file(self) -> Path | None:
        """The tasks file's absolute path, or None when TASKS is not a file."""
        if isinstance(self.tasks, tuple) or self.tasks.startswith("gs://"):
            return None
        return self.base_dir / self.tasks

    @property
    def tasks_gcs(self) -> tuple[str, str] | None:
        """``(bucket, prefix)`` of a ``gs://`` TASKS, or None for the other kinds."""
        if isinstance(self.tasks, tuple) or not self.tasks.startswith("gs://"):
            return None
        return split_gcs_url(self.tasks)

    def hourly_price(self, vm_type: str | None = None, spot: bool | None = None) -> float | None:
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

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-safe data (str, numbers, bools, None, lists, dicts), for the run's record."""
        result = {field.name: _json_safe(getattr(self, field.name)) for field in dataclasses.fields(self)}
        result["project"] = self.project
        return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_safe(element) for element in value]
    if isinstance(value, (dict, types.MappingProxyType)):
        return {key: _json_safe(element) for key, element in value.items()}
    return value


# Every setting, in declaration order (the order they are checked in).
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(field.name.upper(), *field.metadata[_SETTING_KEY]) for field in dataclasses.fields(Config) if _SETTING_KEY in field.metadata
)
# NAME -> default, for every setting; the shipped const.py spells out the same values.
DEFAULTS: dict[str, Any] = {declared.name: declared.default for declared in SETTINGS}


# ---------------------------------------------------------------- loading const.py


def _unknown_name_error(label: str, name: str, from_command_line: bool) -> ConfigError:
    import difflib  # only on this error path: workers import this module and never need it

    suggestion = difflib.get_close_matches(name, list(DEFAULTS), n=1, cutoff=0.6)
    hint = f"did you mean {suggestion[0]}?" if suggestion else f"known settings are listed in {label}"
    where = f"{name} (from the command line)" if from_command_line else name
    return ConfigError(f"{label}: {where} is not a CFlow setting; {hint} (fix the name, or start names of your own helpers with _)")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _run_settings_file(path: Path, label: str) -> dict[str, Any]:
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
    namespace: dict[str, Any] = {"__name__": "cflow_settings", "__file__": str(path)}
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


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Config:
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

    checked = Checker(label, base_dir, overridden).check_all(raw)
    return Config(config_path=config_path, base_dir=base_dir, **{declared.attribute: checked[declared.name] for declared in SETTINGS})
