"""Compute Engine: the run's workers, found by label, created in bulk, deleted in batches; and single VMs and images.

Talks Compute Engine v1 through googleapiclient; locally the same calls go to
the Compute emulator. Every request is sent by ``Compute._execute``, which
retries transient answers (429, 5xx, rate limits, no answer) by the policy of
``cflow.gcp.retry.Backoff``; batched deletes are retried call by call by the
same policy. Every method raises only CFlow's ``CloudError`` classes
(``cflow.gcp.errors.classify``).
"""

import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from googleapiclient.http import BatchHttpRequest

from cflow.errors import CloudError, Conflict, NotFound, PreconditionFailed
from cflow.gcp.errors import classify, classify_operation_error, is_google_error, is_transient
from cflow.gcp.retry import Backoff

log = logging.getLogger(__name__)

RUN_LABEL = "cflow-run"
# Compute batch requests hold at most 1,000 calls.
DELETE_BATCH_SIZE = 500


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

    def __init__(self, service: Any, project: str, sleep: Callable[[float], None] = time.sleep, backoff: Backoff | None = None) -> None:
        self.service = service
        self.project = project
        self.sleep = sleep
        self.backoff = backoff or Backoff(sleep=sleep)
        # googleapiclient builds a resource object from the discovery document
        # on every call (~10 ms of CPU); one per seam keeps a big delete cheap.
        self.instances = service.instances()

    def _execute(self, request: Any, zone: str | None = None) -> Any:
        """Send one request, retrying transient failures. Raises the classified CloudError."""
        try:
            # num_retries=0: the client's own retry would wait on its own clock, unseen by the policy.
            return self.backoff.call(lambda: request.execute(num_retries=0), is_transient)
        except Exception as error:
            if not is_google_error(error):
                raise
            raise classify(error, "compute", self.project, zone) from error

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

    # -- creating ----------------------------------------------------------

    def bulk_insert(self, zone: str, names: Iterable[str], instance_properties: Mapping[str, Any]) -> PendingCreation:
        """Ask for VMs with exactly these names in one bulkInsert.

        Returns a ``PendingCreation``; poll it with ``creation_result``.

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
        try:
            operation = self._execute(self.instances.bulkInsert(project=self.project, zone=zone, body=body), zone=zone)
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
    ) -> list[str]:
        """Delete every VM labelled with the run and poll the list until none is left.

        VMs that appear meanwhile (a scheduler still creating) are deleted too.
        A VM whose delete was refused (GCE answers 400 resourceNotReady while it
        boots) is asked again on the next poll, until GCE accepts it.

        Returns:
            The names still listed when the deadline passed ([] normally).
        """
        sleep = sleep or self.sleep
        deadline = clock() + deadline_seconds
        asked: set[str] = set()
        while True:
            vms = self.list_run_vms(run_id)
            if not vms:
                return []
            fresh = [vm for vm in vms if vm.name not in asked and vm.status != "STOPPING"]
            if fresh:
                refused = self.delete_vms(fresh)
                asked.update(vm.name for vm in fresh if vm.name not in refused)
            if clock() >= deadline:
                return sorted(vm.name for vm in vms)
            sleep(poll_seconds)

    def _batch_uri(self) -> str:
        # googleapiclient builds the batch URI from the discovery document's
        # rootUrl and ignores an api_endpoint override, which would send a
        # local run's batch to the real service; derive it from the base URL.
        return urllib.parse.urljoin(self.service._baseUrl, "/batch/compute/v1")

    def delete_vms(self, vms: Iterable[Vm]) -> set[str]:
        """Delete VMs in batch HTTP requests; already-gone VMs are a warning, not an error.

        Calls that fail transiently (a VM still booting is 400 resourceNotReady)
        are sent again by the retry policy (up to ``backoff.retries`` rounds);
        what still fails is logged, for the caller's next pass.

        Returns:
            The names of the VMs whose delete was not accepted.
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
            to_delete = [name for name, exception in failures.items() if is_transient(exception)]
            given_up.update((name, exception) for name, exception in failures.items() if name not in to_delete)
        given_up.update((name, failures[name]) for name in to_delete)
        for name, exception in given_up.items():
            log.warning("deleting VM %s failed (%s); the next reconcile step tries again", name, exception)
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

    def insert_vm(self, zone: str, body: Mapping[str, Any]) -> str:
        """instances.insert of one VM; returns the zone operation's name."""
        return self._execute(self.instances.insert(project=self.project, zone=zone, body=body), zone=zone)["name"]

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
