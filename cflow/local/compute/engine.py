"""The Compute Engine control plane: instances, operations and their state machine.

Instance states, as on GCE:

- insert / start: PROVISIONING -> STAGING -> RUNNING (``boot_delay_s`` split
  over the first two); the startup script starts on entering RUNNING, and the
  operation is DONE then. A startup script that exits leaves the VM RUNNING.
- stop, preemption, guest poweroff: STOPPING (shutdown script, SIGTERM,
  SIGKILL; see ``vm.PowerOff``) -> TERMINATED. Preemption sets
  ``instance/preempted`` TRUE first, ends with statusMessage "Instance was
  preempted." and records a ``compute.instances.preempted`` operation;
  ``instanceTerminationAction: DELETE`` deletes the VM instead.
- delete: STOPPING -> gone (404).

Disks: each disk of a VM is a resource of its zone (named as GCE names
them: the VM's name for the boot disk unless ``initializeParams.diskName``);
it goes with its VM when ``autoDelete`` is true, else it stays, detached.
A boot disk's content is the VM's disk directory. ``images.insert`` copies
that tree (``disk_images.DiskImages``) on a thread of its own and answers a
global operation that is DONE when the image is READY; a VM made from a
project image starts with a copy of the image's tree.

Everything mutable sits behind ``self.lock``; ``changed`` is notified on
every state change (operations.wait), ``metadata_changed`` when what a guest
sees changes (metadata ``wait_for_change``). Slow work (waiting for guest
processes) happens on the PowerOff thread, timed work on the TimerQueue.
"""

import base64
import copy
import functools
import json
import logging
import os
import re
import threading

from cflow.local.compute import api_errors, validation
from cflow.local.compute.catalog import PUBLIC_PROJECTS
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.metadata import Verbatim
from cflow.local.compute.resources import Disk, Instance, Operation, fingerprint, project_number, rfc3339
from cflow.local.compute.vm import SERIAL_LOG_NAME

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESULTS = 500
OPERATION_WAIT_S = 120
MAX_KEPT_OPERATIONS = 20000
MAX_BULK_COUNT = 1000
STANDARD_GRACE_S = 90
INTERRUPTIBLE_GRACE_S = 30
REAP_INTERVAL_S = 1.0
BOOTING = ("PROVISIONING", "STAGING")
PREEMPTED_MESSAGE = "Instance was preempted."


class RawJson(str):
    """A response body that is already JSON text (list pages are built from cached text)."""


def _page_token(value):
    return base64.urlsafe_b64encode(value.encode()).decode()


def _page_after(token):
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise api_errors.invalid_field("pageToken", token, "Invalid page token.") from None


def _max_results(value):
    if value in (None, ""):
        return DEFAULT_MAX_RESULTS
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise api_errors.invalid_field("maxResults", value, "Expected an integer.") from None
    if number < 0 or number > DEFAULT_MAX_RESULTS:
        raise api_errors.invalid_field("maxResults", value, f"Must be greater than or equal to 0 and less than or equal to {DEFAULT_MAX_RESULTS}")
    return number or DEFAULT_MAX_RESULTS


class ComputeEngine:
    """Instances and zonal operations of any number of projects.

    Args:
        base_url: ``http://H:P/compute/v1/`` (selfLinks point here).
        catalog: a Catalog (zones, machine types, images).
        faults: a Faults.
        launcher: a vm.GuestLauncher.
        power_off: a vm.PowerOff.
        disk_images: a disk_images.DiskImages (image content on the host).
        timers: a timers.TimerQueue.
        wall_clock: ``time.time``-like (timestamps).
        boot_delay_s: time spent in PROVISIONING + STAGING.
        shutdown_grace_s: overrides the grace period (30 s Spot, 90 s standard).
        id_random: a ``random.Random`` for resource ids.
        metadata_host: the address VMs reach their metadata server on.

    Public methods take the request's path parameters and parsed JSON body,
    return JSON-ready dicts (or RawJson) and raise ``ApiError``.
    """

    def __init__(self, *, base_url, catalog, faults, launcher, power_off, disk_images, timers, wall_clock, boot_delay_s=0.0, shutdown_grace_s=None, id_random, metadata_host="127.0.0.1"):
        self.base_url = base_url
        self.catalog = catalog
        self.faults = faults
        self.launcher = launcher
        self.power_off = power_off
        self.disk_images = disk_images
        self.timers = timers
        self.wall_clock = wall_clock
        self.boot_delay_s = boot_delay_s
        self.shutdown_grace_s = shutdown_grace_s
        self.id_random = id_random
        self.metadata_host = metadata_host
        self.metadata_servers = None
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.metadata_changed = threading.Condition(self.lock)
        self.instances = {}
        self.instances_by_id = {}
        self.operations = {}
        self.disks = {}
        self.image_trees = {}  # (project, image name) -> its tree on the host
        self.closing = False
        self._used_ids = set()
        self._addresses_given = 0
        self._operation_sequence = 0

    def bind_metadata_servers(self, metadata_servers):
        self.metadata_servers = metadata_servers

    def start_reaper(self):
        self.timers.call_later(REAP_INTERVAL_S, self._reap)

    # Small helpers (callers hold the lock where they touch state).

    def _now(self):
        return rfc3339(self.wall_clock())

    def _new_id(self):
        while True:
            candidate = self.id_random.getrandbits(63) | (1 << 62)
            if candidate not in self._used_ids:
                self._used_ids.add(candidate)
                return candidate

    def _zone_url(self, project, zone):
        return f"{self.base_url}projects/{project}/zones/{zone}"

    def _check_zone(self, zone):
        if self.catalog.region_of(zone) is None:
            raise api_errors.invalid_field("zone", zone, "Unknown zone.")

    def _instance(self, project, zone, name):
        instance = self.instances.get((project, zone, name))
        if instance is None:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return instance

    def _refuse_if_closing(self):
        if self.closing:
            raise api_errors.backend_error()

    def _grace_s(self, instance):
        if self.shutdown_grace_s is not None:
            return self.shutdown_grace_s
        return INTERRUPTIBLE_GRACE_S if instance.is_spot_or_preemptible else STANDARD_GRACE_S

    def _live_in_zone(self, zone):
        return sum(1 for instance in self.instances.values() if instance.zone == zone and instance.status != "TERMINATED")

    def _cpus_in_region(self, project, region):
        return sum(
            instance.cpus
            for instance in self.instances.values()
            if instance.project == project and instance.region == region and instance.status != "TERMINATED"
        )

    def _check_quota(self, project, zone, cpus_each, wanted, minimum):
        """Returns how many of ``wanted`` VMs the CPU quota allows; raises 403 below ``minimum``."""
        region = self.catalog.region_of(zone)
        free = self.faults.free_cpus(self._cpus_in_region(project, region))
        if free is None:
            return wanted
        fit = free // cpus_each
        if fit < minimum:
            raise api_errors.quota_exceeded("CPUS", self.faults.cpu_quota, region)
        return min(wanted, fit)

    def _new_operation(self, project, zone, operation_type, target_link, target_id=None, user=None):
        self._operation_sequence += 1
        now = self.wall_clock()
        operation = Operation(
            id=self._new_id(),
            name=f"operation-{int(now * 1000)}-{self.id_random.getrandbits(52):013x}-{self.id_random.getrandbits(32):08x}-{self.id_random.getrandbits(32):08x}",
            project=project,
            zone=zone,
            operation_type=operation_type,
            target_link=target_link,
            target_id=target_id,
            status="RUNNING",
            progress=0,
            insert_ts=rfc3339(now),
            start_ts=rfc3339(now),
            user=user or f"cflow-emulator@{project}.iam.gserviceaccount.com",
            sequence=self._operation_sequence,
        )
        self.operations[operation.key] = operation
        if len(self.operations) > MAX_KEPT_OPERATIONS:
            for key in [key for key, old in self.operations.items() if old.status == "DONE"][: len(self.operations) // 10]:
                del self.operations[key]
        return operation

    def _finish_operation(self, operation, errors=None, http_code=None, http_message=None):
        if operation.status == "DONE":
            return
        operation.status = "DONE"
        operation.progress = 100
        operation.end_ts = self._now()
        if errors:
            operation.errors = errors
            operation.http_error_code = http_code
            operation.http_error_message = http_message
        if operation.bulk_status is not None:
            operation.bulk_status["status"] = "DONE"
        self.changed.notify_all()

    def _fail_operation_later(self, operation, errors, http_code, http_message):
        def fail():
            with self.lock:
                self._finish_operation(operation, errors, http_code, http_message)

        self.timers.call_later(self.boot_delay_s / 2, fail)

    def _stockout(self, operation, project, zone):
        message = (
            f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the request.  "
            "Try a different zone, or try again later."
        )
        self._fail_operation_later(operation, [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": message}], 503, "SERVICE UNAVAILABLE")

    def _next_address(self):
        number = self._addresses_given
        self._addresses_given += 1
        return f"10.{128 + (number // 64516) % 128}.{(number // 254) % 254}.{number % 254 + 2}"

    def _create_instance(self, project, zone, spec, name, hostname=None):
        instance_id = self._new_id()
        interfaces = []
        for requested in spec["network_interfaces"]:
            interface = dict(requested, networkIP=self._next_address())
            interface["natIP"] = "34.{}.{}.{}".format(*interface["networkIP"].split(".")[1:])
            interfaces.append(interface)
        disks = self._disk_specs(spec, name)
        metadata_items = copy.deepcopy(spec["metadata_items"])
        instance = Instance(
            id=instance_id,
            name=name,
            project=project,
            zone=zone,
            region=self.catalog.region_of(zone),
            machine_type=spec["machine_type"],
            cpus=spec["cpus"],
            status="PROVISIONING",
            description=spec["description"],
            labels=dict(spec["labels"]),
            label_fingerprint=fingerprint(spec["labels"]),
            metadata_items=metadata_items,
            metadata_fingerprint=fingerprint([metadata_items, 0]),
            scheduling=dict(spec["scheduling"]),
            network_interfaces=interfaces,
            disks=disks,
            service_accounts=copy.deepcopy(spec["service_accounts"]),
            tags=list(spec["tags"]),
            hostname=hostname or spec["hostname"],
            creation_ts=self._now(),
        )
        instance.metadata_port = self.metadata_servers.open(instance_id)
        self.instances[instance.key] = instance
        self._attach_new_disks(instance)
        self.instances_by_id[instance_id] = instance
        self._schedule_boot(instance)
        self.changed.notify_all()
        return instance

    @staticmethod
    def _disk_specs(spec, name):
        disks = [dict(disk) for disk in spec["disks"]]
        if spec["name"] is None:
            # bulkInsert: one properties block for many VMs, so disk names follow each VM's name.
            for disk in disks:
                disk["diskName"] = disk["deviceName"] = name if disk["boot"] else f"{name}-{disk['index']}"
        return disks

    def _refuse_taken_disk_names(self, project, zone, spec, names):
        for name in names:
            for disk in self._disk_specs(spec, name):
                if (project, zone, disk["diskName"]) in self.disks:
                    raise api_errors.already_exists(f"projects/{project}/zones/{zone}/disks/{disk['diskName']}")

    def _attach_new_disks(self, instance):
        """Creates the disk resources of a new VM; a boot disk from a project image holds that image's tree."""
        for spec in instance.disks:
            disk = Disk(
                id=self._new_id(),
                name=spec["diskName"],
                project=instance.project,
                zone=instance.zone,
                size_gb=spec["diskSizeGb"],
                disk_type=spec.get("diskType") or "pd-standard",
                source_image=spec.get("sourceImage"),
                source_image_id=spec.get("sourceImageId"),
                licenses=list(spec.get("licenses") or []),
                directory=self.launcher.disk_dir(instance.name, instance.id) if spec["boot"] else None,
                user=instance.key,
                creation_ts=instance.creation_ts,
                last_attach_ts=instance.creation_ts,
            )
            self.disks[disk.key] = disk
            tree = self._image_tree_of(spec.get("sourceImage")) if spec["boot"] else None
            if tree is not None:
                self.disk_images.hold(tree)
                instance.disk_image = tree

    def _image_tree_of(self, image_link):
        if not image_link:
            return None
        project, _, name = image_link.split("/compute/v1/")[-1].removeprefix("projects/").partition("/global/images/")
        return self.image_trees.get((project, name))

    def _detach_disks(self, instance):
        """The VM is gone: its ``autoDelete`` disks go too, the others stay, detached."""
        for spec in instance.disks:
            disk = self.disks.get((instance.project, instance.zone, spec["diskName"]))
            if disk is None or disk.user != instance.key:
                continue
            if spec["autoDelete"]:
                del self.disks[disk.key]
            else:
                disk.user = None
                disk.last_detach_ts = self._now()
        if instance.disk_image is not None:
            self.disk_images.release(instance.disk_image)
            instance.disk_image = None

    # Boot.

    def _schedule_boot(self, instance):
        self.timers.call_later(self.boot_delay_s / 2, self._boot_stage, instance.id, instance.epoch)

    def _boot_stage(self, instance_id, epoch):
        with self.lock:
            instance = self.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "PROVISIONING":
                return
            instance.status = "STAGING"
            instance.touch()
            self.changed.notify_all()
        self.timers.call_later(self.boot_delay_s / 2, self._boot_run, instance_id, epoch)

    def _boot_run(self, instance_id, epoch):
        with self.lock:
            instance = self.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "STAGING":
                return
            image_tree, instance.disk_image = instance.disk_image, None
            disk_dir = self.launcher.disk_dir(instance.name, instance.id)
        if image_tree is not None:
            # Outside the lock: copying a large image must not stall the API.
            self._initialise_disk(image_tree, disk_dir)
        with self.lock:
            instance = self.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "STAGING":
                return
            guest = self.launcher.prepare_disk(instance.name, instance.id, f"{self.metadata_host}:{instance.metadata_port}")
            try:
                self.launcher.boot(guest, instance.metadata_value("startup-script"))
            except OSError as error:
                logger.warning("startup script of %s did not start: %s", instance.name, error)
                with open(guest.serial_log, "ab") as serial:
                    serial.write(f"cflow-emulator: startup-script failed to start: {error}\n".encode())
            instance.guest = guest
            instance.status = "RUNNING"
            instance.status_message = None
            instance.last_start_ts = self._now()
            instance.touch()
            self._complete_boot_operations(instance)
            if instance.is_spot_or_preemptible:
                delay = self.faults.preemption_delay()
                if delay is not None:
                    self.timers.call_later(delay, self._preempt_due, instance.id, instance.epoch)
            self.changed.notify_all()

    def _initialise_disk(self, image_tree, disk_dir):
        try:
            self.disk_images.restore(image_tree, disk_dir)
        except OSError as error:
            logger.warning("disk %s was not initialised from its image: %s", disk_dir, error)
            os.makedirs(disk_dir, exist_ok=True)
            with open(os.path.join(disk_dir, SERIAL_LOG_NAME), "ab") as serial:
                serial.write(f"cflow-emulator: disk not initialised from its image: {error}\n".encode())

    def _complete_boot_operations(self, instance):
        for operation in instance.boot_operations:
            operation.remaining -= 1
            if operation.remaining <= 0:
                self._finish_operation(operation)
        instance.boot_operations = []

    # Power-off.

    def _begin_power_off(self, instance, after_stop, status_message=None):
        if instance.status in BOOTING:
            self._complete_boot_operations(instance)
        instance.epoch += 1
        instance.status = "STOPPING"
        instance.after_stop = after_stop
        instance.stop_status_message = status_message
        instance.touch()
        self.changed.notify_all()
        done = functools.partial(self._powered_off, instance.id)
        if instance.guest is None:
            self.timers.call_later(0, done)
        else:
            self.power_off.submit(instance.guest, instance.metadata_value("shutdown-script"), self._grace_s(instance), done)

    def _powered_off(self, instance_id):
        with self.lock:
            instance = self.instances_by_id.get(instance_id)
            if instance is None:
                return
            instance.guest = None
            instance.last_stop_ts = self._now()
            for operation in instance.stop_operations:
                self._finish_operation(operation)
            instance.stop_operations = []
            if instance.after_stop == "delete":
                self._remove(instance)
            else:
                instance.status = "TERMINATED"
                instance.status_message = instance.stop_status_message
                instance.touch()
            self.changed.notify_all()

    def _remove(self, instance):
        instance.epoch += 1
        self._complete_boot_operations(instance)
        for operation in instance.stop_operations + instance.delete_operations:
            self._finish_operation(operation)
        instance.stop_operations = []
        instance.delete_operations = []
        self.instances.pop(instance.key, None)
        self.instances_by_id.pop(instance.id, None)
        self._detach_disks(instance)
        self.metadata_servers.close(instance.id)
        self.changed.notify_all()
        self.metadata_changed.notify_all()

    def _preempt(self, instance):
        instance.preempted = True
        instance.metadata_version += 1
        self.metadata_changed.notify_all()
        operation = self._new_operation(
            instance.project, instance.zone, "compute.instances.preempted", instance.self_link(self.base_url), instance.id, user="system"
        )
        operation.status_message = PREEMPTED_MESSAGE
        instance.stop_operations.append(operation)
        after = "delete" if instance.scheduling.get("instanceTerminationAction") == "DELETE" else "terminate"
        logger.info("preempting %s (then %s)", instance.name, after)
        self._begin_power_off(instance, after, PREEMPTED_MESSAGE)

    def _preempt_due(self, instance_id, epoch):
        with self.lock:
            instance = self.instances_by_id.get(instance_id)
            if instance is not None and instance.epoch == epoch and instance.status == "RUNNING" and not self.closing:
                self._preempt(instance)

    def _reap(self):
        with self.lock:
            if self.closing:
                return
            guests = [instance.guest for instance in self.instances.values() if instance.status == "RUNNING" and instance.guest is not None]
        for guest in guests:
            try:
                self.launcher.reap(guest)
            except OSError:
                logger.exception("reaping %s failed", guest.disk_dir)
        self.timers.call_later(REAP_INTERVAL_S, self._reap)

    # instances.*

    def insert_instance(self, project, zone, body):
        self._check_zone(zone)
        spec = validation.instance_spec(body, project, zone, self.catalog)
        with self.lock:
            self._refuse_if_closing()
            name = spec["name"]
            if (project, zone, name) in self.instances:
                raise api_errors.already_exists(f"projects/{project}/zones/{zone}/instances/{name}")
            self._refuse_taken_disk_names(project, zone, spec, [name])
            self._check_quota(project, zone, spec["cpus"], 1, 1)
            operation = self._new_operation(project, zone, "insert", f"{self._zone_url(project, zone)}/instances/{name}")
            free = self.faults.free_capacity(zone, self._live_in_zone(zone))
            if free is not None and free < 1:
                self._stockout(operation, project, zone)
            else:
                instance = self._create_instance(project, zone, spec, name)
                operation.target_id = instance.id
                operation.remaining = 1
                instance.boot_operations.append(operation)
            return operation.to_json(self.base_url)

    def bulk_insert(self, project, zone, body):
        self._check_zone(zone)
        field = "bulkInsertInstanceResource"
        if not isinstance(body, dict):
            raise api_errors.invalid_field(field, "", "Expected an object.")
        per_instance = body.get("perInstanceProperties") or {}
        if not isinstance(per_instance, dict):
            raise api_errors.invalid_field(f"{field}.perInstanceProperties", "", "Expected a map.")
        for name, properties in per_instance.items():
            validation.check_name(name, f"{field}.perInstanceProperties")
            if not isinstance(properties, dict):
                raise api_errors.invalid_field(f"{field}.perInstanceProperties[{name}]", "", "Expected an object.")
        if body.get("count") is None:
            if not per_instance:
                raise api_errors.required(f"{field}.count")
            count = len(per_instance)
        else:
            count = validation.parse_int64(body["count"], f"{field}.count")
        if not 1 <= count <= MAX_BULK_COUNT:
            raise api_errors.invalid_field(f"{field}.count", count, f"Must be between 1 and {MAX_BULK_COUNT}.")
        min_count = validation.parse_int64(body["minCount"], f"{field}.minCount") if body.get("minCount") is not None else count
        if min_count < 1 or min_count > count:
            raise api_errors.invalid_field(f"{field}.minCount", min_count, "Must be between 1 and count.")
        pattern = body.get("namePattern")
        if not pattern and not per_instance:
            raise api_errors.invalid_field(f"{field}.namePattern", "", "Either namePattern or perInstanceProperties must be set.")
        if len(per_instance) > count:
            raise api_errors.invalid_field(f"{field}.count", count, "Count must not be less than the number of perInstanceProperties.")
        if not pattern and len(per_instance) < count:
            raise api_errors.invalid_field(f"{field}.count", count, "Without namePattern, count must equal the number of perInstanceProperties.")
        if body.get("sourceInstanceTemplate"):
            raise api_errors.bad_request("The Compute emulator does not support sourceInstanceTemplate; send instanceProperties.")
        if body.get("instanceProperties") is None:
            raise api_errors.required(f"{field}.instanceProperties")
        spec = validation.instance_spec(body["instanceProperties"], project, zone, self.catalog, f"{field}.instanceProperties", name_required=False)
        pattern_parts = validation.name_pattern_parts(pattern) if pattern else None
        with self.lock:
            self._refuse_if_closing()
            for name in per_instance:
                if (project, zone, name) in self.instances:
                    raise api_errors.already_exists(f"projects/{project}/zones/{zone}/instances/{name}")
            self._refuse_taken_disk_names(project, zone, spec, per_instance)
            allowed = self._check_quota(project, zone, spec["cpus"], count, min_count)
            operation = self._new_operation(project, zone, "bulkInsert", self._zone_url(project, zone))
            free = self.faults.free_capacity(zone, self._live_in_zone(zone))
            if free is not None and free < min_count:
                operation.bulk_status = {"targetVmCount": count, "createdVmCount": 0, "failedToCreateVmCount": count, "deletedVmCount": 0, "status": "CREATING"}
                self._stockout(operation, project, zone)
                return operation.to_json(self.base_url)
            to_create = allowed if free is None else min(allowed, free)
            names = list(per_instance)[:to_create]
            if len(names) < to_create:
                names += self._pattern_names(project, zone, pattern_parts, to_create - len(names), set(per_instance))
            operation.remaining = len(names)
            operation.bulk_status = {"targetVmCount": count, "createdVmCount": len(names), "failedToCreateVmCount": count - len(names), "deletedVmCount": 0, "status": "CREATING"}
            for name in names:
                hostname = per_instance.get(name, {}).get("hostname")
                instance = self._create_instance(project, zone, spec, name, hostname=hostname if isinstance(hostname, str) else None)
                instance.boot_operations.append(operation)
            return operation.to_json(self.base_url)

    def _pattern_names(self, project, zone, pattern_parts, how_many, reserved):
        prefix, digits, suffix = pattern_parts
        numbered = re.compile(re.escape(prefix) + f"([0-9]{{{digits}}})" + re.escape(suffix))
        taken = [name for (owner, where, name) in self.instances if owner == project and where == zone] + list(reserved)
        taken += [name for (owner, where, name) in self.disks if owner == project and where == zone]
        highest = max((int(match.group(1)) for match in map(numbered.fullmatch, taken) if match), default=0)
        if highest + how_many >= 10**digits:
            raise api_errors.invalid_field("bulkInsertInstanceResource.namePattern", prefix + "#" * digits + suffix, "Not enough free names for the requested count.")
        return [f"{prefix}{number:0{digits}d}{suffix}" for number in range(highest + 1, highest + 1 + how_many)]

    def get_instance(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            return self._instance(project, zone, name).to_json(self.base_url)

    def list_instances(self, project, zone, filter_text=None, max_results=None, page_token=None):
        self._check_zone(zone)
        predicate = compile_filter(filter_text)
        limit = _max_results(max_results)
        after = _page_after(page_token)
        with self.lock:
            candidates = sorted((instance for (owner, where, _), instance in self.instances.items() if owner == project and where == zone), key=lambda instance: instance.name)
            texts, last_name, more = self._page(candidates, predicate, limit, after, key=lambda instance: instance.name)
        self_link = f"{self._zone_url(project, zone)}/instances"
        head = {"kind": "compute#instanceList", "id": f"projects/{project}/zones/{zone}/instances", "selfLink": self_link}
        if more:
            head["nextPageToken"] = _page_token(last_name)
        if not texts:
            head["items"] = []
            return head
        return RawJson(json.dumps(head)[:-1] + ',"items":[' + ",".join(texts) + "]}")

    def _page(self, candidates, predicate, limit, after, key):
        texts = []
        last = None
        for instance in candidates:
            if after is not None and key(instance) <= after:
                continue
            if not predicate(instance.to_json(self.base_url)):
                continue
            if len(texts) == limit:
                return texts, last, True
            texts.append(instance.to_text(self.base_url))
            last = key(instance)
        return texts, last, False

    def aggregated_list_instances(self, project, filter_text=None, max_results=None, page_token=None):
        predicate = compile_filter(filter_text)
        limit = _max_results(max_results)
        after = _page_after(page_token)
        scope_of = lambda instance: f"{instance.zone}/{instance.name}"  # noqa: E731
        with self.lock:
            candidates = sorted((instance for instance in self.instances.values() if instance.project == project), key=scope_of)
            selected = []
            more = False
            for instance in candidates:
                if after is not None and scope_of(instance) <= after:
                    continue
                if not predicate(instance.to_json(self.base_url)):
                    continue
                if len(selected) == limit:
                    more = True
                    break
                selected.append((instance.zone, instance.to_text(self.base_url), scope_of(instance)))
        by_zone = {}
        for zone, text, _ in selected:
            by_zone.setdefault(zone, []).append(text)
        parts = []
        for zone in self.catalog.zone_names():
            scope = f"zones/{zone}"
            if zone in by_zone:
                parts.append(json.dumps(scope) + ':{"instances":[' + ",".join(by_zone[zone]) + "]}")
            else:
                warning = {
                    "code": "NO_RESULTS_ON_PAGE",
                    "message": f"There are no results for scope '{scope}' on this page.",
                    "data": [{"key": "scope", "value": scope}],
                }
                parts.append(json.dumps(scope) + ":" + json.dumps({"warning": warning}))
        head = {"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances", "selfLink": f"{self.base_url}projects/{project}/aggregated/instances"}
        if more:
            head["nextPageToken"] = _page_token(selected[-1][2])
        return RawJson(json.dumps(head)[:-1] + ',"items":{' + ",".join(parts) + "}}")

    def delete_instance(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            instance = self._instance(project, zone, name)
            operation = self._new_operation(project, zone, "delete", instance.self_link(self.base_url), instance.id)
            if instance.status == "RUNNING":
                instance.delete_operations.append(operation)
                self._begin_power_off(instance, "delete")
            elif instance.status == "STOPPING":
                instance.after_stop = "delete"
                instance.delete_operations.append(operation)
            else:
                # Nothing runs on a booting or terminated VM: it goes at once.
                self._remove(instance)
                self._finish_operation(operation)
            return operation.to_json(self.base_url)

    def stop_instance(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            instance = self._instance(project, zone, name)
            operation = self._new_operation(project, zone, "stop", instance.self_link(self.base_url), instance.id)
            if instance.status == "TERMINATED":
                self._finish_operation(operation)
            elif instance.status == "STOPPING":
                instance.stop_operations.append(operation)
            else:
                instance.stop_operations.append(operation)
                self._begin_power_off(instance, "terminate")
            return operation.to_json(self.base_url)

    def start_instance(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            self._refuse_if_closing()
            instance = self._instance(project, zone, name)
            if instance.status == "STOPPING":
                raise api_errors.resource_not_ready(f"projects/{project}/zones/{zone}/instances/{name}")
            operation = self._new_operation(project, zone, "start", instance.self_link(self.base_url), instance.id)
            if instance.status != "TERMINATED":
                self._finish_operation(operation)
                return operation.to_json(self.base_url)
            self._check_quota(project, zone, instance.cpus, 1, 1)
            free = self.faults.free_capacity(zone, self._live_in_zone(zone))
            if free is not None and free < 1:
                self._stockout(operation, project, zone)
                return operation.to_json(self.base_url)
            instance.epoch += 1
            instance.status = "PROVISIONING"
            instance.status_message = None
            instance.preempted = False
            instance.metadata_version += 1
            instance.after_stop = None
            instance.touch()
            instance.boot_operations.append(operation)
            operation.remaining = 1
            self._schedule_boot(instance)
            self.metadata_changed.notify_all()
            self.changed.notify_all()
            return operation.to_json(self.base_url)

    def set_labels(self, project, zone, name, body):
        self._check_zone(zone)
        if not isinstance(body, dict):
            raise api_errors.invalid_field("instancesSetLabelsRequest", "", "Expected an object.")
        labels = validation.check_labels(body.get("labels"), "instancesSetLabelsRequest.labels")
        with self.lock:
            instance = self._instance(project, zone, name)
            if body.get("labelFingerprint") != instance.label_fingerprint:
                raise api_errors.condition_not_met("Labels fingerprint either invalid or resource labels have changed")
            operation = self._new_operation(project, zone, "setLabels", instance.self_link(self.base_url), instance.id)
            instance.labels = labels
            instance.label_fingerprint = fingerprint(labels)
            instance.touch()
            self._finish_operation(operation)
            return operation.to_json(self.base_url)

    def set_metadata(self, project, zone, name, body):
        self._check_zone(zone)
        items = validation.check_metadata_items(body if body is not None else {}, "metadata")
        with self.lock:
            instance = self._instance(project, zone, name)
            if body.get("fingerprint") != instance.metadata_fingerprint:
                raise api_errors.condition_not_met("Supplied fingerprint does not match current metadata fingerprint.")
            operation = self._new_operation(project, zone, "setMetadata", instance.self_link(self.base_url), instance.id)
            instance.metadata_items = items
            instance.metadata_version += 1
            instance.metadata_fingerprint = fingerprint([items, instance.metadata_version])
            instance.touch()
            self._finish_operation(operation)
            self.metadata_changed.notify_all()
            return operation.to_json(self.base_url)

    def simulate_maintenance_event(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            instance = self._instance(project, zone, name)
            if instance.status != "RUNNING":
                raise api_errors.resource_not_ready(f"projects/{project}/zones/{zone}/instances/{name}")
            operation = self._new_operation(project, zone, "simulateMaintenanceEvent", instance.self_link(self.base_url), instance.id)
            if instance.is_spot_or_preemptible:
                self._preempt(instance)
            else:
                migration = self._new_operation(
                    project, zone, "compute.instances.migrateOnHostMaintenance", instance.self_link(self.base_url), instance.id, user="system"
                )
                migration.status_message = "Instance migrated during Compute Engine maintenance."
                self._finish_operation(migration)
            self._finish_operation(operation)
            return operation.to_json(self.base_url)

    def serial_port_output(self, project, zone, name, start=None):
        self._check_zone(zone)
        offset = validation.parse_int64(start, "start") if start not in (None, "") else 0
        with self.lock:
            instance = self._instance(project, zone, name)
            path = os.path.join(self.launcher.disk_dir(instance.name, instance.id), SERIAL_LOG_NAME)
            self_link = instance.self_link(self.base_url) + "/serialPort"
        try:
            with open(path, "rb") as serial:
                size = os.fstat(serial.fileno()).st_size
                offset = max(0, min(offset if offset >= 0 else size + offset, size))
                serial.seek(offset)
                contents = serial.read(1024 * 1024)
        except FileNotFoundError:
            contents = b""
            offset = 0
        return {
            "kind": "compute#serialPortOutput",
            "contents": contents.decode(errors="replace"),
            "start": str(offset),
            "next": str(offset + len(contents)),
            "selfLink": self_link,
        }

    # zoneOperations.* and globalOperations.* (a global operation has zone None)

    def _operation(self, project, zone, name):
        operation = self.operations.get((project, zone, name))
        if operation is None:
            raise api_errors.not_found(f"{self._operations_path(project, zone)}/{name}")
        return operation

    @staticmethod
    def _operations_path(project, zone):
        return f"projects/{project}/zones/{zone}/operations" if zone is not None else f"projects/{project}/global/operations"

    def get_operation(self, project, zone, name):
        if zone is not None:
            self._check_zone(zone)
        with self.lock:
            return self._operation(project, zone, name).to_json(self.base_url)

    def wait_operation(self, project, zone, name, timeout_s=OPERATION_WAIT_S):
        """Blocks until the operation is DONE or ``timeout_s`` passes; returns it either way."""
        if zone is not None:
            self._check_zone(zone)
        with self.lock:
            operation = self._operation(project, zone, name)
            self.changed.wait_for(lambda: operation.status == "DONE" or self.closing, timeout_s)
            return operation.to_json(self.base_url)

    def delete_operation(self, project, zone, name):
        if zone is not None:
            self._check_zone(zone)
        with self.lock:
            self._operation(project, zone, name)
            del self.operations[(project, zone, name)]

    def list_operations(self, project, zone, filter_text=None, max_results=None, page_token=None):
        if zone is not None:
            self._check_zone(zone)
        predicate = compile_filter(filter_text)
        limit = _max_results(max_results)
        after = _page_after(page_token)
        after_sequence = int(after) if after and after.isdigit() else 0
        with self.lock:
            items = []
            more = False
            for operation in sorted(self.operations.values(), key=lambda operation: operation.sequence):
                if operation.project != project or operation.zone != zone or operation.sequence <= after_sequence:
                    continue
                rendered = operation.to_json(self.base_url)
                if not predicate(rendered):
                    continue
                if len(items) == limit:
                    more = True
                    break
                items.append((operation.sequence, rendered))
        path = self._operations_path(project, zone)
        result = {
            "kind": "compute#operationList",
            "id": path,
            "items": [rendered for _, rendered in items],
            "selfLink": self.base_url + path,
        }
        if more:
            result["nextPageToken"] = _page_token(str(items[-1][0]))
        return result

    # disks.*

    def _disk(self, project, zone, name):
        disk = self.disks.get((project, zone, name))
        if disk is None:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/disks/{name}")
        return disk

    def get_disk(self, project, zone, name):
        self._check_zone(zone)
        with self.lock:
            return self._disk(project, zone, name).to_json(self.base_url)

    def list_disks(self, project, zone, filter_text=None):
        self._check_zone(zone)
        predicate = compile_filter(filter_text)
        with self.lock:
            rendered = [disk.to_json(self.base_url) for (owner, where, _), disk in sorted(self.disks.items()) if owner == project and where == zone]
        return {
            "kind": "compute#diskList",
            "id": f"projects/{project}/zones/{zone}/disks",
            "items": [disk for disk in rendered if predicate(disk)],
            "selfLink": f"{self._zone_url(project, zone)}/disks",
        }

    def delete_disk(self, project, zone, name):
        """Deletes a detached disk (its content stays on the host, as a deleted VM's does)."""
        self._check_zone(zone)
        with self.lock:
            disk = self._disk(project, zone, name)
            if disk.user is not None:
                user_project, user_zone, user_name = disk.user
                raise api_errors.resource_in_use(disk.path, f"projects/{user_project}/zones/{user_zone}/instances/{user_name}")
            operation = self._new_operation(project, zone, "delete", disk.self_link(self.base_url), disk.id)
            del self.disks[disk.key]
            self._finish_operation(operation)
            return operation.to_json(self.base_url)

    # images.* of projects (public images are read-only; the catalog serves reads)

    def _refuse_public(self, project, permission, name):
        if project in PUBLIC_PROJECTS:
            raise api_errors.permission_denied(permission, f"projects/{project}/global/images/{name}")

    def insert_image(self, project, body, force_create=False):
        """images.insert from a ``sourceDisk``: a global operation, DONE when the image is READY.

        Refuses (400 resourceInUseByAnotherResource) a disk attached to a VM that
        is not TERMINATED, unless ``force_create``.
        """
        spec = validation.image_spec(body)
        self._refuse_public(project, "compute.images.create", spec["name"])
        disk_key = validation.disk_reference(spec["source_disk"], project, "resource.sourceDisk")
        with self.lock:
            self._refuse_if_closing()
            disk = self._disk(*disk_key)
            user = self.instances.get(disk.user) if disk.user is not None else None
            if user is not None and user.status != "TERMINATED" and not force_create:
                raise api_errors.resource_in_use(disk.path, f"projects/{user.project}/zones/{user.zone}/instances/{user.name}")
            image_id = self._new_id()
            self_link = f"{self.base_url}projects/{project}/global/images/{spec['name']}"
            image = {
                "kind": "compute#image",
                "id": str(image_id),
                "creationTimestamp": self._now(),
                "name": spec["name"],
                "description": spec["description"],
                "sourceType": "RAW",
                "status": "PENDING",
                "archiveSizeBytes": "0",
                "diskSizeGb": str(disk.size_gb),
                "sourceDisk": disk.self_link(self.base_url),
                "sourceDiskId": str(disk.id),
                "selfLink": self_link,
                "labelFingerprint": fingerprint({}),
                "storageLocations": ["us"],
                "architecture": "X86_64",
            }
            if spec["family"]:
                image["family"] = spec["family"]
            if disk.licenses:
                image["licenses"] = list(disk.licenses)
            self.catalog.insert_image(project, image)
            tree = self.disk_images.tree_dir(project, spec["name"], image_id)
            self.image_trees[(project, spec["name"])] = tree
            operation = self._new_operation(project, None, "insert", self_link, image_id)
            source_dir = disk.directory
        threading.Thread(
            target=self._capture_image, args=(project, spec["name"], source_dir, tree, operation), name="compute-image", daemon=True
        ).start()
        return operation.to_json(self.base_url)

    def _capture_image(self, project, name, source_dir, tree, operation):
        try:
            size = self.disk_images.capture(source_dir, tree)
            failure = None
        except OSError as error:
            logger.warning("image %s of %s failed: %s", name, project, error)
            size, failure = 0, str(error)
        with self.lock:
            if failure is None:
                self.catalog.update_image(project, name, status="READY", archiveSizeBytes=str(size))
                self._finish_operation(operation)
            else:
                self.catalog.update_image(project, name, status="FAILED")
                self._finish_operation(operation, [{"code": "INTERNAL_ERROR", "message": failure}], 500, "INTERNAL SERVER ERROR")

    def delete_image(self, project, name):
        self._refuse_public(project, "compute.images.delete", name)
        with self.lock:
            image = self.catalog.image_json(project, name)
            if image["status"] == "PENDING":
                raise api_errors.resource_not_ready(f"projects/{project}/global/images/{name}")
            operation = self._new_operation(project, None, "delete", image["selfLink"], image["id"])
            self.catalog.remove_image(project, name)
            tree = self.image_trees.pop((project, name), None)
            self._finish_operation(operation)
            answer = operation.to_json(self.base_url)
        if tree is not None:
            self.disk_images.discard(tree)
        return answer

    def deprecate_image(self, project, name, body):
        """images.deprecate: ``state`` ACTIVE clears the deprecation; DEPRECATED, OBSOLETE, DELETED set it."""
        self._refuse_public(project, "compute.images.deprecate", name)
        state = (body or {}).get("state") or "ACTIVE"
        if state not in ("ACTIVE", "DEPRECATED", "OBSOLETE", "DELETED"):
            raise api_errors.invalid_field("deprecationStatus.state", state, "Must be one of ACTIVE, DEPRECATED, OBSOLETE, DELETED.")
        with self.lock:
            image = self.catalog.image_json(project, name)
            deprecated = None
            if state != "ACTIVE":
                deprecated = {"state": state}
                if isinstance(body.get("replacement"), str) and body["replacement"]:
                    deprecated["replacement"] = body["replacement"]
            operation = self._new_operation(project, None, "deprecate", image["selfLink"], image["id"])
            self.catalog.update_image(project, name, deprecated=deprecated)
            self._finish_operation(operation)
            return operation.to_json(self.base_url)

    # Emulator shutdown.

    def shutdown(self):
        """Powers every VM off in parallel (shutdown scripts, grace, kill); returns when all are down."""
        with self.lock:
            self.closing = True
            longest_grace = 0
            for instance in list(self.instances.values()):
                if instance.status == "RUNNING":
                    longest_grace = max(longest_grace, self._grace_s(instance))
                    self._begin_power_off(instance, "terminate")
                elif instance.status in BOOTING:
                    self._begin_power_off(instance, "terminate")
                elif instance.status == "STOPPING":
                    longest_grace = max(longest_grace, self._grace_s(instance))
            all_down = self.changed.wait_for(
                lambda: all(instance.status != "STOPPING" and instance.guest is None for instance in self.instances.values()),
                longest_grace + 15,
            )
            self.metadata_changed.notify_all()
            self.changed.notify_all()
        if not all_down:
            logger.warning("some emulated VMs did not power off in time; the watchdog will kill them")

    # MetadataSource.

    def metadata_version(self, vm_key):
        with self.lock:
            instance = self.instances_by_id.get(vm_key)
            return -1 if instance is None else instance.metadata_version

    def wait_metadata_change(self, vm_key, version, timeout_s):
        with self.lock:
            def changed():
                instance = self.instances_by_id.get(vm_key)
                return instance is None or instance.metadata_version != version or self.closing

            self.metadata_changed.wait_for(changed, timeout_s)
            instance = self.instances_by_id.get(vm_key)
            return None if instance is None or self.closing else instance.metadata_version

    def metadata_token(self, vm_key):
        with self.lock:
            instance = self.instances_by_id.get(vm_key)
            if instance is None or not instance.service_accounts:
                return None
            return {"access_token": f"ya29.cflow-emulator-{instance.id}-{self.id_random.getrandbits(64):016x}", "expires_in": 3599, "token_type": "Bearer"}

    def guest_poweroff(self, vm_key):
        with self.lock:
            instance = self.instances_by_id.get(vm_key)
            if instance is None:
                return False
            if instance.status == "RUNNING":
                operation = self._new_operation(
                    instance.project, instance.zone, "compute.instances.guestTerminate", instance.self_link(self.base_url), instance.id, user="system"
                )
                instance.stop_operations.append(operation)
                self._begin_power_off(instance, "terminate")
            return True

    def metadata_tree(self, vm_key):
        with self.lock:
            instance = self.instances_by_id.get(vm_key)
            if instance is None:
                return None
            number = project_number(instance.project)
            accounts = Verbatim()
            for index, account in enumerate(instance.service_accounts):
                entry = {"aliases": ["default"] if index == 0 else [], "email": account["email"], "scopes": list(account["scopes"])}
                if index == 0:
                    accounts["default"] = entry
                accounts[account["email"]] = entry
            flag = lambda value: "TRUE" if value else "FALSE"  # noqa: E731
            scheduling = instance.scheduling
            return {
                "instance": {
                    "attributes": Verbatim((item["key"], item["value"]) for item in instance.metadata_items),
                    "cpu-platform": "Intel Broadwell",
                    "description": instance.description,
                    "hostname": instance.hostname or f"{instance.name}.{instance.zone}.c.{instance.project}.internal",
                    "id": instance.id,
                    "machine-type": f"projects/{number}/machineTypes/{instance.machine_type}",
                    "maintenance-event": "NONE",
                    "name": instance.name,
                    "network-interfaces": {
                        str(index): {"ip": interface["networkIP"], "network": f"projects/{number}/networks/{interface['network']}"}
                        for index, interface in enumerate(instance.network_interfaces)
                    },
                    "preempted": flag(instance.preempted),
                    "scheduling": {
                        "automatic-restart": flag(scheduling.get("automaticRestart")),
                        "on-host-maintenance": scheduling.get("onHostMaintenance"),
                        "preemptible": flag(scheduling.get("preemptible")),
                        "provisioning-model": scheduling.get("provisioningModel"),
                    },
                    "service-accounts": accounts,
                    "tags": json.dumps(instance.tags),
                    "zone": f"projects/{number}/zones/{instance.zone}",
                },
                "project": {"attributes": Verbatim(), "numeric-project-id": number, "project-id": instance.project},
            }
