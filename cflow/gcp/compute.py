"""Compute Engine: the run's workers, found by label, created in bulk, deleted in batches.

Talks Compute Engine v1 through googleapiclient; locally the same calls go to
the Compute emulator. Transient answers (429, 5xx) are retried with backoff by
the client itself (``num_retries``); batched deletes, which the client does
not retry, are retried here call by call.
"""

import json
import logging
import random
import time
import urllib.parse
from dataclasses import dataclass

from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest

from cflow.errors import CloudError

log = logging.getLogger(__name__)

RUN_LABEL = "cflow-run"
STOCKOUT_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
NUM_RETRIES = 6


class QuotaExceeded(CloudError):
    """The project's quota does not allow more VMs now."""


class ZoneStockout(CloudError):
    """The zone has no capacity for the VMs asked for; another zone may."""


def is_transient(error):
    """True for answers worth retrying: 429, 5xx, and 403 rate limits (as googleapiclient's own retry)."""
    status = getattr(getattr(error, "resp", None), "status", None)
    if status is None:
        return False
    status = int(status)
    return status == 429 or status >= 500 or (status == 403 and error_reason(error) in ("rateLimitExceeded", "userRateLimitExceeded"))


@dataclass(frozen=True)
class Vm:
    name: str
    zone: str
    status: str
    status_message: str
    labels: dict

    @classmethod
    def from_resource(cls, resource):
        return cls(
            name=resource["name"],
            zone=resource["zone"].rsplit("/", 1)[-1],
            status=resource.get("status", ""),
            status_message=resource.get("statusMessage", ""),
            labels=resource.get("labels", {}),
        )

    @property
    def preempted(self):
        return self.status == "TERMINATED" and "preempt" in self.status_message.lower()


@dataclass
class PendingCreation:
    """A bulkInsert in flight: its operation, zone and the names it asked for."""

    zone: str
    operation: str
    names: tuple


def error_reason(error):
    """The first ``reason`` of a Google JSON error answer, or ''."""
    try:
        body = json.loads(error.content)
        return body["error"]["errors"][0].get("reason", "")
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def error_message(error):
    try:
        return json.loads(error.content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(error)


class Compute:
    """Workers of one project.

    Args:
        service: a googleapiclient ``compute`` v1 resource.
        project: the project id.
    """

    def __init__(self, service, project, sleep=time.sleep):
        self.service = service
        self.project = project
        self.sleep = sleep
        # googleapiclient builds a resource object from the discovery document
        # on every call (~10 ms of CPU); one per seam keeps a big delete cheap.
        self.instances = service.instances()

    def _execute(self, request):
        return request.execute(num_retries=NUM_RETRIES)

    # -- reading -----------------------------------------------------------

    def list_run_vms(self, run_id):
        """Every VM labelled with the run, in every zone: one aggregatedList (paged)."""
        vms = []
        request = self.instances.aggregatedList(
            project=self.project, filter=f"labels.{RUN_LABEL} = {run_id}", maxResults=500
        )
        while request is not None:
            response = self._execute(request)
            for scoped in response.get("items", {}).values():
                vms.extend(Vm.from_resource(resource) for resource in scoped.get("instances", []))
            request = self.instances.aggregatedList_next(request, response)
        return vms

    def zone_exists(self, zone):
        try:
            self._execute(self.service.zones().get(project=self.project, zone=zone))
            return True
        except HttpError as error:
            if error.resp.status == 404:
                return False
            raise

    def check_image(self, image_url):
        """Raises CloudError if the image (a URL or family URL) does not exist."""
        parts = image_url.strip("/").split("/")
        try:
            if "family" in parts:
                project, family = parts[parts.index("projects") + 1], parts[-1]
                self._execute(self.service.images().getFromFamily(project=project, family=family))
            else:
                project, image = parts[parts.index("projects") + 1], parts[-1]
                self._execute(self.service.images().get(project=project, image=image))
        except HttpError as error:
            if error.resp.status == 404:
                raise CloudError(
                    f"image {image_url} does not exist; build one with `cflow image build` "
                    "or set VM_BOOT = \"stock\" in const.py"
                ) from None
            raise

    # -- creating ----------------------------------------------------------

    def bulk_insert(self, zone, names, instance_properties):
        """Ask for VMs with exactly these names in one bulkInsert.

        Returns a ``PendingCreation``; poll it with ``creation_result``.

        Raises:
            QuotaExceeded: the project's quota refuses (the message says which).
        """
        body = {
            "count": len(names),
            "minCount": 1,
            "perInstanceProperties": {name: {} for name in names},
            "instanceProperties": instance_properties,
        }
        try:
            operation = self._execute(self.instances.bulkInsert(project=self.project, zone=zone, body=body))
        except HttpError as error:
            if error_reason(error) == "QUOTA_EXCEEDED" or "quota" in error_message(error).lower():
                raise QuotaExceeded(f"{error_message(error)} (ask for more quota or lower WORKER_NODE_CNT)") from None
            if error_reason(error) in STOCKOUT_CODES:
                raise ZoneStockout(f"zone {zone}: {error_message(error)}") from None
            if error.resp.status == 409:
                # A retried request whose first try went through: the VMs exist.
                log.info("VMs %s already exist in %s", ", ".join(names), zone)
                return PendingCreation(zone=zone, operation="", names=tuple(names))
            raise
        return PendingCreation(zone=zone, operation=operation["name"], names=tuple(names))

    def creation_result(self, pending):
        """Returns None while the operation runs, else a list of its error codes ([] = success)."""
        if not pending.operation:
            return []
        operation = self._execute(
            self.service.zoneOperations().get(project=self.project, zone=pending.zone, operation=pending.operation)
        )
        if operation.get("status") != "DONE":
            return None
        return [entry.get("code", "") for entry in operation.get("error", {}).get("errors", [])]

    # -- deleting ----------------------------------------------------------

    def delete_run_vms(self, run_id, deadline_seconds=300, poll_seconds=1.0, clock=time.monotonic, sleep=None):
        """Delete every VM labelled with the run and poll the list until none is left.

        VMs that appear meanwhile (a scheduler still creating) are deleted too.

        Returns:
            The names still listed when the deadline passed ([] normally).
        """
        sleep = sleep or self.sleep
        deadline = clock() + deadline_seconds
        asked = set()
        while True:
            vms = self.list_run_vms(run_id)
            if not vms:
                return []
            fresh = [vm for vm in vms if vm.name not in asked and vm.status != "STOPPING"]
            if fresh:
                self.delete_vms(fresh)
                asked.update(vm.name for vm in fresh)
            if clock() >= deadline:
                return sorted(vm.name for vm in vms)
            sleep(poll_seconds)

    def _batch_uri(self):
        # googleapiclient builds the batch URI from the discovery document's
        # rootUrl and ignores an api_endpoint override, which would send a
        # local run's batch to the real service; derive it from the base URL.
        return urllib.parse.urljoin(self.service._baseUrl, "/batch/compute/v1")

    def delete_vms(self, vms):
        """Delete VMs in batch HTTP requests; already-gone VMs are a warning, not an error.

        Calls answered 429/5xx are sent again with backoff (up to ``NUM_RETRIES``
        rounds); what still fails is logged, for the caller's next pass.
        """
        by_name = {vm.name: vm for vm in vms}
        to_delete = list(by_name)
        given_up = {}
        for round_number in range(NUM_RETRIES + 1):
            if not to_delete:
                break
            if round_number:
                self.sleep(min(8.0, 0.5 * 2 ** (round_number - 1)) * (0.5 + random.random() / 2))
            failures = self._delete_batch([by_name[name] for name in to_delete])
            to_delete = [name for name, exception in failures.items() if is_transient(exception)]
            given_up.update((name, exception) for name, exception in failures.items() if name not in to_delete)
        given_up.update((name, failures[name]) for name in to_delete)
        for name, exception in given_up.items():
            log.warning("deleting VM %s failed (%s); the next reconcile step tries again", name, exception)

    def _delete_batch(self, vms):
        """One pass of batched deletes. Returns {name: exception} of the calls that failed."""
        failures = {}

        def on_response(request_id, response, exception):
            if exception is None:
                return
            if isinstance(exception, HttpError) and exception.resp.status == 404:
                log.warning("VM %s was already gone", request_id)
            else:
                failures[request_id] = exception

        for start in range(0, len(vms), 500):  # Compute batch requests hold at most 1,000 calls
            chunk = vms[start : start + 500]
            batch = BatchHttpRequest(callback=on_response, batch_uri=self._batch_uri())
            for vm in chunk:
                batch.add(
                    self.instances.delete(project=self.project, zone=vm.zone, instance=vm.name),
                    request_id=vm.name,
                )
            try:
                batch.execute()
            except HttpError as error:  # the whole batch refused: every call in it failed
                failures.update((vm.name, error) for vm in chunk)
        return failures

    # -- one VM, and images (cflow image build) -----------------------------

    def image_exists(self, name):
        """True if the project has an image called ``name``."""
        try:
            self._execute(self.service.images().get(project=self.project, image=name))
            return True
        except HttpError as error:
            if error.resp.status == 404:
                return False
            raise

    def get_image(self, name):
        """The project's image ``name`` (compute#image JSON)."""
        return self._execute(self.service.images().get(project=self.project, image=name))

    def insert_vm(self, zone, body):
        """instances.insert of one VM; returns the zone operation's name."""
        return self._execute(self.instances.insert(project=self.project, zone=zone, body=body))["name"]

    def stop_vm(self, zone, name):
        """instances.stop; returns the zone operation's name."""
        return self._execute(self.instances.stop(project=self.project, zone=zone, instance=name))["name"]

    def delete_vm(self, zone, name):
        """instances.delete; returns the zone operation's name, or None if the VM was already gone."""
        try:
            return self._execute(self.instances.delete(project=self.project, zone=zone, instance=name))["name"]
        except HttpError as error:
            if error.resp.status == 404:
                return None
            raise

    def serial_output(self, zone, name, start=0):
        """The VM's serial console from byte ``start``: returns (text, the ``start`` of the next read)."""
        answer = self._execute(self.instances.getSerialPortOutput(project=self.project, zone=zone, instance=name, start=start))
        return answer.get("contents", ""), int(answer.get("next", start))

    def insert_image_from_disk(self, name, family, zone, disk, description=""):
        """images.insert from the (detached or stopped VM's) disk ``disk`` of ``zone``; returns the global operation's name."""
        body = {"name": name, "family": family, "description": description, "sourceDisk": f"projects/{self.project}/zones/{zone}/disks/{disk}"}
        return self._execute(self.service.images().insert(project=self.project, body=body))["name"]

    def wait_operation(self, operation, zone=None):
        """One operations.wait (zonal, or global when ``zone`` is None): returns the operation, DONE or not.

        The service holds the call until the operation is DONE or about two minutes pass.
        """
        if zone is None:
            return self._execute(self.service.globalOperations().wait(project=self.project, operation=operation))
        return self._execute(self.service.zoneOperations().wait(project=self.project, zone=zone, operation=operation))
