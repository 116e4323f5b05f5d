"""Compute Engine: the run's workers, found by label, created in bulk, deleted in batches.

Talks Compute Engine v1 through googleapiclient; locally the same calls go to
the Compute emulator. Transient answers (429, 5xx) are retried with backoff by
the client itself (``num_retries``).
"""

import json
import logging
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

    def __init__(self, service, project):
        self.service = service
        self.project = project

    def _execute(self, request):
        return request.execute(num_retries=NUM_RETRIES)

    # -- reading -----------------------------------------------------------

    def list_run_vms(self, run_id):
        """Every VM labelled with the run, in every zone: one aggregatedList (paged)."""
        vms = []
        request = self.service.instances().aggregatedList(
            project=self.project, filter=f"labels.{RUN_LABEL} = {run_id}", maxResults=500
        )
        while request is not None:
            response = self._execute(request)
            for scoped in response.get("items", {}).values():
                vms.extend(Vm.from_resource(resource) for resource in scoped.get("instances", []))
            request = self.service.instances().aggregatedList_next(request, response)
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
            operation = self._execute(self.service.instances().bulkInsert(project=self.project, zone=zone, body=body))
        except HttpError as error:
            if error_reason(error) == "QUOTA_EXCEEDED" or "quota" in error_message(error).lower():
                raise QuotaExceeded(f"{error_message(error)} (ask for more quota or lower WORKER_NODE_CNT)") from None
            raise
        return PendingCreation(zone=zone, operation=operation["name"], names=tuple(names))

    def creation_result(self, pending):
        """Returns None while the operation runs, else a list of its error codes ([] = success)."""
        operation = self._execute(
            self.service.zoneOperations().get(project=self.project, zone=pending.zone, operation=pending.operation)
        )
        if operation.get("status") != "DONE":
            return None
        return [entry.get("code", "") for entry in operation.get("error", {}).get("errors", [])]

    # -- deleting ----------------------------------------------------------

    def _batch_uri(self):
        # googleapiclient builds the batch URI from the discovery document's
        # rootUrl and ignores an api_endpoint override, which would send a
        # local run's batch to the real service; derive it from the base URL.
        return urllib.parse.urljoin(self.service._baseUrl, "/batch/compute/v1")

    def delete_vms(self, vms):
        """Delete VMs in one batch HTTP request; already-gone VMs are a warning, not an error."""
        if not vms:
            return
        failures = []

        def on_response(request_id, response, exception):
            if exception is None:
                return
            if isinstance(exception, HttpError) and exception.resp.status == 404:
                log.warning("VM %s was already gone", request_id)
            else:
                failures.append((request_id, exception))

        for start in range(0, len(vms), 500):  # Compute batch requests hold at most 1,000 calls
            batch = BatchHttpRequest(callback=on_response, batch_uri=self._batch_uri())
            for vm in vms[start : start + 500]:
                batch.add(
                    self.service.instances().delete(project=self.project, zone=vm.zone, instance=vm.name),
                    request_id=vm.name,
                )
            batch.execute()
        for name, exception in failures:
            log.warning("deleting VM %s failed (%s); the next reconcile step tries again", name, exception)
