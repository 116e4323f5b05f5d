"""The bucket's layout: the name of every object CFlow keeps in Cloud Storage.

Nothing else spells these paths. Everything of a run lives under
``gs://BUCKET/cflow/runs/RUN_ID/``; the functions below return names
relative to that folder:

    package/package.tar.gz   what workers download at boot (uploaded first)
    items.jsonl              the work items, one JSON object a line (for resume)
    run.json                 the run's settings and item count, written after the
                             package and items.jsonl: a run with run.json has both
    published.json           every unfinished item was published (count, time)
    cancelled.json           the run was cancelled (time); outputs and logs are kept
    outputs/ITEM/NAME        a task's output files; in a run that combines, a
                             CSV's first line is kept apart in the done
                             marker (``cflow.combine.OutputShape``) and the
                             object holds the rest
    logs/ITEM/attempt-N.log  a task's stdout+stderr, one per attempt
    done/ITEM                done marker, created once (the source of truth)
    failed/ITEM              failed marker, created once
    attempts/ITEM/N          attempt N failed and was settled, created once
    timeline/ITEM/N-VM-MS    an attempt that left no marker of its own (handed
                             back, or a duplicate): where and when it ran
    vms.json                 every VM of the run as the scheduler saw it
    scheduler.json           the scheduler's account: VM time by kind and cost, backups,
                             the standard-worker fallback, the cost cap (for status)
    lanes/standard/ITEM      the item was moved to the standard lane (cflow.lanes)
    combined/NAME            the combined result
    combining/NAME/...       the temporaries of combining NAME in the bucket
                             (a header, a newline, a level's joins), deleted
                             when it is done

The done and attempt markers and the timeline records carry their attempt's
span (``cflow.history.AttemptSpan``) as custom metadata, so one listing of
each folder reads every span.

The demo's input shards live beside the runs, under ``gs://BUCKET/cflow/demo/``,
and the stock workers' Python packages under ``gs://BUCKET/cflow/wheelhouse/``
(``wheelhouse``): one archive per set of versions, named by the sha256 of its
bytes, shared by every run (``cflow.wheelhouse``).
"""

import re

RUNS_PREFIX = "cflow/runs/"
DEMO_PREFIX = "cflow/demo/"
WHEELHOUSE_PREFIX = "cflow/wheelhouse/"

PACKAGE = "package/package.tar.gz"
ITEMS = "items.jsonl"
MANIFEST = "run.json"
PUBLISHED = "published.json"
CANCELLED = "cancelled.json"
COMBINED = "combined/"
COMBINING = "combining/"
LOGS = "logs/"
VM_HISTORY = "vms.json"
SCHEDULER_ACCOUNT = "scheduler.json"
LANES = "lanes/"
TIMELINE = "timeline/"
ATTEMPTS = "attempts/"

# Marker kinds: the folder each kind of marker lives in.
DONE = "done"
FAILED = "failed"

LOG_NAME_RE = re.compile(r"attempt-([0-9]+)\.log")
UNSAFE_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9-]")


def run_prefix(run_id: str) -> str:
    """The object-name prefix of a run's folder, e.g. ``cflow/runs/0612-1530-ab12/``."""
    return f"{RUNS_PREFIX}{run_id}/"


def run_url(bucket: str, run_id: str, relative: str = "") -> str:
    """``gs://BUCKET/cflow/runs/RUN_ID/RELATIVE``."""
    return f"gs://{bucket}/{run_prefix(run_id)}{relative}"


def run_id_of_folder(folder: str) -> str:
    """The run id of a folder name listed under ``RUNS_PREFIX`` (``cflow/runs/ID/`` -> ``ID``)."""
    return folder[len(RUNS_PREFIX):].rstrip("/")


def outputs_of(item_id: str) -> str:
    return f"outputs/{item_id}/"


def output(item_id: str, name: str) -> str:
    return f"{outputs_of(item_id)}{name}"


def logs_of(item_id: str) -> str:
    return f"{LOGS}{item_id}/"


def log(item_id: str, attempt: int) -> str:
    return f"{logs_of(item_id)}attempt-{int(attempt)}.log"


def attempt_of_log(name: str | None) -> int | None:
    """The attempt number in a log's name or URL (``.../attempt-3.log`` -> 3), or None for other names."""
    match = LOG_NAME_RE.fullmatch((name or "").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def markers(kind: str) -> str:
    """The folder of one kind of marker (``DONE`` or ``FAILED``)."""
    return f"{kind}/"


def marker(kind: str, item_id: str) -> str:
    return f"{markers(kind)}{item_id}"


def attempt_marker(item_id: str, attempt: int) -> str:
    return f"{ATTEMPTS}{item_id}/{int(attempt)}"


def timeline_record(item_id: str, attempt: int, vm: str, ended: float) -> str:
    """``timeline/ITEM/N-VM-MS``: unique per run of an attempt (the same attempt may run again elsewhere)."""
    # A VM name is a GCE name (letters, digits, -); anything else must not shape the object name.
    return f"{TIMELINE}{item_id}/{int(attempt)}-{UNSAFE_NAME_CHARS_RE.sub('_', vm)}-{int(ended * 1000)}"


def item_of_record(name: str) -> str:
    """The item id in a name relative to a folder of per-item records (``ITEM/N...`` or ``ITEM``)."""
    return name.split("/", 1)[0]


def lane_markers(lane: str) -> str:
    """The folder of the markers of the items moved to ``lane`` (``lanes/standard/``)."""
    return f"{LANES}{lane}/"


def lane_marker(lane: str, item_id: str) -> str:
    return f"{lane_markers(lane)}{item_id}"


def combined(name: str) -> str:
    return f"{COMBINED}{name}"


def combining_piece(name: str, kind: str) -> str:
    """A temporary piece of combining ``name`` in the bucket: its ``header``, or the ``newline`` between copies."""
    return f"{COMBINING}{name}/{kind}"


def combining_part(name: str, level: int, index: int) -> str:
    """A temporary join of combining ``name``: the ``index``-th of tree level ``level`` (1 joins the sources)."""
    return f"{COMBINING}{name}/{int(level)}-{int(index):06d}"


def demo_object(name: str) -> str:
    """The object name of a demo input (``shards/part-007.csv`` -> ``cflow/demo/shards/part-007.csv``)."""
    return f"{DEMO_PREFIX}{name}"


def wheelhouse(sha256: str) -> str:
    """The object name of the workers' wheelhouse whose bytes have this sha256: ``cflow/wheelhouse/SHA256.tar``.

    Raises:
        ValueError: ``sha256`` is not 64 hex digits (it must not shape the name otherwise).
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"{sha256!r} is not a sha256 in hex")
    return f"{WHEELHOUSE_PREFIX}{sha256}.tar"
