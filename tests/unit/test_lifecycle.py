"""cflow.lifecycle: a run's state, its resume check, and cancel, with fake seams."""

import types
from pathlib import Path

import pytest

from cflow import lifecycle
from cflow.errors import CloudError, ConfigError, PermissionDenied
from cflow.gcp.compute import Vm
from cflow.gcp.pubsub import RunTopics
from tests.fakes import FakeCompute, FakeRunStorage, FakeSchedulerPubSub

RUN = "0101-0000-abcd"


@pytest.mark.parametrize(
    "done, failed, cancelled, state",
    [
        (3, 1, False, "finished"),
        (3, 1, True, "finished"),  # every item ended before the cancel: finished is what it is
        (2, 1, True, "cancelled"),
        (2, 1, False, "in progress"),
        (0, 0, False, "in progress"),
    ],
)
def test_run_state(done, failed, cancelled, state):
    assert lifecycle.run_state(4, done, failed, cancelled) == state


def config(**changes):
    settings = dict(
        target="local", bucket="b", task_module_cmd=("bash", "task/task.sh"), task_timeout=3600.0, max_attempts=3, lease_seconds=60,
        vm_type="e2-standard-2", vm_spot=True, vm_boot="stock", vm_stock_image="projects/debian-cloud/global/images/family/debian-12",
        vm_image_name=None, vm_disk_gb=10, vm_compute_service_account="default", vm_labels={}, worker_node_cnt=5,
        zones=("us-central1-a",), config_path=Path("/project/const.py"), combine="concat", spot_preemptions_before_standard=3,
    )
    settings.update(changes)
    namespace = types.SimpleNamespace(**settings)
    namespace.to_dict = lambda: {key: (list(value) if isinstance(value, tuple) else value) for key, value in settings.items()
                                 if key != "config_path"}
    return namespace


def manifest_of(started):
    topics = RunTopics.for_run("p", RUN, "t", "s")
    return lifecycle.new_manifest(started, RUN, "p", topics, 10, "gs://b/package.tar.gz", 1.0)


def test_resume_with_the_same_task_and_vm_settings_is_allowed_and_the_fleet_size_may_change():
    lifecycle.check_resumable(manifest_of(config()), config(worker_node_cnt=50, zones=("europe-west4-a",)), RUN)


def test_resume_refuses_in_one_line_naming_each_changed_setting_with_both_values():
    changed = config(task_module_cmd=("python3", "task/new.py"), max_attempts=5, vm_type="n2-standard-4")

    with pytest.raises(ConfigError) as caught:
        lifecycle.check_resumable(manifest_of(config()), changed, RUN)

    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"run {RUN} started with other settings than const.py has now: ")
    assert "TASK_MODULE_CMD 'bash task/task.sh' at the start, 'python3 task/new.py' in const.py" in text
    assert "MAX_ATTEMPTS 3 at the start, 5 in const.py" in text
    assert "VM_TYPE 'e2-standard-2' at the start, 'n2-standard-4' in const.py" in text
    assert "TASK_TIMEOUT" not in text and "VM_SPOT" not in text
    assert text.endswith("put the run's values back to resume it, or start a new run")


def test_a_record_without_vm_settings_compares_the_task_settings_only():
    manifest = manifest_of(config())
    del manifest["settings"]
    lifecycle.check_resumable(manifest, config(vm_type="n2-standard-4"), RUN)
    with pytest.raises(ConfigError, match=r"LEASE_SECONDS 60 at the start, 30 in const\.py"):
        lifecycle.check_resumable(manifest, config(lease_seconds=30), RUN)


def seams_with_a_journal():
    """Fake seams whose cancel calls land in one journal, in the order they happen."""
    storage, pubsub, compute = FakeRunStorage(RUN), FakeSchedulerPubSub(), FakeCompute()
    compute.vms = {name: Vm(name=name, zone="z", status="RUNNING", status_message="") for name in ("w-1", "w-2")}
    journal: list[str] = []

    def journaled(seam, method_name, entry):
        method = getattr(seam, method_name)

        def call(*args, **kwargs):
            journal.append(entry)
            return method(*args, **kwargs)

        setattr(seam, method_name, call)

    journaled(storage, "mark_cancelled", "mark")
    journaled(pubsub, "delete_run_topics", "topics")
    journaled(compute, "delete_run_vms", "vms")
    return storage, pubsub, compute, journal


def test_cancel_marks_first_then_deletes_topics_then_vms_and_keeps_the_first_mark():
    storage, pubsub, compute, journal = seams_with_a_journal()
    topics = RunTopics.for_run("p", RUN, "t", "s")

    outcome = lifecycle.cancel_run(storage, pubsub, compute, topics, now=100.0)

    assert journal == ["mark", "topics", "vms"]
    assert outcome == lifecycle.CancelOutcome(vms_found=2, vms_left=[], left_behind=())
    assert compute.vms == {}
    lifecycle.cancel_run(storage, pubsub, compute, topics, now=200.0)
    assert storage.cancelled == {"time": 100.0}


def test_a_refused_vm_deletion_is_one_line_naming_the_run():
    storage, pubsub, compute, _ = seams_with_a_journal()

    def refused(run_id, *args, **kwargs):
        raise PermissionDenied("permission denied by Compute Engine", status=403, message="Required 'compute.instances.delete' permission")

    compute.delete_run_vms = refused
    with pytest.raises(CloudError, match=f"^deleting the VMs of run {RUN} failed: Required 'compute.instances.delete' permission$"):
        lifecycle.cancel_run(storage, pubsub, compute, None, now=1.0)
    assert storage.cancelled == {"time": 1.0}  # marked before anything could fail


def test_done_items_are_combined_in_item_order():
    assert lifecycle.done_in_item_order(["000000", "000001", "000002", "000003"], {"000003", "000001"}) == ["000001", "000003"]


def test_a_vm_the_cancel_could_not_delete_is_named_with_the_exact_gcloud_command():
    storage, pubsub, compute, _ = seams_with_a_journal()
    compute.undeletable = {"w-2"}

    outcome = lifecycle.cancel_run(storage, pubsub, compute, None, now=1.0)

    assert outcome.vms_left == ["w-2"] and [vm.name for vm in outcome.left_behind] == ["w-2"]
    lines = lifecycle.left_behind_lines(RUN, "proj-1", outcome.left_behind)
    assert lines == [
        "still there: VM w-2 (RUNNING in z); delete it: gcloud compute instances delete w-2 --zone z --project proj-1 --quiet",
        f"run {RUN} did not clean up: 1 VM(s) of its own are still there and may bill until deleted; "
        f"run the commands above, or `cflow cancel {RUN} --yes`",
    ]
