"""Compute Engine: the run's workers, found by label, created in bulk, deleted until gone; the preflight's reads; single VMs and images.

Talks Compute Engine v1 through googleapiclient; locally the same calls go to
the Compute emulator. Every request is sent by ``Compute._execute``, which
retries transient answers (429, 5xx, rate limits, ``resourceNotReady``, no
answer) by the policy of ``cflow.gcp.retry.Backoff``; after a rate limit every
request of the seam waits out the same pause, so the seam slows down as a
whole instead of each call knocking again. Batched deletes are retried call
by call by the same policy, and ``delete_run_vms`` asks again until each VM is
gone. Every insert and bulkInsert carries a ``requestId``, so a retried
request whose first reply was lost never creates twice. Every method raises
only CFlow's ``CloudError`` classes (``cflow.gcp.errors.classify``).

Where things are: ``Vm`` (one listed VM), ``Quota`` (one regional quota),
``PendingCreation`` (a bulkInsert in flight); ``Compute``'s sections reading
(list, zones, images, machine and GPU types, networks, quotas), creating, deleting, and one VM
(``cflow image build``).
"""

import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from googleapiclient.http import BatchHttpRequest

from cflow.errors import CloudError, Conflict, NotFound, PreconditionFailed, RateLimited
from cflow.gcp.errors import classify, classify_operation_error, is_google_error, is_transient
from cflow.gcp.retry import Backoff

log = logging.getLogger(__name__)

RUN_LABEL = "cflow-run"
# Compute batch requests hold at most 1,000 calls.
DELETE_BATCH_SIZE = 500
# A VM whose delete was accepted but which is still listed, not going down, this long after: ask again
# (the delete operation itself may have failed).
DELETE_ASK_AGAIN_SECONDS = 30.0
# States in which a VM is already on its way out: a delete asked for meanwhile is answered resourceNotReady.
GOING_STATES = {"STOPPING", "SUSPENDING"}
# requestId namespace: a requestId is a UUID derived from what is created, so the same request gets the same id.
REQUEST_ID_NAMESPACE = uuid.UUID("5a0d1c6e-4a53-4e0c-9a43-cf10c0f10c0f")


def cflow_request_id(*parts: str) -> str:
    """A ``requestId`` for a create request: the same parts give the same id (a UUID, as GCE requires)."""
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, "/".join(parts)))


@dataclass(frozen=True)
class Vm:
    """One VM as the list call shows it.

    ``machine_type`` is the bare name ("" when the listing did not say);
    ``spot`` is None when the listing did not say.
    """

    name: str
    zone: str
    status: str
    status_message: str
    labels: dict[str, str] = field(default_factory=dict)
    machine_type: str = ""
    spot: bool | None = None

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any]) -> "Vm":
        scheduling = resource.get("scheduling")
        spot = None
        if isinstance(scheduling, Mapping):
            spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
        return cls(
            name=resource["name"],
            zone=resource["zone"].rsplit("/", 1)[-1],
            status=resource.get("status", ""),
            status_message=resource.get("statusMessage", ""),
            labels=dict(resource.get("labels", {})),
            machine_type=str(resource.get("machineType", "")).rsplit("/", 1)[-1],
            spot=spot,
        )

    @property
    def preempted(self) -> bool:
        return self.status == "TERMINATED" and "preempt" in self.status_message.lower()

    @property
    def run_id(self) -> str | None:
        """The run the VM belongs to (its ``cflow-run`` label), or None."""
        return self.labels.get(RUN_LABEL)


@dataclass(frozen=True)
class Quota:
    """One regional (or project) quota as ``regions.get`` lists it."""

    metric: str
    limit: float
    usage: float

    @property
    def free(self) -> float:
        return max(0.0, self.limit - self.usage)


def _quotas(resource: Mapping[str, Any]) -> dict[str, Quota]:
    """The ``quotas[]`` of a region or project resource, by metric."""
    quotas = {}
    for entry in resource.get("quotas", []) or []:
        try:
            quotas[str(entry["metric"])] = Quota(str(entry["metric"]), float(entry.get("limit", 0)), float(entry.get("usage", 0)))
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring a quota entry GCE sent in an unknown shape: %r", entry)
    return quotas


@dataclass
class PendingCreation:
    """A bulkInsert in flight: its operation, zone and the names it asked for."""

    zone: str
    operation: str
    names: tuple[str, ...]


class Compute:
    """The Compute Engine API of one project: workers by label, single VMs, images, operations.

    Args:
        service: a googleapiclient ``compute`` v1 resource.
        project: the project id.
        sleep: ``time.sleep``-like, for retries and polling.
        backoff: the retry policy (default: ``Backoff`` with ``sleep``).
    """

    def __init__(
        self,
        service: Any,
        project: str,
        sleep: Callable[[float], None] = time.sleep,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.project = project
        self.sleep = sleep
        self.backoff = backoff or Backoff(sleep=sleep)
        self.clock = clock
        # googleapiclient builds a resource object from the discovery document
        # on every call (~10 ms of CPU); one per seam keeps a big delete cheap.
        self.instances = service.instances()
        self._rate_limited_until = 0.0
        self._rate_limits_in_a_row = 0

    def _pace(self) -> None:
        """Wait out a rate limit another request met: the limit is the project's, not the request's."""
        wait = self._rate_limited_until - self.clock()
        if wait > 0:
            self.sleep(wait)

    def _note_rate_limit(self, error: BaseException) -> None:
        """A rate limit pauses every request of the seam, growing while they keep coming."""
        if not is_google_error(error) and not isinstance(error, CloudError):
            return
        classified = error if isinstance(error, CloudError) else classify(error, "compute")
        if isinstance(classified, RateLimited):
            self._rate_limits_in_a_row += 1
            pause = self.backoff.delay(self._rate_limits_in_a_row)
            self._rate_limited_until = max(self._rate_limited_until, self.clock() + pause)
            log.debug("Compute Engine is limiting the rate; pausing requests %.1f s", pause)

    def _send(self, request: Any) -> Any:
        self._pace()
        try:
            # num_retries=0: the client's own retry would wait on its own clock, unseen by the policy.
            answer = request.execute(num_retries=0)
        except Exception as error:
            self._note_rate_limit(error)
            raise
        self._rate_limits_in_a_row = 0
        return answer

    def _execute(self, request: Any, zone: str | None = None) -> Any:
        """Send one request, retrying transient failures. Raises the classified CloudError."""
        try:
            return self.backoff.call(lambda: self._send(request), is_transient)
        except Exception as error:
            if not is_google_error(error):
                raise
            raise classify(error, "compute", self.project, zone) from error

    def _get_or_none(self, request: Any, zone: str | None = None) -> dict[str, Any] | None:
        """The resource, or None when GCE says it does not exist.

        Raises:
            NotFound: a 404 that names no resource: the service does not serve this read at all (a
                wrong endpoint, an emulator without it), which says nothing about the resource.
            CloudError: any other refusal.
        """
        try:
            return self._execute(request, zone)
        except NotFound as error:
            if error.resource is None:
                raise
            return None

    # -- reading -----------------------------------------------------------

    def list_run_vms(self, run_id: str) -> list[Vm]:
        """Every VM labelled with the run, in every zone: one aggregatedList (paged)."""
        vms: list[Vm] = []
        request = self.instances.aggregatedList(
            project=self.project, filter=f"labels.{RUN_LABEL} = {run_id}", maxResults=500
        )
        while request is not None:
            response = self._execute(request)
            for scoped in response.get("items", {}).values():
                vms.extend(Vm.from_resource(resource) for resource in scoped.get("instances", []))
            request = self.instances.aggregatedList_next(request, response)
        return vms

    def zone_exists(self, zone: str) -> bool:
        try:
            self._execute(self.service.zones().get(project=self.project, zone=zone))
            return True
        except NotFound:
            return False

    def check_image(self, image_url: str) -> None:
        """Raises CloudError if the image (a URL or family URL) does not exist."""
        parts = image_url.strip("/").split("/")
        project, name = parts[parts.index("projects") + 1], parts[-1]
        try:
            if "family" in parts:
                self._execute(self.service.images().getFromFamily(project=project, family=name))
            else:
                self._execute(self.service.images().get(project=project, image=name))
        except NotFound:
            raise CloudError(
                f"image {image_url} does not exist; build one with `cflow image build` "
                "or set VM_BOOT = \"stock\" in const.py"
            ) from None

    def find_image(self, image_url: str) -> dict[str, Any] | None:
        """The image a ``sourceImage`` names (``projects/P/global/images/[family/]NAME``, or its URL), or None if none resolves."""
        parts = image_url.strip("/").split("/")
        project, name = parts[parts.index("projects") + 1], parts[-1]
        if "family" in parts:
            return self._get_or_none(self.service.images().getFromFamily(project=project, family=name))
        return self._get_or_none(self.service.images().get(project=project, image=name))

    def machine_type(self, zone: str, name: str) -> dict[str, Any] | None:
        """machineTypes.get (``guestCpus``, ``memoryMb``...), or None if the zone has no such type."""
        return self._get_or_none(self.service.machineTypes().get(project=self.project, zone=zone, machineType=name), zone)

    def accelerator_type(self, zone: str, name: str) -> dict[str, Any] | None:
        """acceleratorTypes.get (``maximumCardsPerInstance``...), or None if the zone does not offer the type."""
        return self._get_or_none(self.service.acceleratorTypes().get(project=self.project, zone=zone, acceleratorType=name), zone)

    def accelerator_types(self, zone: str) -> list[dict[str, Any]]:
        """acceleratorTypes.list: every GPU type the zone offers (paged)."""
        types: list[dict[str, Any]] = []
        accelerators = self.service.acceleratorTypes()
        request = accelerators.list(project=self.project, zone=zone)
        while request is not None:
            response = self._execute(request, zone)
            types.extend(response.get("items", []))
            request = accelerators.list_next(request, response)
        return types

    def network(self, name: str, project: str | None = None) -> dict[str, Any] | None:
        """networks.get of ``name`` in ``project`` (default: this one), or None if there is no such network."""
        return self._get_or_none(self.service.networks().get(project=project or self.project, network=name))

    def subnetwork(self, region: str, name: str, project: str | None = None) -> dict[str, Any] | None:
        """subnetworks.get of ``name`` in ``region``, or None if there is no such subnetwork."""
        return self._get_or_none(self.service.subnetworks().get(project=project or self.project, region=region, subnetwork=name))

    def region_quotas(self, region: str) -> dict[str, Quota] | None:
        """The region's quotas from regions.get, by metric; None if the region does not exist.

        A metric GCE does not list has no limit CFlow can see.
        """
        answer = self._get_or_none(self.service.regions().get(project=self.project, region=region))
        if answer is None:
            return None
        return _quotas(answer)

    def project_quotas(self) -> dict[str, Quota]:
        """The project-wide quotas (e.g. ``GPUS_ALL_REGIONS``) from projects.get, by metric."""
        return _quotas(self._execute(self.service.projects().get(project=self.project)))

    def default_service_account(self) -> str | None:
        """The project's default Compute Engine service account (projects.get), or None if it has none."""
        return self._execute(self.service.projects().get(project=self.project)).get("defaultServiceAccount") or None

    def list_vms_by_run(self) -> dict[str, list[Vm]]:
        """Every VM that carries a run's label, by run id: one aggregatedList (paged)."""
        by_run: dict[str, list[Vm]] = {}
        request = self.instances.aggregatedList(project=self.project, filter=f"labels.{RUN_LABEL}:*", maxResults=500)
        while request is not None:
            response = self._execute(request)
            for scoped in response.get("items", {}).values():
                for resource in scoped.get("instances", []):
                    vm = Vm.from_resource(resource)
                    if vm.run_id:
                        by_run.setdefault(vm.run_id, []).append(vm)
            request = self.instances.aggregatedList_next(request, response)
        return by_run

    # -- creating ----------------------------------------------------------

    def bulk_insert(
        self, zone: str, names: Iterable[str], instance_properties: Mapping[str, Any], request_id: str | None = None
    ) -> PendingCreation:
        """Ask for VMs with exactly these names in one bulkInsert.

        Args:
            zone: where.
            names: the VMs' names.
            instance_properties: what each VM is made of (``cflow.fleet.worker_instance_properties``).
            request_id: GCE's ``requestId``; default: derived from the project, zone and names, so
                sending the same creation again (its reply lost) gets the first one's operation back.
        Returns:
            A ``PendingCreation``; poll it with ``creation_result``.
        Raises:
            QuotaExceeded: the project's quota refuses (metric, region and limit when GCE says them).
            ZoneStockout: the zone has no capacity now.
            CloudError: any other refusal (see ``cflow.errors``).
        """
        names = tuple(names)
        body = {
            "count": len(names),
            "minCount": 1,
            "perInstanceProperties": {name: {} for name in names},
            "instanceProperties": instance_properties,
        }
        request_id = request_id or cflow_request_id("bulkInsert", self.project, zone, *names)
        try:
            operation = self._execute(
                self.instances.bulkInsert(project=self.project, zone=zone, body=body, requestId=request_id), zone=zone
            )
        except Conflict:
            # A retried request whose first try went through: the VMs exist.
            log.info("VMs %s already exist in %s", ", ".join(names), zone)
            return PendingCreation(zone=zone, operation="", names=names)
        return PendingCreation(zone=zone, operation=operation["name"], names=names)

    def creation_result(self, pending: PendingCreation) -> list[CloudError] | None:
        """None while the operation runs; else its errors, classified ([] = success).

        A stockout is a ``ZoneStockout``, a quota a ``QuotaExceeded``; each keeps GCE's code as ``reason``.
        """
        if not pending.operation:
            return []
        operation = self._execute(
            self.service.zoneOperations().get(project=self.project, zone=pending.zone, operation=pending.operation)
        )
        if operation.get("status") != "DONE":
            return None
        entries = operation.get("error", {}).get("errors", [])
        return [classify_operation_error(entry, pending.zone, self.project) for entry in entries]

    # -- telling a worker something (its metadata) ------------------------------

    def set_metadata_attributes(self, zone: str, name: str, attributes: Mapping[str, str], attempts: int = 3) -> bool:
        """Set (add or replace) metadata attributes of one VM; its guest sees them at once.

        instances.setMetadata replaces the whole list and must name the current
        fingerprint, so this reads the VM first; a 412 (someone changed it
        meanwhile) reads it again, up to ``attempts`` times.

        Returns:
            False if the VM is gone (nothing to tell).
        Raises:
            CloudError: any other refusal, or the fingerprint kept changing.
        """
        for attempt in range(1, attempts + 1):
            try:
                instance = self._execute(self.instances.get(project=self.project, zone=zone, instance=name), zone=zone)
            except NotFound:
                return False
            metadata = instance.get("metadata") or {}
            items = [item for item in metadata.get("items", []) if item.get("key") not in attributes]
            items += [{"key": key, "value": value} for key, value in attributes.items()]
            body = {"fingerprint": metadata.get("fingerprint"), "items": items}
            try:
                self._execute(self.instances.setMetadata(project=self.project, zone=zone, instance=name, body=body), zone=zone)
                return True
            except NotFound:
                return False
            except PreconditionFailed:
                if attempt == attempts:
                    raise
                log.debug("the metadata of %s changed meanwhile; reading it again", name)
        return False

    # -- deleting ----------------------------------------------------------

    def delete_run_vms(
        self,
        run_id: str,
        deadline_seconds: float = 300,
        poll_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> list[Vm]:
        """Delete every VM labelled with the run and list again until none is left, or the deadline passes.

        A delete counts as asked only once GCE accepted it: one refused
        (``resourceNotReady`` while the VM is still being created, a 5xx) is
        asked again on the next pass, and so is one accepted long ago whose VM
        is still listed and not going down. VMs that appear meanwhile (a
        scheduler still creating) are deleted too.

        Returns:
            The VMs still listed when the deadline passed ([] normally).
        Raises:
            CloudError: listing the run's VMs failed (after retries).
        """
        sleep = sleep or self.sleep
        deadline = clock() + deadline_seconds
        asked_at: dict[str, float] = {}
        while True:
            vms = self.list_run_vms(run_id)
            if not vms:
                return []
            now = clock()
            due = [
                vm for vm in vms
                if vm.status not in GOING_STATES and now - asked_at.get(vm.name, -DELETE_ASK_AGAIN_SECONDS) >= DELETE_ASK_AGAIN_SECONDS
            ]
            if due:
                refused = self.delete_vms(due)
                asked_at.update((vm.name, now) for vm in due if vm.name not in refused)
            if clock() >= deadline:
                return sorted(vms, key=lambda vm: vm.name)
            sleep(poll_seconds)

    def _batch_uri(self) -> str:
        # googleapiclient builds the batch URI from the discovery document's
        # rootUrl and ignores an api_endpoint override, which would send a
        # local run's batch to the real service; derive it from the base URL.
        return urllib.parse.urljoin(self.service._baseUrl, "/batch/compute/v1")

    def delete_vms(self, vms: Iterable[Vm]) -> set[str]:
        """Delete VMs in batch HTTP requests; already-gone VMs are a warning, not an error.

        Calls that fail transiently (``resourceNotReady``, 5xx, rate limits) are
        sent again by the retry policy (up to ``backoff.retries`` rounds); what
        still fails is logged, for the caller's next pass.

        Returns:
            The names of the VMs whose delete was not accepted (they are not
            being deleted); an accepted or already-gone VM is not named.
        """
        by_name = {vm.name: vm for vm in vms}
        to_delete = list(by_name)
        given_up: dict[str, BaseException] = {}
        failures: dict[str, BaseException] = {}
        for round_number in range(self.backoff.retries + 1):
            if not to_delete:
                break
            if round_number:
                self.backoff.wait(round_number)
            failures = self._delete_batch([by_name[name] for name in to_delete])
            for exception in failures.values():
                self._note_rate_limit(exception)
            to_delete = [name for name, exception in failures.items() if is_transient(exception)]
            given_up.update((name, exception) for name, exception in failures.items() if name not in to_delete)
        given_up.update((name, failures[name]) for name in to_delete)
        for name, exception in given_up.items():
            log.warning("deleting VM %s failed (%s); asking again on the next pass", name, exception)
        return set(given_up)

    def _delete_batch(self, vms: list[Vm]) -> dict[str, BaseException]:
        """One pass of batched deletes. Returns {name: exception} of the calls that failed."""
        failures: dict[str, BaseException] = {}

        def on_response(request_id: str, response: object, exception: BaseException | None) -> None:
            if exception is None:
                return
            if isinstance(classify(exception, "compute") if is_google_error(exception) else exception, NotFound):
                log.warning("VM %s was already gone", request_id)
            else:
                failures[request_id] = exception

        for start in range(0, len(vms), DELETE_BATCH_SIZE):
            chunk = vms[start : start + DELETE_BATCH_SIZE]
            batch = BatchHttpRequest(callback=on_response, batch_uri=self._batch_uri())
            for vm in chunk:
                batch.add(
                    self.instances.delete(project=self.project, zone=vm.zone, instance=vm.name),
                    request_id=vm.name,
                )
            self._pace()
            try:
                batch.execute()
            except Exception as error:  # the whole batch refused or unanswered: every call in it failed
                if not is_google_error(error):
                    raise
                failures.update((vm.name, error) for vm in chunk)
        return failures

    # -- one VM, and images (cflow image build) -----------------------------

    def image_exists(self, name: str) -> bool:
        """True if the project has an image called ``name``."""
        try:
            self._execute(self.service.images().get(project=self.project, image=name))
            return True
        except NotFound:
            return False

    def get_image(self, name: str) -> dict[str, Any]:
        """The project's image ``name`` (compute#image JSON)."""
        return self._execute(self.service.images().get(project=self.project, image=name))

    def insert_vm(self, zone: str, body: Mapping[str, Any], request_id: str | None = None) -> str:
        """instances.insert of one VM; returns the zone operation's name.

        ``request_id`` defaults to one derived from the project, zone and VM name (see ``bulk_insert``).
        """
        request_id = request_id or cflow_request_id("insert", self.project, zone, str(body.get("name", "")))
        request = self.instances.insert(project=self.project, zone=zone, body=body, requestId=request_id)
        return self._execute(request, zone=zone)["name"]

    def stop_vm(self, zone: str, name: str) -> str:
        """instances.stop; returns the zone operation's name."""
        return self._execute(self.instances.stop(project=self.project, zone=zone, instance=name), zone=zone)["name"]

    def delete_vm(self, zone: str, name: str) -> str | None:
        """instances.delete; returns the zone operation's name, or None if the VM was already gone."""
        try:
            return self._execute(self.instances.delete(project=self.project, zone=zone, instance=name), zone=zone)["name"]
        except NotFound:
            return None

    def serial_output(self, zone: str, name: str, start: int = 0) -> tuple[str, int]:
        """The VM's serial console from byte ``start``: returns (text, the ``start`` of the next read)."""
        answer = self._execute(self.instances.getSerialPortOutput(project=self.project, zone=zone, instance=name, start=start), zone=zone)
        return answer.get("contents", ""), int(answer.get("next", start))

    def insert_image_from_disk(self, name: str, family: str, zone: str, disk: str, description: str = "") -> str:
        """images.insert from the (detached or stopped VM's) disk ``disk`` of ``zone``; returns the global operation's name."""
        body = {"name": name, "family": family, "description": description, "sourceDisk": f"projects/{self.project}/zones/{zone}/disks/{disk}"}
        return self._execute(self.service.images().insert(project=self.project, body=body))["name"]

    def wait_operation(self, operation: str, zone: str | None = None) -> dict[str, Any]:
        """One operations.wait (zonal, or global when ``zone`` is None): returns the operation, DONE or not.

        The service holds the call until the operation is DONE or about two minutes pass.
        """
        if zone is None:
            return self._execute(self.service.globalOperations().wait(project=self.project, operation=operation))
        return self._execute(self.service.zoneOperations().wait(project=self.project, zone=zone, operation=operation), zone=zone)
