"""How a run ends: nothing of it left (0/1), VMs left named with their delete commands (3), workers refused for good (2), the cost cap (4)."""

import io
import types
from typing import Any

import pytest

from cflow import run, tasks
from cflow.errors import EXIT_COST_CAP, EXIT_ITEMS_FAILED, EXIT_OK, EXIT_VMS_LEFT, PermanentRequestError, VmsLeftBehind, WorkersRefused
from cflow.gcp.compute import Vm
from cflow.gcp.pubsub import RunTopics
from cflow.scheduler import Scheduler
from tests.fakes import FakeCompute, FakeRunStorage, FakeSchedulerPubSub

RUN = "0101-0000-abcd"


class RunStorage(FakeRunStorage):
    """The run's storage as the end of a run reads it: no outputs."""

    bucket_name = "b"

    def recorded_output_names(self, item_id):
        return []

    def done_output_shapes(self):
        return {}

    def recorded_outputs(self, item_id):
        return [], {}

    def read_output(self, item_id, name):
        raise AssertionError("no output to read")

    def upload_combined(self, name, path):
        raise AssertionError("nothing to upload")

    def read_marker(self, kind, item_id):
        return {"reason": "exit status 1", "log": "gs://b/log"}


class View:
    """The run view the end of a run writes its report from: here, none is made (the report is not what is tested)."""

    storage = None


NO_VIEW: Any = View()


def make(tmp_path, undeletable=()):
    config: Any = types.SimpleNamespace(combine="concat", combine_download=True, result_dir=tmp_path, vm_spot=True, vm_type="e2-small",
                                        hourly_price=lambda: None,
                                   worker_node_cnt=2, zones=("us-central1-a",), vm_name_prefix="w", lease_seconds=30)
    compute: Any = FakeCompute()
    pubsub: Any = FakeSchedulerPubSub()
    storage: Any = RunStorage(RUN)
    compute.vms = {name: Vm(name, "us-central1-a", "RUNNING", "") for name in ("w-1", "w-2")}
    compute.undeletable = set(undeletable)
    topics = RunTopics.for_run("p", RUN, "t", "s")
    scheduler = Scheduler(config, RUN, tasks.make_items([["a"]]), compute, pubsub, storage, topics, {})
    return config, scheduler, storage, pubsub, topics


def test_a_run_that_deleted_everything_ends_with_its_summary_and_status_0(tmp_path):
    config, scheduler, storage, pubsub, topics = make(tmp_path)
    scheduler.done_ids = {"000000"}
    out = io.StringIO()
    assert run.finish_run(config, RUN, scheduler, storage, pubsub, topics, 0.0, out, view=NO_VIEW) == EXIT_OK
    assert "still there" not in out.getvalue()


def test_a_vm_still_there_at_the_end_is_named_with_its_gcloud_delete_command_and_status_3(tmp_path):
    config, scheduler, storage, pubsub, topics = make(tmp_path, undeletable={"w-2"})
    scheduler.progress.failed = 1  # even with failed items: a VM left billing is what the status says
    out = io.StringIO()

    status = run.finish_run(config, RUN, scheduler, storage, pubsub, topics, 0.0, out, view=NO_VIEW)

    assert status == EXIT_VMS_LEFT != EXIT_ITEMS_FAILED
    lines = out.getvalue().splitlines()
    assert "still there: VM w-2 (RUNNING in us-central1-a); delete it: gcloud compute instances delete w-2 --zone us-central1-a " \
           "--project proj --quiet" in lines
    assert lines[-1].startswith(f"run {RUN} did not clean up: 1 VM(s)")


def test_workers_refused_for_good_cancel_the_run_then_end_in_the_one_line(tmp_path):
    _config, scheduler, storage, pubsub, topics = make(tmp_path)
    refused = WorkersRefused("VM_NETWORK: Compute Engine refused ...", PermanentRequestError("x"), "VM_NETWORK")
    out = io.StringIO()

    run._end_refused(RUN, refused, storage, pubsub, scheduler.compute, topics, out)

    assert storage.cancelled is not None and ("delete-topics", topics.work_topic) in pubsub.calls
    assert scheduler.compute.vms == {} and out.getvalue() == ""


def test_workers_refused_and_a_vm_the_cancel_could_not_delete_end_with_status_3(tmp_path):
    _config, scheduler, storage, pubsub, topics = make(tmp_path, undeletable={"w-1"})
    refused = WorkersRefused("VM_NETWORK: refused", PermanentRequestError("x"), "VM_NETWORK")
    out = io.StringIO()

    with pytest.raises(VmsLeftBehind) as caught:
        run._end_refused(RUN, refused, storage, pubsub, scheduler.compute, topics, out)

    assert caught.value.exit_status == EXIT_VMS_LEFT
    assert caught.value.commands == ["gcloud compute instances delete w-1 --zone us-central1-a --project proj --quiet"]
    assert str(caught.value).startswith("VM_NETWORK: refused; and the run did not clean up")
    assert "delete it: gcloud compute instances delete w-1" in out.getvalue()


# -- a run that reached MAX_COST_USD ----------------------------------------------------------


def capped(tmp_path, undeletable=()):
    config, scheduler, storage, pubsub, topics = make(tmp_path, undeletable)
    config.max_cost_usd = 1.0
    scheduler.progress.cost_capped, scheduler.progress.not_run = True, 1
    return config, scheduler, storage, pubsub, topics


def test_a_run_at_its_cost_cap_is_cancelled_and_ends_with_status_4(tmp_path):
    config, scheduler, storage, pubsub, topics = capped(tmp_path)
    out = io.StringIO()

    assert run.finish_run(config, RUN, scheduler, storage, pubsub, topics, 0.0, out, view=NO_VIEW) == EXIT_COST_CAP

    assert storage.cancelled is not None and scheduler.compute.vms == {}
    assert "1 item(s) not run (cancelled, not failed); nothing of the run is left running" in out.getvalue()


def test_a_vm_left_at_the_cost_cap_comes_first_status_3_and_the_cap_line_claims_nothing_about_it(tmp_path):
    config, scheduler, storage, pubsub, topics = capped(tmp_path, undeletable={"w-1"})
    out = io.StringIO()

    assert run.finish_run(config, RUN, scheduler, storage, pubsub, topics, 0.0, out, view=NO_VIEW) == EXIT_VMS_LEFT

    text = out.getvalue()
    assert "1 item(s) not run (cancelled, not failed)" in text and "nothing of the run is left running" not in text
    assert "delete it: gcloud compute instances delete w-1" in text
