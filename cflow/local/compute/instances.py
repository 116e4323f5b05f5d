"""instances.*: insert, bulkInsert, get, list, aggregatedList, delete, stop, start, reset, setLabels,
setMetadata, setScheduling, setDeletionProtection, simulateMaintenanceEvent, getSerialPortOutput.

Creating a VM checks what its interfaces name (``networks``) and its GPUs
(``accelerators``), the organization policy (``policy``), the quotas
(``quotas``) and the zone's capacity (``faults``), then makes its record
with its addresses, its disks (``disks``), holds its image's content
(``images``) and hands it to ``lifecycle``, which boots it. A stockout is a
DONE-with-error operation, as GCE reports it; insert's quota and policy
refusals come at once (403, 412); bulkInsert's are in its operation, except
a quota that leaves room for not one VM (403 at once), as GCE's upfront
validation answers.

GCE's lifecycle rules: delete or stop of a VM that is still PROVISIONING or
STAGING, or already STOPPING, and start of one that is booting or STOPPING,
answer 400 ``resourceNotReady`` ("The resource '...' is not ready", as
googleapis/google-api-python-client#485 quotes it); ``refuse_not_ready``
False accepts delete and stop then (the emulator's old leniency). A
bulkInsert makes up to 5,000 VMs and takes ``instanceProperties.machineType``
as a bare name only: a URL there makes GCE fail the operation with
INTERNAL_ERROR (the discovery document's InstanceProperties.machineType);
an insert takes a zonal URL only. setScheduling changes the time limit,
provisioning model and termination action of a TERMINATED VM only; the
rules of ``scheduling`` apply to the result.
"""

import copy
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from cflow.local.compute import api_errors, scheduling, validation
from cflow.local.compute.accelerators import AcceleratorTypes
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.disks import Disks
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.images import Images
from cflow.local.compute.lifecycle import Lifecycle
from cflow.local.compute.networks import Networks, ip_space_exhausted_error
from cflow.local.compute.paging import Json, RawJson, max_results, page_after, page_token
from cflow.local.compute.policy import CONDITION_NOT_MET_HTTP, OrganizationPolicy
from cflow.local.compute.quotas import Quotas, VmShape
from cflow.local.compute.resources import Instance, Operation, fingerprint, fingerprints_match
from cflow.local.compute.validation import InstanceSpec
from cflow.local.compute.vm import SERIAL_LOG_NAME, GuestLauncher

MAX_BULK_COUNT = 5000
MAX_SERIAL_BYTES = 1024 * 1024  # what GCE keeps of a serial port
SERIAL_PORTS = 4
BULK_FIELD = "bulkInsertInstanceResource"
# What a VM is while delete, stop and start answer resourceNotReady.
NOT_READY = ("PROVISIONING", "STAGING", "STOPPING")


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A VM's request after every check that needs the emulator's state: interfaces, GPUs, what it takes from quotas."""

    interfaces: list[dict[str, Any]]
    accelerators: list[dict[str, Any]]
    shape: VmShape


class Instances:
    """The instances API of any project.

    Args:
        core: the shared state (``core.instances`` is the table).
        disks, images: the disks of new VMs and their images' content.
        lifecycle: boots, powers off, preempts and removes VMs.
        launcher: where a VM's serial console log is.
        networks: the networks VMs' interfaces name, and their addresses.
        accelerators: the zones' accelerator types and GPU rules.
        quotas: the allocation quotas.
        policy: the organization policy.
        refuse_not_ready: answer delete and stop of a booting or stopping VM
            with 400 resourceNotReady, as GCE does (False: accept them).

    Every method raises ``ApiError`` as GCE answers: 400 for a bad request,
    an unknown zone or a VM not ready for the change, 404 for an unknown VM,
    409 for a taken name, 412 for a stale fingerprint or a policy, 403 beyond
    a quota, 503 while the emulator stops.
    """

    def __init__(
        self,
        core: ComputeCore,
        disks: Disks,
        images: Images,
        lifecycle: Lifecycle,
        launcher: GuestLauncher,
        *,
        networks: Networks,
        accelerators: AcceleratorTypes,
        quotas: Quotas,
        policy: OrganizationPolicy,
        refuse_not_ready: bool = True,
    ) -> None:
        self.core = core
        self.disks = disks
        self.images = images
        self.lifecycle = lifecycle
        self.launcher = launcher
        self.refuse_not_ready = refuse_not_ready
        self.networks = networks
        self.accelerators = accelerators
        self.quotas = quotas
        self.policy = policy

    # Records (hold the lock).

    def record(self, project: str, zone: str, name: str) -> Instance:
        """The instance; raises ApiError 404 if there is none."""
        instance = self.core.instances.get((project, zone, name))
        if instance is None:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return instance

    def _live_in_zone(self, zone: str) -> int:
        return sum(1 for instance in self.core.instances.values() if instance.zone == zone and instance.status != "TERMINATED")

    def _check(self, project: str, zone: str, spec: InstanceSpec, field: str) -> _Checked:
        """What needs the emulator's state (hold the lock): the networks and GPUs the VM names, and its quota shape."""
        region = self.core.catalog.region_of(zone)
        assert region is not None  # the zone was checked
        interfaces = self.networks.resolve(project, region, spec["network_interfaces"], f"{field}.networkInterfaces")
        accelerators = self.accelerators.check(
            project, zone, spec["guest_accelerators"], spec["machine_type"], spec["scheduling"]["onHostMaintenance"], f"{field}.guestAccelerators"
        )
        shape = VmShape(
            cpus=spec["cpus"],
            preemptible=bool(spec["scheduling"].get("preemptible")),
            external_ips=sum(len(interface["accessConfigs"]) for interface in interfaces),
            accelerators=tuple((entry["acceleratorType"], entry["acceleratorCount"]) for entry in accelerators),
        )
        return _Checked(interfaces, accelerators, shape)

    def _stockout(self, operation: Operation, project: str, zone: str) -> None:
        message = (
            f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the request.  "
            "Try a different zone, or try again later."
        )
        errors = [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": message}]
        self.core.fail_operation_later(operation, self.lifecycle.boot_delay_s / 2, errors, 503, "SERVICE UNAVAILABLE")

    def _create(
        self,
        project: str,
        zone: str,
        spec: InstanceSpec,
        name: str,
        interfaces: list[dict[str, Any]],
        accelerators: list[dict[str, Any]],
        hostname: str | None = None,
    ) -> Instance:
        core = self.core
        instance_id = core.new_id()
        metadata_items = copy.deepcopy(spec["metadata_items"])
        region = core.catalog.region_of(zone)
        assert region is not None  # the zone was checked
        instance = Instance(
            id=instance_id,
            name=name,
            project=project,
            zone=zone,
            region=region,
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
            disks=self.disks.specs_for(spec, name),
            service_accounts=copy.deepcopy(spec["service_accounts"]),
            tags=list(spec["tags"]),
            hostname=hostname or spec["hostname"],
            creation_ts=core.now(),
            guest_accelerators=[dict(entry) for entry in accelerators],
            kept=copy.deepcopy(spec["kept"]),
        )
        self.disks.attach_new(instance)
        self.images.hold_boot_content(instance)
        self.lifecycle.admit(instance)
        return instance

    def _refuse_taken_names(self, project: str, zone: str, spec: InstanceSpec, names: Iterable[str]) -> None:
        names = list(names)
        for name in names:
            if (project, zone, name) in self.core.instances:
                raise api_errors.already_exists(f"projects/{project}/zones/{zone}/instances/{name}")
        self.disks.refuse_taken_names(project, zone, spec, names)

    # instances.insert and bulkInsert.

    def insert(self, project: str, zone: str, body: Json | None) -> Json:
        """instances.insert: the operation is DONE when the VM is RUNNING (or has stocked out)."""
        core = self.core
        core.check_zone(zone)
        spec = validation.instance_spec(body, project, zone, core.catalog)
        scheduling.refuse_past_termination(body.get("scheduling") if isinstance(body, dict) else None, core.wall_clock(), "resource.scheduling")
        name = spec["name"]
        assert name is not None  # instance_spec requires it for an insert
        with core.lock:
            core.refuse_if_closing()
            self._refuse_taken_names(project, zone, spec, [name])
            checked = self._check(project, zone, spec, "resource")
            self.policy.refuse_insert(project, zone, name, checked.interfaces)
            region = core.catalog.region_of(zone)
            assert region is not None
            fit, refusal = self.quotas.room(project, region, checked.shape, 1)
            if refusal is not None and fit < 1:
                raise refusal.error()
            operation = core.new_operation(project, zone, "insert", f"{core.zone_url(project, zone)}/instances/{name}")
            free = core.faults.free_capacity(zone, self._live_in_zone(zone))
            addressed, exhausted = self.networks.assign(region, checked.interfaces, 1)
            if free is not None and free < 1:
                self._stockout(operation, project, zone)
            elif exhausted is not None:
                core.finish_operation(operation, [ip_space_exhausted_error(exhausted)], 400, "BAD REQUEST")
            else:
                instance = self._create(project, zone, spec, name, addressed[0], checked.accelerators)
                operation.target_id = instance.id
                operation.remaining = 1
                instance.boot_operations.append(operation)
            return operation.to_json(core.base_url)

    def bulk_insert(self, project: str, zone: str, body: Json | None) -> Json:
        """instances.bulkInsert: as many of ``count`` VMs as quota, capacity and addresses allow, at least ``minCount``.

        Names come from ``perInstanceProperties`` first, then from ``namePattern``
        (numbered after the highest name of the zone that fits it). A quota
        with room for no VM at all refuses at once (403); one with room for
        fewer than ``minCount``, the policy and a stockout fail the operation.
        """
        core = self.core
        core.check_zone(zone)
        count, min_count, per_instance, pattern = self._bulk_request(body)
        assert body is not None
        properties = body["instanceProperties"]
        if isinstance(properties, dict) and "/" in str(properties.get("machineType", "")):
            return self._bulk_internal_error(project, zone)
        field = f"{BULK_FIELD}.instanceProperties"
        spec = validation.instance_spec(properties, project, zone, core.catalog, field, name_required=False)
        scheduling.refuse_past_termination(properties.get("scheduling"), core.wall_clock(), f"{field}.scheduling")
        pattern_parts = validation.name_pattern_parts(pattern) if pattern else None
        region = core.catalog.region_of(zone)
        assert region is not None
        with core.lock:
            core.refuse_if_closing()
            self._refuse_taken_names(project, zone, spec, per_instance)
            checked = self._check(project, zone, spec, field)
            allowed, refusal = self.quotas.room(project, region, checked.shape, count)
            if refusal is not None and allowed == 0:
                raise refusal.error()
            operation = core.new_operation(project, zone, "bulkInsert", core.zone_url(project, zone))
            operation.bulk_status = {"targetVmCount": count, "createdVmCount": 0, "failedToCreateVmCount": count, "deletedVmCount": 0, "status": "CREATING"}
            operation.operation_group_id = core.new_operation_group_id()
            free = core.faults.free_capacity(zone, self._live_in_zone(zone))
            to_create = allowed if free is None else min(allowed, free)
            names = list(per_instance)[:to_create]
            if len(names) < to_create:
                assert pattern_parts is not None  # without a pattern, count equals the named VMs
                names += self._pattern_names(project, zone, pattern_parts, to_create - len(names), set(per_instance))
            policy_errors = self.policy.bulk_errors(project, zone, names, checked.interfaces)
            addressed, exhausted = self.networks.assign(region, checked.interfaces, len(names), f"{field}.networkInterfaces")
            if policy_errors:
                core.finish_operation(operation, policy_errors, *CONDITION_NOT_MET_HTTP)
            elif allowed < min_count:
                assert refusal is not None
                core.finish_operation(operation, [refusal.operation_error()], 403, "FORBIDDEN")
            elif free is not None and free < min_count:
                self._stockout(operation, project, zone)
            elif len(addressed) < min_count:
                assert exhausted is not None
                core.finish_operation(operation, [ip_space_exhausted_error(exhausted)], 400, "BAD REQUEST")
            else:
                names = names[: len(addressed)]
                operation.remaining = len(names)
                operation.bulk_status.update(createdVmCount=len(names), failedToCreateVmCount=count - len(names))
                for name, interfaces in zip(names, addressed, strict=True):
                    hostname = per_instance.get(name, {}).get("hostname")
                    instance = self._create(
                        project, zone, spec, name, interfaces, checked.accelerators, hostname=hostname if isinstance(hostname, str) else None
                    )
                    # As on GCE, each VM also gets an insert operation of the group (gcloud lists them by operationGroupId).
                    own = core.new_operation(project, zone, "insert", instance.self_link(core.base_url), instance.id)
                    own.operation_group_id = operation.operation_group_id
                    own.remaining = 1
                    instance.boot_operations += [operation, own]
            return operation.to_json(core.base_url)

    def _bulk_internal_error(self, project: str, zone: str) -> Json:
        """What GCE answers a bulkInsert whose instanceProperties names its machine type by URL: an operation that fails."""
        core = self.core
        with core.lock:
            core.refuse_if_closing()
            operation = core.new_operation(project, zone, "bulkInsert", core.zone_url(project, zone))
            errors = [{"code": "INTERNAL_ERROR", "message": "Internal error. Please try again or contact Google Support."}]
            core.fail_operation_later(operation, 0, errors, 500, "INTERNAL SERVER ERROR")
            return operation.to_json(core.base_url)

    @staticmethod
    def _bulk_request(body: Json | None) -> tuple[int, int, dict[str, Json], str | None]:
        """Checks a bulkInsert body; returns (count, minCount, perInstanceProperties, namePattern)."""
        field = BULK_FIELD
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
        return count, min_count, per_instance, pattern

    def _pattern_names(self, project: str, zone: str, pattern_parts: tuple[str, int, str], how_many: int, reserved: set[str]) -> list[str]:
        prefix, digits, suffix = pattern_parts
        numbered = re.compile(re.escape(prefix) + f"([0-9]{{{digits}}})" + re.escape(suffix))
        taken = [name for (owner, where, name) in self.core.instances if owner == project and where == zone] + list(reserved)
        taken += self.disks.names_in(project, zone)
        highest = max((int(match.group(1)) for match in map(numbered.fullmatch, taken) if match), default=0)
        if highest + how_many >= 10**digits:
            raise api_errors.invalid_field(f"{BULK_FIELD}.namePattern", prefix + "#" * digits + suffix, "Not enough free names for the requested count.")
        return [f"{prefix}{number:0{digits}d}{suffix}" for number in range(highest + 1, highest + 1 + how_many)]

    # instances.get, list, aggregatedList.

    def get(self, project: str, zone: str, name: str) -> Json:
        """instances.get."""
        self.core.check_zone(zone)
        with self.core.lock:
            return self.record(project, zone, name).to_json(self.core.base_url)

    def list_instances(
        self, project: str, zone: str, filter_text: str | None = None, max_count: str | None = None, token: str | None = None
    ) -> Json | RawJson:
        """instances.list of a zone, by name, in pages of ``maxResults``."""
        core = self.core
        core.check_zone(zone)
        predicate = compile_filter(filter_text)
        limit = max_results(max_count)
        after = page_after(token)
        with core.lock:
            candidates = sorted((instance for (owner, where, _), instance in core.instances.items() if owner == project and where == zone), key=_by_name)
            texts, last_name, more = self._page(candidates, predicate, limit, after, key=_by_name)
        path = f"projects/{project}/zones/{zone}/instances"
        head: Json = {"kind": "compute#instanceList", "id": path, "selfLink": core.base_url + path}
        if more:
            assert last_name is not None
            head["nextPageToken"] = page_token(last_name)
        if not texts:
            head["items"] = []
            return head
        return RawJson(json.dumps(head)[:-1] + ',"items":[' + ",".join(texts) + "]}")

    def _page(
        self, candidates: list[Instance], predicate: Callable[[Json], bool], limit: int, after: str | None, key: Callable[[Instance], str]
    ) -> tuple[list[str], str | None, bool]:
        texts: list[str] = []
        last = None
        base_url = self.core.base_url
        for instance in candidates:
            if after is not None and key(instance) <= after:
                continue
            if not predicate(instance.to_json(base_url)):
                continue
            if len(texts) == limit:
                return texts, last, True
            texts.append(instance.to_text(base_url))
            last = key(instance)
        return texts, last, False

    def aggregated_list(self, project: str, filter_text: str | None = None, max_count: str | None = None, token: str | None = None) -> RawJson:
        """instances.aggregatedList: every zone's VMs (a NO_RESULTS_ON_PAGE warning for an empty zone), by zone and name."""
        core = self.core
        predicate = compile_filter(filter_text)
        limit = max_results(max_count)
        after = page_after(token)
        with core.lock:
            candidates = sorted((instance for instance in core.instances.values() if instance.project == project), key=_by_scope)
            selected: list[tuple[str, str, str]] = []
            more = False
            for instance in candidates:
                if after is not None and _by_scope(instance) <= after:
                    continue
                if not predicate(instance.to_json(core.base_url)):
                    continue
                if len(selected) == limit:
                    more = True
                    break
                selected.append((instance.zone, instance.to_text(core.base_url), _by_scope(instance)))
        by_zone: dict[str, list[str]] = {}
        for zone, text, _ in selected:
            by_zone.setdefault(zone, []).append(text)
        parts = []
        for zone in core.catalog.zone_names():
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
        path = f"projects/{project}/aggregated/instances"
        head: Json = {"kind": "compute#instanceAggregatedList", "id": path, "selfLink": core.base_url + path}
        if more:
            head["nextPageToken"] = page_token(selected[-1][2])
        return RawJson(json.dumps(head)[:-1] + ',"items":{' + ",".join(parts) + "}}")

    # instances.delete, stop, start.

    def _refuse_unless_settled(self, instance: Instance) -> None:
        """400 resourceNotReady for a VM still booting or already stopping (unless ``refuse_not_ready`` is off)."""
        if self.refuse_not_ready and instance.status in NOT_READY:
            raise api_errors.resource_not_ready(f"projects/{instance.project}/zones/{instance.zone}/instances/{instance.name}")

    def delete(self, project: str, zone: str, name: str) -> Json:
        """instances.delete: a running VM runs its shutdown script first; a terminated one goes at once.

        A booting or stopping VM is 400 resourceNotReady (with ``refuse_not_ready`` off:
        a booting one goes at once, a stopping one once it is down); a VM with
        ``deletionProtection`` is 400 invalidResourceUsage.
        """
        core = self.core
        core.check_zone(zone)
        with core.lock:
            instance = self.record(project, zone, name)
            if instance.kept.get("deletionProtection"):
                raise api_errors.invalid_resource_usage("Resource cannot be deleted if it's protected against deletion.")
            self._refuse_unless_settled(instance)
            operation = core.new_operation(project, zone, "delete", instance.self_link(core.base_url), instance.id)
            if instance.status == "RUNNING":
                instance.delete_operations.append(operation)
                self.lifecycle.begin_power_off(instance, "delete")
            elif instance.status == "STOPPING":
                instance.after_stop = "delete"
                instance.delete_operations.append(operation)
            else:
                # Nothing runs on a booting or terminated VM: it goes at once.
                self.lifecycle.remove(instance)
                core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def stop(self, project: str, zone: str, name: str) -> Json:
        """instances.stop: DONE when the VM is TERMINATED; 400 resourceNotReady while it boots or stops."""
        core = self.core
        core.check_zone(zone)
        with core.lock:
            instance = self.record(project, zone, name)
            self._refuse_unless_settled(instance)
            operation = core.new_operation(project, zone, "stop", instance.self_link(core.base_url), instance.id)
            if instance.status == "TERMINATED":
                core.finish_operation(operation)
            elif instance.status == "STOPPING":
                instance.stop_operations.append(operation)
            else:
                instance.stop_operations.append(operation)
                self.lifecycle.begin_power_off(instance, "terminate")
            return operation.to_json(core.base_url)

    def start(self, project: str, zone: str, name: str) -> Json:
        """instances.start of a TERMINATED VM: it boots again (quota and capacity permitting).

        400 resourceNotReady while it stops (and while it boots); 400 invalid once its
        ``terminationTime`` has passed.
        """
        core = self.core
        core.check_zone(zone)
        with core.lock:
            core.refuse_if_closing()
            instance = self.record(project, zone, name)
            if instance.status == "STOPPING":
                raise api_errors.resource_not_ready(f"projects/{project}/zones/{zone}/instances/{name}")
            self._refuse_unless_settled(instance)
            if instance.status == "TERMINATED":
                scheduling.refuse_past_termination(instance.scheduling, core.wall_clock(), "scheduling")
            operation = core.new_operation(project, zone, "start", instance.self_link(core.base_url), instance.id)
            if instance.status != "TERMINATED":
                core.finish_operation(operation)
                return operation.to_json(core.base_url)
            fit, refusal = self.quotas.room(project, instance.region, VmShape.of(instance), 1, new=False)
            if refusal is not None and fit < 1:
                raise refusal.error()
            free = core.faults.free_capacity(zone, self._live_in_zone(zone))
            if free is not None and free < 1:
                self._stockout(operation, project, zone)
                return operation.to_json(core.base_url)
            instance.epoch += 1
            instance.status = "PROVISIONING"
            instance.status_message = None
            instance.preempted = False
            instance.metadata_version += 1
            instance.after_stop = None
            instance.touch()
            instance.boot_operations.append(operation)
            operation.remaining = 1
            self.lifecycle.schedule_boot(instance)
            core.metadata_changed.notify_all()
            core.changed.notify_all()
            return operation.to_json(core.base_url)

    def reset(self, project: str, zone: str, name: str) -> Json:
        """instances.reset: a hard reset of a RUNNING VM (no shutdown script); DONE when its startup script runs again.

        Raises:
            ApiError: 400 resourceNotReady unless the VM is RUNNING.
        """
        core = self.core
        core.check_zone(zone)
        with core.lock:
            core.refuse_if_closing()
            instance = self.record(project, zone, name)
            if instance.status != "RUNNING":
                raise api_errors.resource_not_ready(f"projects/{project}/zones/{zone}/instances/{name}")
            operation = core.new_operation(project, zone, "reset", instance.self_link(core.base_url), instance.id)
            self.lifecycle.reset(instance, operation)
            return operation.to_json(core.base_url)

    def set_deletion_protection(self, project: str, zone: str, name: str, protect: str | None) -> Json:
        """instances.setDeletionProtection (``deletionProtection`` defaults to true, as on GCE)."""
        core = self.core
        core.check_zone(zone)
        value = str(protect).lower() != "false" if protect not in (None, "") else True
        with core.lock:
            instance = self.record(project, zone, name)
            operation = core.new_operation(project, zone, "setDeletionProtection", instance.self_link(core.base_url), instance.id)
            instance.kept["deletionProtection"] = value
            instance.touch()
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    # instances.setLabels, setMetadata.

    def set_labels(self, project: str, zone: str, name: str, body: Json | None) -> Json:
        """instances.setLabels; ``labelFingerprint`` must be the current one (412 otherwise)."""
        core = self.core
        core.check_zone(zone)
        if not isinstance(body, dict):
            raise api_errors.invalid_field("instancesSetLabelsRequest", "", "Expected an object.")
        labels = validation.check_labels(body.get("labels"), "instancesSetLabelsRequest.labels")
        with core.lock:
            instance = self.record(project, zone, name)
            if not fingerprints_match(body.get("labelFingerprint"), instance.label_fingerprint):
                raise api_errors.condition_not_met("Labels fingerprint either invalid or resource labels have changed")
            operation = core.new_operation(project, zone, "setLabels", instance.self_link(core.base_url), instance.id)
            instance.labels = labels
            instance.label_fingerprint = fingerprint(labels)
            instance.touch()
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def set_metadata(self, project: str, zone: str, name: str, body: Json | None) -> Json:
        """instances.setMetadata; ``fingerprint`` must be the current one (412 otherwise). Guests see the change at once."""
        core = self.core
        core.check_zone(zone)
        body = body if body is not None else {}
        items = validation.check_metadata_items(body, "metadata")
        with core.lock:
            instance = self.record(project, zone, name)
            if not fingerprints_match(body.get("fingerprint"), instance.metadata_fingerprint):
                raise api_errors.condition_not_met("Supplied fingerprint does not match current metadata fingerprint.")
            operation = core.new_operation(project, zone, "setMetadata", instance.self_link(core.base_url), instance.id)
            instance.metadata_items = items
            instance.metadata_version += 1
            instance.metadata_fingerprint = fingerprint([items, instance.metadata_version])
            instance.touch()
            core.finish_operation(operation)
            core.metadata_changed.notify_all()
            return operation.to_json(core.base_url)

    # instances.setScheduling.

    def set_scheduling(self, project: str, zone: str, name: str, body: Json | None) -> Json:
        """instances.setScheduling: the fields in ``body`` change (null clears one), checked as at insert.

        The time limit, provisioning model and termination action change only on a
        TERMINATED VM (400 invalidResourceUsage otherwise); the host maintenance
        policy and automatic restart on any.
        """
        core = self.core
        core.check_zone(zone)
        with core.lock:
            instance = self.record(project, zone, name)
            asked = scheduling.merged(instance.scheduling, body)
            wanted = scheduling.check(asked, "scheduling")
            changed = scheduling.stopped_only_changes(instance.scheduling, wanted)
            if changed and instance.status != "TERMINATED":
                raise api_errors.invalid_resource_usage(
                    f"Instance must be stopped (TERMINATED) to change scheduling.{changed[0]}; it is {instance.status}"
                )
            if "terminationTime" in changed:
                scheduling.refuse_past_termination(asked, core.wall_clock(), "scheduling")
            operation = core.new_operation(project, zone, "setScheduling", instance.self_link(core.base_url), instance.id)
            instance.scheduling = wanted
            instance.metadata_version += 1  # what its metadata server shows under scheduling/ changed
            instance.touch()
            core.finish_operation(operation)
            core.metadata_changed.notify_all()
            return operation.to_json(core.base_url)

    # instances.simulateMaintenanceEvent, getSerialPortOutput.

    def simulate_maintenance_event(self, project: str, zone: str, name: str) -> Json:
        """A Spot/preemptible VM is preempted; a standard one is live-migrated (a system operation) and keeps running."""
        core = self.core
        core.check_zone(zone)
        with core.lock:
            instance = self.record(project, zone, name)
            if instance.status != "RUNNING":
                raise api_errors.resource_not_ready(f"projects/{project}/zones/{zone}/instances/{name}")
            operation = core.new_operation(project, zone, "simulateMaintenanceEvent", instance.self_link(core.base_url), instance.id)
            if instance.is_spot_or_preemptible:
                self.lifecycle.preempt(instance)
            else:
                migration = core.new_operation(
                    project, zone, "compute.instances.migrateOnHostMaintenance", instance.self_link(core.base_url), instance.id, user="system"
                )
                migration.status_message = "Instance migrated during Compute Engine maintenance."
                core.finish_operation(migration)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def serial_port_output(self, project: str, zone: str, name: str, start: str | None = None, port: str | None = None) -> Json:
        """instances.getSerialPortOutput, as GCE keeps a serial port: its last 1 MB.

        ``start`` is a byte position in everything the port ever printed
        (negative: that many bytes before the end). A position older than the
        kept megabyte moves up to the oldest byte kept, and the answer's
        ``start`` says where it moved; ``next`` is where the next call starts.
        Ports 2 to 4 exist and stay silent.

        Raises:
            ApiError: 400 for a ``port`` outside 1..4 or a ``start`` that is not an integer.
        """
        core = self.core
        core.check_zone(zone)
        port_number = validation.parse_int64(port, "port") if port not in (None, "") else 1
        if not 1 <= port_number <= SERIAL_PORTS:
            raise api_errors.invalid_field("port", port_number, f"Must be between 1 and {SERIAL_PORTS}.")
        offset = validation.parse_int64(start, "start") if start not in (None, "") else 0
        with core.lock:
            instance = self.record(project, zone, name)
            path = os.path.join(self.launcher.disk_dir(instance.name, instance.id), SERIAL_LOG_NAME)
            self_link = instance.self_link(core.base_url) + "/serialPort"
        contents = b""
        try:
            with open(path, "rb") as serial:
                size = os.fstat(serial.fileno()).st_size if port_number == 1 else 0
                oldest = max(0, size - MAX_SERIAL_BYTES)
                offset = max(oldest, size + offset if offset < 0 else offset)
                if offset < size:
                    serial.seek(offset)
                    contents = serial.read(size - offset)
        except FileNotFoundError:
            offset = max(0, offset)
        return {
            "kind": "compute#serialPortOutput",
            "contents": contents.decode(errors="replace"),
            "start": str(offset),
            "next": str(offset + len(contents)),
            "selfLink": self_link,
        }


def _by_name(instance: Instance) -> str:
    return instance.name


def _by_scope(instance: Instance) -> str:
    return f"{instance.zone}/{instance.name}"
