"""Whole runs of scheduler.py on the local stack: the product as a user runs it."""

import json
import os

import pytest

from tests.e2e.conftest import run_id_of, run_vms
from tests.helpers import wait_until

pytestmark = pytest.mark.stack

NASTY_ARGS = [
    ["echo", "a b", "$(touch /tmp/cflow-pwned)", "`id`", "; rm -rf /", "it's", 'say "hi"', "naïve ☃", "back\\slash", "|&><*?"],
    ["echo", "--flag=1", "-", "", "~", "$HOME"],
]


def tasks_line(args):
    import shlex

    return " ".join(shlex.quote(arg) for arg in args)


def test_full_run_combines_every_item_once_and_cleans_up(project, compute, local_stack):
    plain = [["echo", f"item-{i}"] for i in range(8)]
    items = plain + NASTY_ARGS
    project.write("# a comment line\n\n" + "\n".join(tasks_line(a) for a in items) + "\n")

    status, out, err = project.run()

    assert status == 0, err
    run_id = run_id_of(out)
    results = project.results(run_id)
    assert [r["args"] for r in results] == [a[1:] for a in items]  # item order, argv intact
    assert [r["id"] for r in results] == [f"{i:06d}" for i in range(len(items))]
    assert not os.path.exists("/tmp/cflow-pwned")
    assert f"{len(items)} done, 0 failed" in err
    assert run_vms(compute, local_stack.project, run_id) == []
    report = project.root / "output" / run_id / "report.html"
    assert out.rstrip().splitlines()[-1] == f"report: {report} (open it in a browser)"
    page = report.read_text()
    assert page.count('data-outcome="done"') == len(items)  # one bar per attempt
    assert "000009 (echo --flag=1 - &#x27;&#x27; &#x27;~&#x27; &#x27;$HOME&#x27;)" in page  # fields, shell-quoted, escaped


def test_flaky_item_succeeds_on_its_second_attempt(project):
    project.write("echo first\nflaky second\necho third\n", WORKER_NODE_CNT=2)

    status, out, err = project.run()

    assert status == 0, err
    results = project.results(run_id_of(out))
    assert [(r["mode"], r["attempt"]) for r in results] == [("echo", 1), ("flaky", 2), ("echo", 1)]
    assert "retries: 1" in err


def test_poison_item_fails_after_max_attempts_with_its_log(project):
    project.write("echo fine\npoison bad\n", WORKER_NODE_CNT=2, MAX_ATTEMPTS=2)

    status, out, err = project.run()

    assert status == 1
    assert "1 done, 1 failed" in err
    failed_line = next(line for line in err.splitlines() if line.startswith("failed: item 000001"))
    assert "exit status 7" in failed_line and "logs/000001/attempt-2.log" in failed_line
    # Named by its fields, and locally its log is a file the user can open.
    assert failed_line.startswith("failed: item 000001 (poison bad): exit status 7; log: /")
    assert open(failed_line.split("; log: ", 1)[1]).read().startswith("poison: always failing")
    assert [r["mode"] for r in project.results(run_id_of(out))] == ["echo"]


def test_spot_vm_preempted_mid_task_loses_nothing(project, compute, local_stack, tmp_path):
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    project.write(f"slow {rendezvous}\necho other\n", WORKER_NODE_CNT=2, VM_SPOT=True)

    scheduler = project.start()
    try:
        first = wait_until(lambda: (rendezvous / "started-0").exists() and json.loads((rendezvous / "started-0").read_text()),
                         120, "the slow item to start")
        zone = next(vm["zone"].rsplit("/", 1)[-1] for vm in run_vms(compute, local_stack.project) if vm["name"] == first["vm"])
        compute.instances().simulateMaintenanceEvent(project=local_stack.project, zone=zone, instance=first["vm"]).execute()
        second = wait_until(lambda: (rendezvous / "started-1").exists() and json.loads((rendezvous / "started-1").read_text()),
                          120, "the slow item to run again elsewhere")
        (rendezvous / "release").touch()
        out, err = scheduler.communicate(timeout=180)
    finally:
        if scheduler.poll() is None:
            scheduler.kill()
            scheduler.wait()

    assert scheduler.returncode == 0, err
    assert second["vm"] != first["vm"]
    assert second["attempt"] == 1  # a preemption is no failed attempt
    results = project.results(run_id_of(out))
    assert [r["mode"] for r in results] == ["slow", "echo"]
    assert "preemptions: 1" in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: (p.root / "task" / "t.py").unlink(), "task/t.py"),
        (lambda p: p.write("", TASKS="tasks.txt"), "no items"),
        (lambda p: p.write("echo x\n", VM_ZONE="mars-north1-a"), "VM_ZONE"),
        (lambda p: p.write("echo x\n", BUCKET="no-such-bucket-cflow-test"), "does not exist"),
        (lambda p: p.write("echo x\n", TASK_MODULE_CMD="task/t.py"), "chmod +x"),
    ],
    ids=["missing-task-script", "empty-tasks-file", "unknown-zone", "missing-bucket", "not-executable"],
)
def test_bad_input_is_refused_in_one_line_before_any_vm(project, compute, local_stack, change, message):
    project.write("echo x\n")
    change(project)

    status, out, err = project.run(timeout=120)

    assert status == 2, (out, err)
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert "Traceback" not in err
    assert run_vms(compute, local_stack.project) == []
