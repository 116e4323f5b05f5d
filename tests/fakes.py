"""In-memory stand-ins for the seams (Pub/Sub, Storage, Compute, Metadata), recording every call in order.

Each fake names the real class it stands in for (``fakes``) and the methods
it adds for tests (``helpers``); every other public method has the real
one's name and parameters (tests/unit/test_fakes.py checks it).
"""

import json
import time
from pathlib import Path

from cflow.errors import NotFound, QuotaExceeded
from cflow.gcp.compute import Compute, PendingCreation, Vm
from cflow.gcp.errors import classify_operation_error
from cflow.gcp.metadata import Metadata
from cflow.gcp.pubsub import PUBLISH_WINDOW, PubSub, Received
from cflow.gcp.storage import RunStorage


class FakePubSub:
    """The worker's Pub/Sub."""

    fakes = PubSub
    helpers = ("kinds",)

    def __init__(self):
        self.calls = []  # (method, args...) in call order
        self.published = []  # (topic, data, attributes)
        self.events = []
        self.queue = []  # Received messages waiting to be pulled

    def pull(self, subscription, max_messages=1, timeout=30.0):
        self.calls.append(("pull", subscription))
        taken, self.queue = self.queue[:max_messages], self.queue[max_messages:]
        return taken

    def publish(self, topic, data, attributes):
        self.calls.append(("publish", topic, attributes.get("cflow_attempt")))
        self.published.append((topic, data, dict(attributes)))
        return str(len(self.published))

    def publish_event(self, topic, event, wait=True):
        self.calls.append(("event", event["type"]))
        self.events.append(event)

    def ack(self, subscription, ack_ids):
        self.calls.append(("ack", tuple(ack_ids)))

    def nack(self, subscription, ack_id):
        self.calls.append(("nack", ack_id))

    def extend_lease(self, subscription, ack_id, seconds):
        self.calls.append(("extend", ack_id, seconds))

    def kinds(self):
        return [call[0] for call in self.calls]


class FakeStorage:
    """The worker's RunStorage."""

    fakes = RunStorage
    helpers = ()

    def __init__(self):
        self.objects = {}  # relative name -> bytes
        self.inputs = {}  # gs:// URL of an item's input -> bytes, or an exception to raise
        self.calls = []

    def url(self, relative=""):
        return f"gs://bucket/run/{relative}"

    def download_input(self, url, local_path):
        self.calls.append(("download", url))
        content = self.inputs.get(url)
        if content is None:
            raise NotFound(f"{url} does not exist", status=404, service="storage")
        if isinstance(content, Exception):
            raise content
        Path(local_path).write_bytes(content)
        return len(content)

    def is_done(self, item_id):
        return f"done/{item_id}" in self.objects

    def upload_output(self, item_id, name, local_path, offset=0):
        self.calls.append(("output", item_id, name))
        self.objects[f"outputs/{item_id}/{name}"] = Path(local_path).read_bytes()[offset:]

    def upload_log(self, item_id, attempt, local_path):
        self.calls.append(("log", item_id, attempt))
        self.objects[f"logs/{item_id}/attempt-{attempt}.log"] = Path(local_path).read_bytes()
        return self.url(f"logs/{item_id}/attempt-{attempt}.log")

    def _create_once(self, relative, info):
        if relative in self.objects:
            return False
        self.objects[relative] = json.dumps(info).encode()
        return True

    def write_done_marker(self, item_id, info):
        self.calls.append(("done-marker", item_id))
        return self._create_once(f"done/{item_id}", info)

    def write_failed_marker(self, item_id, info):
        self.calls.append(("failed-marker", item_id))
        return self._create_once(f"failed/{item_id}", info)

    def write_attempt_marker(self, item_id, attempt, info):
        self.calls.append(("attempt-marker", item_id, attempt))
        return self._create_once(f"attempts/{item_id}/{attempt}", info)

    def attempt_recorded(self, item_id, attempt):
        return f"attempts/{item_id}/{attempt}" in self.objects

    def write_timeline_record(self, span):
        self.calls.append(("timeline", span.item, span.attempt, span.outcome.value))
        self.objects[f"timeline/{span.item}/{span.attempt}-{span.vm}-{int(span.ended * 1000)}"] = json.dumps(span.fields()).encode()

    def write_lane_marker(self, lane, item_id, info):
        self.calls.append(("lane-marker", lane, item_id))
        self.objects[f"lanes/{lane}/{item_id}"] = json.dumps(info).encode()


class FakeMetadata:
    fakes = Metadata
    helpers = ("set_attributes",)

    def __init__(self, preempted=False):
        self.is_preempted = preempted
        self.attributes = {}
        self.version = 0

    def preempted(self):
        return self.is_preempted

    def watch_attributes(self, last_etag, timeout_seconds=60):
        if last_etag == str(self.version):
            time.sleep(0.05)  # a short stand-in for the server holding the call until something changes
        return dict(self.attributes), str(self.version)

    def set_attributes(self, **attributes):
        self.attributes.update(attributes)
        self.version += 1


def received(item, attempt, ack_id="ack-1"):
    from cflow import tasks

    data, attributes = tasks.encode_message(item, attempt)
    return Received(ack_id=ack_id, data=data, attributes=attributes, delivery_attempt=1)


class FakeCompute:
    """Compute seam double: VMs in a dict, creations settled by the test."""

    fakes = Compute
    helpers = ("set_status", "count")

    def __init__(self):
        self.project = "proj"
        self.vms = {}  # name -> Vm
        self.undeletable = set()  # names whose deletes GCE never carries out
        self.calls = []
        self.pending_results = {}  # operation -> errors (None while running)
        self.quota_left = None  # None: no quota
        self.stockout_zones = set()
        self.request_ids = []  # the requestId of each bulkInsert, in call order

    def list_run_vms(self, run_id):
        self.calls.append(("list", run_id))
        return list(self.vms.values())

    def bulk_insert(self, zone, names, instance_properties, request_id=None):
        self.calls.append(("bulkInsert", zone, tuple(names)))
        self.request_ids.append(request_id)
        if self.quota_left is not None and len(names) > self.quota_left:
            raise QuotaExceeded("Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1.", metric="CPUS", region="us-central1", limit=8.0)
        operation = f"op-{len(self.calls)}"
        if zone in self.stockout_zones:
            self.pending_results[operation] = [
                classify_operation_error({"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "not enough resources"}, zone)
            ]
        else:
            self.pending_results[operation] = []
            scheduling = instance_properties.get("scheduling") or {}
            for name in names:
                self.vms[name] = Vm(name=name, zone=zone, status="RUNNING", status_message="", labels=dict(instance_properties.get("labels") or {}),
                                    machine_type=str(instance_properties.get("machineType", "")),
                                    spot=scheduling.get("provisioningModel") == "SPOT" if scheduling else None)
        return PendingCreation(zone=zone, operation=operation, names=tuple(names))

    def set_metadata_attributes(self, zone, name, attributes, attempts=3):
        self.calls.append(("setMetadata", name, dict(attributes)))
        return name in self.vms

    def creation_result(self, pending):
        return self.pending_results.get(pending.operation)

    def delete_vms(self, vms):
        vms = list(vms)
        self.calls.append(("delete", tuple(sorted(vm.name for vm in vms))))
        for vm in vms:
            self.vms.pop(vm.name, None)
        return set()

    def delete_run_vms(self, run_id, deadline_seconds=300, poll_seconds=1.0, clock=time.monotonic, sleep=None):
        self.calls.append(("delete-run", run_id))
        self.vms = {name: vm for name, vm in self.vms.items() if name in self.undeletable}
        return sorted(self.vms.values(), key=lambda vm: vm.name)

    def set_status(self, name, status, message=""):
        vm = self.vms[name]
        self.vms[name] = Vm(name=vm.name, zone=vm.zone, status=status, status_message=message, labels=vm.labels,
                            machine_type=vm.machine_type, spot=vm.spot)

    def count(self, method):
        return sum(1 for call in self.calls if call[0] == method)


class FakeRunStorage:
    """Markers only, as the scheduler reads them."""

    fakes = RunStorage
    helpers = ()

    def __init__(self, run_id="0101-0000-abcd"):
        self.run_id = run_id
        self.done = set()
        self.failed = set()
        self.failed_info = {}
        self.cancelled = None  # cancelled.json's record, once the run is cancelled
        self.listings = 0  # how often the done markers were listed
        self.vm_history = None  # vms.json, once written
        self.vm_history_writes = 0
        self.lanes = {}  # lane -> item ids moved there
        self.account = None  # scheduler.json, once written

    def read_cancelled(self):
        return self.cancelled

    def mark_cancelled(self, now):
        if self.cancelled is None:
            self.cancelled = {"time": now}
        return self.cancelled

    def list_done_ids(self):
        self.listings += 1
        return set(self.done)

    def list_failed_ids(self):
        return set(self.failed)

    def write_failed_marker(self, item_id, info):
        if item_id in self.failed:
            return False
        self.failed.add(item_id)
        self.failed_info[item_id] = info
        return True

    def write_vm_history(self, document):
        self.vm_history = json.loads(json.dumps(document))
        self.vm_history_writes += 1

    def read_vm_history(self):
        return self.vm_history

    def list_lane_ids(self, lane):
        return set(self.lanes.get(lane, ()))

    def write_scheduler_account(self, document):
        self.account = json.loads(json.dumps(document))

    def read_scheduler_account(self):
        return self.account


class FakeSchedulerPubSub(FakePubSub):
    """The scheduler's Pub/Sub: events and dead letters handed out by the test."""

    def __init__(self):
        super().__init__()
        self.pending_events = []
        self.dead = []
        self.subscriptions_exist = True

    def create_run_topics(self, topics, ack_deadline_seconds):
        self.calls.append(("create-topics", ack_deadline_seconds))
        created = not self.subscriptions_exist
        self.subscriptions_exist = True
        return created

    def delete_run_topics(self, topics):
        self.calls.append(("delete-topics", topics.work_topic))
        self.subscriptions_exist = False

    def drain_events(self, subscription, max_messages=1000, timeout=0.5):
        if not self.subscriptions_exist:
            raise NotFound("Pub/Sub refused a request: Subscription does not exist")
        events, self.pending_events = self.pending_events, []
        return events

    def pull(self, subscription, max_messages=1, timeout=30.0):
        if "dead" in subscription:
            taken, self.dead = self.dead, []
            return taken
        return super().pull(subscription, max_messages, timeout)

    def publish_many(self, topic, messages, on_progress=None, max_outstanding=PUBLISH_WINDOW):
        count = 0
        for data, attributes in messages:
            self.publish(topic, data, attributes)
            count += 1
        return count


class ScriptedCompute:
    """Answers the Compute calls ImageBuilder makes; the serial console plays ``chunks``, one per read."""

    fakes = Compute
    helpers = ()

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.calls = []
        self.console = ""

    def insert_vm(self, zone, body, request_id=None):
        self.calls.append(("insert_vm", body["name"]))
        self.body = body
        return "op-insert"

    def wait_operation(self, operation, zone=None):
        self.calls.append(("wait", operation))
        return {"status": "DONE"}

    def serial_output(self, zone, name, start=0):
        if self.chunks:
            self.console += self.chunks.pop(0)
        return self.console[start:], len(self.console)

    def stop_vm(self, zone, name):
        self.calls.append(("stop_vm", name))
        return "op-stop"

    def insert_image_from_disk(self, name, family, zone, disk, description=""):
        self.calls.append(("insert_image", name, family, disk))
        return "op-image"

    def get_image(self, name):
        return {"name": name, "status": "READY"}

    def delete_vm(self, zone, name):
        self.calls.append(("delete_vm", name))
        return "op-delete"


class FakeProjectCompute:
    """What the preflight reads of a project: zones, images, machine and GPU types, networks, quotas, set by the test."""

    fakes = Compute
    helpers = ("set_quota",)

    def __init__(self, project="proj"):
        from cflow.gcp.compute import Quota
        from cflow.zones import KNOWN_ZONES

        self.project = project
        self.zones = set(KNOWN_ZONES)
        self.images = {"projects/debian-cloud/global/images/family/debian-12"}
        self.machine_types = {"e2-small": 2, "e2-standard-2": 2, "e2-standard-4": 4, "n2-standard-4": 4, "n1-standard-4": 4}
        self.accelerator_zones = {}  # GPU type -> the zones that offer it (a type not named: every zone)
        auto_subnets = [f"https://compute/projects/{project}/regions/{region}/subnetworks/default"
                        for region in ("us-central1", "us-east1", "europe-west1")]
        self.networks = {(project, "default"): {"name": "default", "autoCreateSubnetworks": True, "subnetworks": auto_subnets}}
        self.subnetworks = {}  # (project, region, name) -> resource
        self.quotas = {}  # region -> {metric: Quota}
        self.global_quotas = {}
        self.default_account = "123-compute@developer.gserviceaccount.com"
        self.calls = []
        self.Quota = Quota

    def set_quota(self, region, metric, limit, usage=0):
        self.quotas.setdefault(region, {})[metric] = self.Quota(metric, float(limit), float(usage))

    def zone_exists(self, zone):
        return zone in self.zones

    def find_image(self, image_url):
        self.calls.append(("image", image_url))
        return {"name": image_url} if image_url in self.images else None

    def machine_type(self, zone, name):
        cpus = self.machine_types.get(name)
        return None if cpus is None else {"name": name, "guestCpus": cpus}

    def accelerator_type(self, zone, name):
        self.calls.append(("accelerator_type", zone, name))
        return {"name": name, "zone": zone} if zone in self.accelerator_zones.get(name, self.zones) else None

    def network(self, name, project=None):
        self.calls.append(("network", project or self.project, name))
        return self.networks.get((project or self.project, name))

    def subnetwork(self, region, name, project=None):
        self.calls.append(("subnetwork", project or self.project, region, name))
        return self.subnetworks.get((project or self.project, region, name))

    def region_quotas(self, region):
        self.calls.append(("region", region))
        return dict(self.quotas.get(region, {}))

    def project_quotas(self):
        return dict(self.global_quotas)

    def default_service_account(self):
        return self.default_account
