"""The Compute seam's delete path (asked until gone), its pace after a rate limit, and the requestId on creations."""

import json

import httplib2
from googleapiclient.errors import HttpError

from cflow.gcp.compute import Compute, Vm
from cflow.gcp.retry import Backoff


class Clock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


class Service:
    """Just enough of a googleapiclient resource for Compute's constructor."""

    def instances(self):
        return self


def http_error(status, reason, message="x"):
    content = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(content).encode())


def vm(name, status="RUNNING"):
    return Vm(name=name, zone="us-central1-a", status=status, status_message="", labels={"cflow-run": "r"})


def make_compute(clock, retries=0):
    return Compute(Service(), "proj", sleep=clock.sleep, backoff=Backoff(retries=retries, jitter=0.0, sleep=clock.sleep), clock=clock)


def test_a_delete_refused_as_not_ready_is_asked_again_on_the_next_pass_until_the_vm_is_gone():
    clock = Clock()
    compute = make_compute(clock)
    listed = {"w-1": vm("w-1", "PROVISIONING"), "w-2": vm("w-2")}
    asked = []
    not_ready_passes = [1]

    def delete_batch(vms):
        asked.append(sorted(v.name for v in vms))
        failures = {}
        for v in vms:
            if v.name == "w-1" and not_ready_passes[0] > 0:
                not_ready_passes[0] -= 1
                failures[v.name] = http_error(400, "resourceNotReady", "The resource 'w-1' is not ready")
            else:
                listed[v.name] = vm(v.name, "STOPPING")
        return failures

    compute._delete_batch = delete_batch

    def list_run_vms(run_id):
        gone = [name for name, v in listed.items() if v.status == "STOPPING"]
        snapshot = list(listed.values())
        for name in gone:  # a VM being deleted is listed once more as STOPPING, then gone
            del listed[name]
        return snapshot

    compute.list_run_vms = list_run_vms

    assert compute.delete_run_vms("r", deadline_seconds=60, poll_seconds=1.0, clock=clock, sleep=clock.sleep) == []
    # w-1's refused delete was not counted as asked: it was asked again on the next pass.
    assert asked == [["w-1", "w-2"], ["w-1"]]


def test_a_vm_still_there_long_after_its_delete_was_accepted_is_asked_again_and_named_at_the_deadline():
    clock = Clock()
    compute = make_compute(clock)
    asked = []
    compute._delete_batch = lambda vms: asked.append([v.name for v in vms]) or {}
    compute.list_run_vms = lambda run_id: [vm("w-1")]  # the delete operation failed: the VM stays RUNNING

    left = compute.delete_run_vms("r", deadline_seconds=65, poll_seconds=5.0, clock=clock, sleep=clock.sleep)

    assert [v.name for v in left] == ["w-1"] and left[0].zone == "us-central1-a"
    assert len(asked) == 3  # at 0 s, 30 s and 60 s: asked again every DELETE_ASK_AGAIN_SECONDS, not at every pass


def test_delete_vms_names_the_deletes_that_were_not_accepted():
    clock = Clock()
    compute = make_compute(clock, retries=1)
    compute._delete_batch = lambda vms: {v.name: http_error(503, "backendError") for v in vms if v.name == "w-2"}
    assert compute.delete_vms([vm("w-1"), vm("w-2")]) == {"w-2"}
    assert clock.slept == [Backoff(jitter=0.0).delay(1)]  # w-2 was asked once more after a wait, then given up


class Request:
    """A googleapiclient request that answers from a script: an exception to raise, or a dict to return."""

    def __init__(self, answers, journal, clock):
        self.answers = list(answers)
        self.journal = journal
        self.clock = clock

    def execute(self, num_retries=0):
        self.journal.append(self.clock.now)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_after_a_rate_limit_every_request_of_the_seam_waits_out_the_same_pause():
    from cflow.errors import RateLimited

    clock = Clock()
    compute = make_compute(clock, retries=0)
    sent = []
    limited = Request([http_error(403, "rateLimitExceeded", "Rate Limit Exceeded")], sent, clock)
    other = Request([{"ok": 2}], sent, clock)

    try:
        compute._execute(limited)
    except RateLimited:
        pass
    else:
        raise AssertionError("the rate limit was not raised")
    assert compute._execute(other) == {"ok": 2}
    # The next request, another one, went out only after the pause the limit asked for.
    assert sent == [0.0, Backoff(jitter=0.0).delay(1)]
    assert compute._execute(Request([{"ok": 3}], sent, clock)) == {"ok": 3} and sent[-1] == sent[-2]  # and then at once


def test_bulk_insert_sends_a_request_id_derived_from_what_it_creates():
    sent = {}

    class Instances:
        def bulkInsert(self, **kwargs):
            sent.update(kwargs)
            return type("R", (), {"execute": lambda self, num_retries=0: {"name": "op-1"}})()

    class ComputeService:
        def instances(self):
            return Instances()

    compute = Compute(ComputeService(), "proj")
    compute.bulk_insert("us-central1-a", ["w-1"], {"machineType": "e2-small"})
    first = sent["requestId"]
    compute.bulk_insert("us-central1-a", ["w-1"], {"machineType": "e2-small"})
    assert sent["requestId"] == first
    compute.bulk_insert("us-central1-a", ["w-1"], {"machineType": "e2-small"}, request_id="5e1f2b0a-0000-4000-8000-000000000001")
    assert sent["requestId"] == "5e1f2b0a-0000-4000-8000-000000000001"


def test_a_404_naming_the_resource_is_absence_but_a_404_naming_nothing_is_no_answer():
    from cflow.errors import NotFound

    clock = Clock()
    compute = make_compute(clock)
    missing = Request([http_error(404, "notFound", "The resource 'projects/proj/global/networks/batch' was not found")], [], clock)
    assert compute._get_or_none(missing) is None
    unserved = Request([http_error(404, "notFound", "The requested URL /compute/v1/projects/proj/global/networks/batch was not found "
                                                    "on this server.")], [], clock)
    try:
        compute._get_or_none(unserved)
    except NotFound as error:
        assert error.resource is None
    else:
        raise AssertionError("a 404 that names no resource was taken as the resource's absence")
