"""`cflow status|logs|cancel|combine|list|report` against the local stack, on runs seeded straight into Cloud Storage.

The last part runs them on a stack folder whose stack is not running, as after a local run ended.
"""

import io
import re
import time
import uuid
from pathlib import Path

import pytest
from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials

from cflow import cli
from cflow.errors import EXIT_INTERRUPTED
from cflow.gcp import layout
from cflow.gcp.clients import build_local_compute
from cflow.gcp.compute import Compute
from cflow.gcp.pubsub import PubSub, RunTopics
from cflow.gcp.storage import RunStorage
from cflow.ops import logs as ops_logs
from cflow.ops.text import format_time
from cflow.tasks import make_items
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

VM_DEADLINE_S = 60


@pytest.fixture
def stack_env(local_stack, monkeypatch):
    """Point the Google clients at the stack; monkeypatch puts os.environ back, also what the commands set."""
    for name, value in local_stack.env().items():
        monkeypatch.setenv(name, value)
    return local_stack


@pytest.fixture
def storage_client(stack_env):
    from google.cloud import storage

    return storage.Client(project=stack_env.project, credentials=AnonymousCredentials())


@pytest.fixture
def bucket(storage_client):
    name = f"ops-{uuid.uuid4().hex[:12]}"
    storage_client.create_bucket(name)
    return name


def write_const(folder, bucket_name):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "const.py"
    path.write_text(
        f'TARGET = "local"\nBUCKET = "{bucket_name}"\nTASK_MODULE_CMD = "echo hi"\nTASKS = ["a"]\nRESULT_DIR = "output"\n'
    )
    return path


@pytest.fixture
def const_py(tmp_path, bucket):
    return write_const(tmp_path, bucket)


@pytest.fixture
def cflow(const_py, stack_env, capsys):
    """Run `cflow ARGS --config const.py --stack-dir STACK`; returns (exit status, stdout, stderr)."""

    def run(*args):
        status = cli.main([*args, "--config", str(const_py), "--stack-dir", stack_env.dir])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


class SeededRun:
    """A run written into the bucket the way `cflow run` and its workers write one."""

    def __init__(self, storage_client, bucket_name, run_id, count, created, topics=None):
        self.storage = RunStorage(storage_client, bucket_name, run_id)
        self.run_id = run_id
        self.items = make_items([[f"arg{index}"] for index in range(count)])
        manifest = {"run_id": run_id, "created": created, "item_count": count, "bucket": bucket_name}
        if topics is not None:
            manifest["topics"] = topics.to_dict()
        self.storage.write_items(self.items)
        self.storage.write_manifest(manifest)

    def item(self, index):
        return self.items[index].id

    def put(self, relative, text):
        self.storage.bucket.blob(self.storage.prefix + relative).upload_from_string(text)

    def log(self, index, attempt, text):
        self.put(layout.log(self.item(index), attempt), text)
        return self.storage.url(layout.log(self.item(index), attempt))

    def output(self, index, name, text):
        self.put(layout.output(self.item(index), name), text)

    def done(self, index, attempt=1):
        url = self.log(index, attempt, f"item {index} ok\n")
        self.storage.write_done_marker(self.item(index), {"item": self.item(index), "attempt": attempt, "log": url})

    def failed(self, index, attempts, reason, log_text):
        url = None
        for attempt in range(1, attempts + 1):
            url = self.log(index, attempt, log_text)
        self.storage.write_failed_marker(
            self.item(index), {"item": self.item(index), "attempts": attempts, "reason": reason, "log": url}
        )


def new_run_id():
    return f"0101-1200-{uuid.uuid4().hex[:6]}"


def field(output, label):
    match = re.search(rf"^{re.escape(label)}:\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


# ---------------------------------------------------------------- status


def test_status_counts_items_attempts_and_estimates_time_left(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=10, created=time.time() - 100)
    for index in range(4):
        run.done(index)
    run.log(1, 2, "second attempt of item 1\n")  # a retry: one more log than results
    run.failed(4, attempts=3, reason="exit status 1", log_text="boom\n")

    status, out, err = cflow("status", run.run_id)

    assert status == 0, err
    assert field(out, "state") == "in progress"
    assert field(out, "items") == "10"
    assert field(out, "  queued") == "5"
    assert field(out, "  running").startswith("0 ")
    assert field(out, "  done") == "4"
    assert field(out, "  failed").startswith("1 ")
    assert field(out, "attempts") == "8 (3 retries)"  # 4 done + 1 retry + 3 failed attempts
    assert field(out, "VMs") == "none"
    assert re.fullmatch(r"1 min 4\d s", field(out, "elapsed"))
    # 100 s for 4 items, 5 left: about 125 s.
    assert re.fullmatch(r"~2 min 0\d s \(estimate\)", field(out, "time left"))


def test_status_of_a_finished_run_has_no_time_left(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=2, created=time.time() - 30)
    run.done(0)
    run.failed(1, attempts=1, reason="timed out", log_text="slow\n")

    status, out, _ = cflow("status", run.run_id)

    assert status == 0
    assert field(out, "state") == "finished"
    assert field(out, "  queued") == "0"
    assert field(out, "attempts") == "2 (0 retries)"
    assert "time left" not in out
    assert re.fullmatch(r"\d+ s", field(out, "took"))


def test_unknown_run_id_is_one_line_naming_the_bucket(cflow, bucket):
    status, out, err = cflow("status", "0101-0000-none")

    assert status == 1
    assert out == ""
    assert err.strip() == f"cflow: error: run 0101-0000-none not found in gs://{bucket}; `cflow list` shows the runs there"


def test_a_path_is_not_a_run_id(cflow):
    status, _, err = cflow("logs", "../other")

    assert status == 2
    assert "'../other' is not a run id" in err
    assert "Traceback" not in err


def test_no_running_stack_is_one_line_and_starts_nothing(tmp_path, capsys):
    """Cancel needs the stack the run uses: without it, one line, and nothing is started."""
    const_py = write_const(tmp_path / "project", "any-bucket")
    stack_dir = tmp_path / "no-stack"

    status = cli.main(["cancel", "0101-1200-abcd", "--yes", "--config", str(const_py), "--stack-dir", str(stack_dir)])

    err = capsys.readouterr().err
    assert status == 1
    assert err.strip().splitlines() == [
        f"cflow: error: no local stack is running in {stack_dir}; start it with `cflow local up --dir {stack_dir}` "
        "(or pass --stack-dir to the folder of a running one)"
    ]
    assert not stack_dir.exists()


def test_a_stack_folder_no_run_ever_used_is_one_line_and_starts_nothing(tmp_path, capsys):
    const_py = write_const(tmp_path / "project", "any-bucket")
    stack_dir = tmp_path / "no-stack"

    status = cli.main(["status", "0101-1200-abcd", "--config", str(const_py), "--stack-dir", str(stack_dir)])

    err = capsys.readouterr().err
    assert status == 1
    assert err.strip().splitlines() == [
        f"cflow: error: no local run has kept anything in {stack_dir} (it has no gcs/ folder); "
        "pass --stack-dir to the folder of the stack the run used"
    ]
    assert not stack_dir.exists()


# ---------------------------------------------------------------- logs


def test_logs_prints_the_latest_attempt_or_the_one_asked_for(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=3, created=time.time())
    run.log(1, 2, "attempt two\n")
    run.log(1, 10, "attempt ten\n")  # numbered, not sorted as text: 10 is the latest

    assert cflow("logs", run.run_id, run.item(1))[:2] == (0, "attempt ten\n")
    assert cflow("logs", run.run_id, run.item(1), "--attempt", "2")[:2] == (0, "attempt two\n")

    status, out, err = cflow("logs", run.run_id, run.item(1), "--attempt", "3")
    assert (status, out) == (1, "")
    assert "has no log for attempt 3; attempts with a log: 2, 10" in err

    status, _, err = cflow("logs", run.run_id, run.item(2))
    assert status == 1
    assert f"item {run.item(2)} of run {run.run_id} has no log yet" in err


def test_logs_rejects_items_outside_the_run(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=3, created=time.time())

    status, _, err = cflow("logs", run.run_id, "../../x")
    assert status == 2
    assert "item id must be at least 6 ASCII digits, got '../../x'" in err

    status, _, err = cflow("logs", run.run_id, "000003")
    assert status == 1
    assert f"run {run.run_id} has no item 000003; its items are 000000 to 000002" in err


def test_logs_without_item_lists_failed_items_with_their_last_lines(cflow, storage_client, bucket, stack_env):
    run = SeededRun(storage_client, bucket, new_run_id(), count=4, created=time.time())
    run.done(0)
    run.failed(2, attempts=3, reason="exit status 7", log_text="".join(f"line {n}\n" for n in range(1, 9)))

    status, out, _ = cflow("logs", run.run_id)

    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"run {run.run_id}: 1 failed item(s) of 4"
    assert f"item {run.item(2)} (arg2): exit status 7 after 3 attempt(s)" in lines  # named by its fields too
    # Locally, a file the user can open.
    log_file = Path(stack_env.dir) / "gcs" / bucket / "cflow" / "runs" / run.run_id / "logs" / run.item(2) / "attempt-3.log"
    assert f"  log: {log_file}" in lines
    assert log_file.read_text().endswith("line 8\n")
    assert [line for line in lines if line.startswith("  | ")] == [f"  | line {n}" for n in range(4, 9)]


def test_logs_without_item_says_when_nothing_failed(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=2, created=time.time())
    run.done(1)

    assert cflow("logs", run.run_id)[:2] == (0, f"run {run.run_id}: no failed items (1 done of 2)\n")


def follow_args(const_py, stack_dir, run_id, item):
    return cli.build_parser().parse_args(
        ["logs", run_id, item, "--follow", "--config", str(const_py), "--stack-dir", stack_dir]
    )


def test_logs_follow_prints_only_what_is_new_until_the_item_is_done(const_py, stack_env, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=1, created=time.time())
    run.log(0, 1, "a\n")
    # Each pause of the follower is a moment for the worker to get further.
    worker_steps = [
        lambda: run.log(0, 1, "a\nb\n"),
        lambda: run.log(0, 2, "c\n"),  # a retry starts a new attempt
        lambda: (run.log(0, 2, "c\nd\n"), run.storage.write_done_marker(run.item(0), {"item": run.item(0)})),
    ]
    pauses = []

    def sleep(seconds):
        pauses.append(seconds)
        worker_steps[len(pauses) - 1]()

    out, err = io.StringIO(), io.StringIO()
    status = ops_logs.logs_command(follow_args(const_py, stack_env.dir, run.run_id, run.item(0)), out=out, err=err, sleep=sleep)

    assert status == 0
    assert out.getvalue() == "a\nb\nc\nd\n"
    assert pauses == [ops_logs.FOLLOW_INTERVAL_SECONDS] * 3
    assert f"--- item {run.item(0)}, attempt 2 ---" in err.getvalue()
    assert "finished; stopped following" in err.getvalue()


def test_logs_follow_stops_on_ctrl_c_with_exit_130(const_py, stack_env, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=1, created=time.time())
    run.log(0, 1, "started\n")

    def interrupted(seconds):
        raise KeyboardInterrupt

    out = io.StringIO()
    status = ops_logs.logs_command(follow_args(const_py, stack_env.dir, run.run_id, run.item(0)), out=out, err=io.StringIO(), sleep=interrupted)

    assert status == EXIT_INTERRUPTED == 130
    assert out.getvalue() == "started\n"


# ---------------------------------------------------------------- cancel


class Terminal(io.StringIO):
    """Typed answers, on what claims to be a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def pubsub(stack_env):
    from google.cloud import pubsub_v1

    return PubSub(pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient())


@pytest.fixture
def compute(stack_env):
    return Compute(build_local_compute(stack_env.compute_endpoint, stack_env.compute_token_file), stack_env.project)


def start_vms(compute, zone, run_id, count):
    names = [f"ops-{run_id}-{n}" for n in range(count)]
    compute.bulk_insert(zone, names, {
        "machineType": "e2-micro",
        "labels": {"cflow-run": run_id},
        "disks": [{"boot": True, "autoDelete": True,
                   "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
        "metadata": {"items": [{"key": "startup-script", "value": "sleep 600"}]},
    })
    running = ["RUNNING"] * count
    wait_until(lambda: sorted(vm.status for vm in compute.list_run_vms(run_id)) == running, VM_DEADLINE_S, f"{count} VMs RUNNING", interval=0.2)
    return names


@pytest.fixture
def run_with_fleet(storage_client, bucket, pubsub, compute, stack_env):
    """A run in progress with 2 running VMs and its topics; whatever the test leaves is removed."""
    run_id = new_run_id()
    topics = RunTopics.for_run(stack_env.project, run_id, "cflow-topic", "cflow-sub")
    pubsub.create_run_topics(topics, ack_deadline_seconds=10)
    run = SeededRun(storage_client, bucket, run_id, count=5, created=time.time() - 10, topics=topics)
    run.done(0)
    run.output(0, "out.txt", "kept\n")
    start_vms(compute, stack_env.zone, run_id, 2)
    yield run, topics
    compute.delete_vms(compute.list_run_vms(run_id))
    pubsub.delete_run_topics(topics)


def subscription_exists(pubsub, subscription):
    try:
        pubsub.subscriber.get_subscription(subscription=subscription)
        return True
    except google_exceptions.NotFound:
        return False


def topic_exists(pubsub, topic):
    try:
        pubsub.publisher.get_topic(topic=topic)
        return True
    except google_exceptions.NotFound:
        return False


def test_cancel_deletes_vms_and_topics_and_keeps_outputs_and_logs(cflow, run_with_fleet, pubsub, compute, monkeypatch):
    run, topics = run_with_fleet
    status, out, _ = cflow("status", run.run_id)
    assert field(out, "VMs") == "2 RUNNING"
    assert field(out, "  running").startswith("2 ")
    assert field(out, "  queued") == "2"

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    status, out, err = cflow("cancel", run.run_id)

    assert status == 0, err
    assert out.startswith(
        f"cancel run {run.run_id}: delete 2 VMs, its topics and subscriptions (outputs and logs are kept)? [y/N] "
    )
    assert f"cancelled run {run.run_id}: deleted 2 VM(s)" in out
    assert compute.list_run_vms(run.run_id) == []
    for subscription in (topics.work_subscription, topics.events_subscription, topics.dead_subscription):
        assert not subscription_exists(pubsub, subscription)
    for topic in (topics.work_topic, topics.events_topic, topics.dead_topic):
        assert not topic_exists(pubsub, topic)
    assert run.storage.read_output(run.item(0), "out.txt") == b"kept\n"
    assert run.storage.read_log(run.item(0), 1) == "item 0 ok\n"
    first_mark = run.storage.read_cancelled()
    assert isinstance(first_mark["time"], float)

    status, out, err = cflow("cancel", run.run_id, "--yes")
    assert status == 0, err
    assert f"cancelled run {run.run_id}: deleted 0 VM(s)" in out
    assert run.storage.read_cancelled() == first_mark

    status, out, _ = cflow("status", run.run_id)
    assert field(out, "state").startswith("cancelled at ")
    assert field(out, "VMs") == "none"
    assert field(out, "  running").startswith("0 ")


def test_cancel_without_a_terminal_refuses_without_yes(cflow, run_with_fleet, pubsub, compute, monkeypatch):
    run, topics = run_with_fleet
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))

    status, out, err = cflow("cancel", run.run_id)

    assert status == 2
    assert err.strip() == (
        f"cflow: error: cancel asks for confirmation, and there is no terminal; pass --yes: `cflow cancel {run.run_id} --yes`"
    )
    assert out == ""
    assert len(compute.list_run_vms(run.run_id)) == 2
    assert subscription_exists(pubsub, topics.work_subscription)
    assert run.storage.read_cancelled() is None


def test_cancel_answered_no_changes_nothing(cflow, storage_client, bucket, monkeypatch):
    run = SeededRun(storage_client, bucket, new_run_id(), count=2, created=time.time())
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))

    status, out, _ = cflow("cancel", run.run_id)

    assert status == 1
    assert "delete 0 VMs" in out
    assert out.rstrip().endswith(f"run {run.run_id} not cancelled")
    assert run.storage.read_cancelled() is None


# ---------------------------------------------------------------- combine


def test_combine_concatenates_done_items_in_item_order(cflow, storage_client, bucket, const_py):
    run = SeededRun(storage_client, bucket, new_run_id(), count=4, created=time.time())
    for index in (3, 0, 2):
        run.output(index, "rows.csv", f"name,value\nitem{index},{index}\n")
        run.done(index)
    run.output(0, "notes.txt", "zero")  # no final newline: combine adds one
    run.output(2, "notes.txt", "two\n")
    run.output(1, "rows.csv", "name,value\nnot-done,1\n")  # never finished: left out

    status, out, err = cflow("combine", run.run_id)

    assert status == 0, err
    dest = const_py.parent / "output" / run.run_id
    assert (dest / "rows.csv").read_text() == "name,value\nitem0,0\nitem2,2\nitem3,3\n"
    assert (dest / "notes.txt").read_text() == "zero\ntwo\n"
    lines = out.splitlines()
    assert lines[0] == f"run {run.run_id}: combined 2 file(s) from 3 done item(s)"
    assert re.fullmatch(rf"  {re.escape(str(dest / 'rows.csv'))}\s+gs://{bucket}/cflow/runs/{run.run_id}/combined/rows.csv", lines[2])
    assert run.storage.bucket.blob(run.storage.prefix + layout.combined("rows.csv")).download_as_text() == (dest / "rows.csv").read_text()


def test_combine_with_nothing_done_says_so(cflow, storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=2, created=time.time())

    status, _, err = cflow("combine", run.run_id)

    assert status == 1
    assert f"run {run.run_id} has no done items yet; nothing to combine" in err


# ---------------------------------------------------------------- list


def test_list_shows_runs_newest_first_with_counts_and_state(cflow, storage_client, bucket):
    now = time.time()
    finished = SeededRun(storage_client, bucket, "0101-0900-aaaa", count=2, created=now - 300)
    finished.done(0)
    finished.failed(1, attempts=1, reason="exit status 1", log_text="x\n")
    cancelled = SeededRun(storage_client, bucket, "0101-1100-cccc", count=3, created=now - 200)
    cancelled.storage.mark_cancelled(now - 150)
    going = SeededRun(storage_client, bucket, "0101-1000-bbbb", count=12, created=now - 100)
    going.done(5)

    status, out, _ = cflow("list")

    assert status == 0
    lines = out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["RUN ID", "CREATED", "ITEMS", "DONE", "FAILED", "STATE", "VMS"]
    # The stack is shared: VMs other tests left running show as runs of their own; only the seeded runs are asserted.
    seeded = {"0101-0900-aaaa", "0101-1000-bbbb", "0101-1100-cccc"}
    lines = [lines[0], *(line for line in lines[1:] if line.split(" ", 1)[0] in seeded)]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    assert rows == [
        ["0101-1000-bbbb", format_time(now - 100), "12", "1", "0", "in progress", "-"],
        ["0101-1100-cccc", format_time(now - 200), "3", "0", "0", "cancelled", "-"],
        ["0101-0900-aaaa", format_time(now - 300), "2", "1", "1", "finished", "-"],
    ]
    # Aligned: every column starts at the same place on every line.
    assert len({line.index("  ") for line in lines[1:]}) == 1
    assert len({line.rstrip().rindex(" ") for line in lines[1:]}) == 1


def test_list_shows_the_vms_a_run_still_has_and_runs_known_only_by_their_vms(cflow, run_with_fleet, compute, stack_env):
    run, _topics = run_with_fleet
    stray = new_run_id()
    start_vms(compute, stack_env.zone, stray, 1)
    try:
        status, out, _ = cflow("list")
    finally:
        compute.delete_vms(compute.list_run_vms(stray))

    assert status == 0
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip()) for line in out.splitlines()[1:]}
    assert rows[run.run_id][5:] == ["in progress", "2 alive"]
    assert rows[stray][5:] == ["VMs only (no run.json here)", "1 alive"]
    assert out.splitlines()[-1] == "VMS: a run's VMs still there (and billing); `cflow cancel RUN_ID` deletes them"


def test_list_of_an_empty_bucket(cflow, bucket):
    assert cflow("list")[:2] == (0, f"no runs in gs://{bucket}\n")


# ---------------------------------------------------------------- items by name, spans, report


def test_status_and_logs_name_a_failed_item_by_its_fields_with_its_log_file(cflow, storage_client, bucket, stack_env):
    run = SeededRun(storage_client, bucket, new_run_id(), count=3, created=time.time() - 20)
    run.done(0)
    run.failed(1, attempts=2, reason="exit status 7", log_text="poison\n")
    log_file = Path(stack_env.dir) / "gcs" / bucket / run.storage.prefix / layout.log(run.item(1), 2)

    status, out, _ = cflow("status", run.run_id)

    assert status == 0
    assert f"  {run.item(1)} (arg1): exit status 7 after 2 attempt(s); log: {log_file}" in out.splitlines()

    status, out, err = cflow("logs", run.run_id, run.item(1))
    assert (status, out) == (0, "poison\n")
    assert err.strip() == f"item {run.item(1)} (arg1), attempt 2 (attempts logged: 1, 2): {log_file}"


def span_info(run, index, attempt, vm, started, seconds, outcome):
    from cflow.history import AttemptSpan

    span = AttemptSpan(run.item(index), attempt, vm, started, started + seconds, outcome)
    return span, {"item": run.item(index), **span.fields()}


def seed_history(run, now):
    """Two VMs, one preempted: item 0 done, item 1 preempted then done elsewhere, item 2 failed twice."""
    from cflow.history import VmHistory
    from cflow.protocol import EventKind

    spans = []
    for index, attempt, vm, started, seconds, outcome in [
        (0, 1, "vm-a", now - 50, 5, EventKind.DONE),
        (1, 1, "vm-b", now - 48, 10, EventKind.PREEMPTED),
        (1, 1, "vm-a", now - 40, 8, EventKind.DONE),
        (2, 1, "vm-a", now - 30, 2, EventKind.RETRY),
        (2, 2, "vm-a", now - 27, 2, EventKind.FAILED),
    ]:
        span, info = span_info(run, index, attempt, vm, started, seconds, outcome)
        spans.append(span)
        if outcome == EventKind.DONE:
            run.log(index, attempt, "ok\n")
            run.storage.write_done_marker(run.item(index), info)
        elif outcome == EventKind.PREEMPTED:
            run.storage.write_timeline_record(span)
        else:
            url = run.log(index, attempt, "poison\n")
            run.storage.write_attempt_marker(run.item(index), attempt, {**info, "reason": "exit status 7", "log": url})
            if outcome == EventKind.FAILED:
                run.storage.write_failed_marker(run.item(index), {**info, "attempts": 2, "reason": "exit status 7", "log": url})
    history = VmHistory()
    history.asked_for(["vm-a", "vm-b"], "us-central1-a", {"machineType": "e2-small", "scheduling": {"provisioningModel": "SPOT"}}, now - 55)
    history.mark_preempted("vm-b", now - 38)
    history.all_gone(now - 20)
    run.storage.write_vm_history(history.to_document())
    return spans


def test_spans_ride_on_markers_and_timeline_records_and_come_back_in_one_listing_each(storage_client, bucket):
    run = SeededRun(storage_client, bucket, new_run_id(), count=3, created=time.time() - 60)
    spans = seed_history(run, time.time())

    def to_the_ms(spans):  # times are kept to the millisecond
        return sorted((s.item, s.attempt, s.vm, round(s.started, 3), round(s.ended, 3), s.outcome) for s in spans)

    assert to_the_ms(run.storage.list_spans()) == to_the_ms(spans)


def test_report_draws_each_vm_and_each_attempt_of_the_run(cflow, storage_client, bucket, const_py):
    run = SeededRun(storage_client, bucket, new_run_id(), count=3, created=time.time() - 60)
    spans = seed_history(run, time.time())

    status, out, err = cflow("report", run.run_id)

    assert status == 0, err
    path = const_py.parent / "output" / run.run_id / "report.html"
    assert out == f"report: {path}\n"
    page = path.read_text()
    assert page.count('<g class="vm-row') == 2
    assert page.count('<rect class="bar') == len(spans)
    assert 'data-outcome="preempted"' in page and 'data-outcome="failed"' in page
    assert f"{run.item(2)} (arg2)" in page


# ---------------------------------------------------------------- after the stack stopped


@pytest.fixture
def stopped_stack(tmp_path, monkeypatch):
    """A stack folder holding a finished run, as a local run leaves it once its stack stopped; yields (dir, bucket, run)."""
    from google.cloud import storage

    from cflow.local.stored_runs import stack_storage

    stack_dir = tmp_path / "stack"
    (stack_dir / "gcs").mkdir(parents=True)
    bucket_name = f"ops-{uuid.uuid4().hex[:12]}"
    with stack_storage(stack_dir) as served, monkeypatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", served.url)
        client = storage.Client(project="cflow-local", credentials=AnonymousCredentials())
        client.create_bucket(bucket_name)
        run = SeededRun(client, bucket_name, new_run_id(), count=3, created=time.time() - 60)
        seed_history(run, time.time())
    return stack_dir, bucket_name, run


def files_under(folder):
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def processes_using(folder):
    """Processes whose command line names ``folder``: a storage server left running would."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_status_logs_list_and_report_just_work_after_the_stack_stopped_and_leave_nothing_behind(tmp_path, stopped_stack, capsys):
    stack_dir, bucket_name, run = stopped_stack
    const_py = write_const(tmp_path / "project", bucket_name)
    before = files_under(stack_dir)

    def cflow(*args):
        status = cli.main([*args, "--config", str(const_py), "--stack-dir", str(stack_dir)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    started = time.monotonic()
    status, out, err = cflow("status", run.run_id)
    status_seconds = time.monotonic() - started
    assert status == 0, err
    assert field(out, "state") == "finished"
    assert field(out, "  done") == "2"
    assert field(out, "VMs") == "none (the local stack is not running)"
    log_file = stack_dir / "gcs" / bucket_name / run.storage.prefix / layout.log(run.item(2), 2)
    assert f"  {run.item(2)} (arg2): exit status 7 after 2 attempt(s); log: {log_file}" in out.splitlines()

    status, out, err = cflow("logs", run.run_id, run.item(2))
    assert (status, out) == (0, "poison\n"), err

    status, out, _ = cflow("list")
    assert status == 0 and run.run_id in out and out.rstrip().endswith("finished  -")  # no stack running: no VM of any run

    status, out, err = cflow("report", run.run_id)
    assert status == 0, err
    assert (const_py.parent / "output" / run.run_id / "report.html").read_text().count('<rect class="bar') == 5

    assert not (stack_dir / "stack.json").exists()
    assert files_under(stack_dir) == before  # read-only: not one file of the stack's added or touched
    assert processes_using(stack_dir) == []
    print(f"cflow status without a running stack: {status_seconds:.2f} s")
