"""Instance, disk and operation records, and their Compute Engine v1 JSON forms.

Records are slotted dataclasses (a VM costs the emulator a few kB); an
instance's JSON is built once per change (``touch()``) and cached, because
list calls over hundreds of VMs are the hot path. Every record is mutated
only under the core's lock (``core.ComputeCore.lock``).
"""

import base64
import dataclasses
import datetime
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from cflow.local.compute.catalog import stable_id

if TYPE_CHECKING:
    from cflow.local.compute.validation import DiskSpec
    from cflow.local.compute.vm import Guest

STANDARD_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

ResourceKey = tuple[str, str, str]  # (project, zone, name) of a zonal resource
OperationKey = tuple[str, str | None, str]  # (project, zone or None for a global or regional operation, name)


def rfc3339(epoch_s: float) -> str:
    """Formats a wall-clock time as GCE does: milliseconds and an explicit offset."""
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).isoformat(timespec="milliseconds")


def fingerprint(value: object) -> str:
    """Returns a GCE-style fingerprint (8 bytes, base64) of a JSON-able value."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


_STANDARD_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URLSAFE_BASE64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def fingerprint_bytes(text: object) -> bytes | None:
    """The bytes a fingerprint encodes, standard or URL-safe base64 (padding optional); None if it is neither.

    A fingerprint is a bytes field: GCE sends it in standard base64, and
    clients built on apitools (gcloud) send it back URL-safe encoded.
    """
    if not isinstance(text, str) or not text:
        return None
    padded = text + "=" * (-len(text) % 4)
    try:
        if _STANDARD_BASE64.fullmatch(padded):
            return base64.b64decode(padded, validate=True)
        if _URLSAFE_BASE64.fullmatch(padded):
            return base64.urlsafe_b64decode(padded)
    except ValueError:
        return None
    return None


def fingerprints_match(sent: object, current: str) -> bool:
    """True when ``sent`` encodes the same bytes as the ``current`` fingerprint (compared as bytes, not text)."""
    sent_bytes = fingerprint_bytes(sent)
    return sent_bytes is not None and sent_bytes == fingerprint_bytes(current)


def project_number(project: str) -> int:
    """The project's number (stable: derived from its id)."""
    return stable_id("project/" + project) % 10**12


def default_service_account(project: str) -> str:
    """The e-mail of the project's Compute Engine default service account."""
    return f"{project_number(project)}-compute@developer.gserviceaccount.com"


@dataclasses.dataclass(slots=True, eq=False)
class Instance:
    """One VM's state. Mutated only under the core's lock; call ``touch()`` after.

    ``epoch`` grows at every boot and power-off, so a timer armed for an
    earlier one is recognised as stale. ``after_stop`` is what STOPPING ends
    in ("terminate" or "delete"). ``termination_ts`` is when a running VM's
    time limit ends it (``maxRunDuration``, ``terminationTime``).
    ``disk_image`` is the image tree held for the first boot's disk copy
    (None once copied). ``guest`` is its live processes while it runs. The
    ``*_operations`` complete when the VM reaches RUNNING, TERMINATED or is
    gone.
    """

    id: int
    name: str
    project: str
    zone: str
    region: str
    machine_type: str
    cpus: int
    status: str
    description: str
    labels: dict[str, str]
    label_fingerprint: str
    metadata_items: list[dict[str, str]]
    metadata_fingerprint: str
    scheduling: dict[str, Any]
    network_interfaces: list[dict[str, Any]]
    disks: "list[DiskSpec]"
    service_accounts: list[dict[str, Any]]
    tags: list[str]
    hostname: str | None
    creation_ts: str
    guest_accelerators: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    kept: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata_port: int = 0
    status_message: str | None = None
    stop_status_message: str | None = None
    last_start_ts: str | None = None
    last_stop_ts: str | None = None
    termination_ts: str | None = None
    after_stop: str | None = None
    disk_image: str | None = None
    guest: "Guest | None" = None
    epoch: int = 0
    metadata_version: int = 0
    preempted: bool = False
    boot_operations: "list[Operation]" = dataclasses.field(default_factory=list)
    stop_operations: "list[Operation]" = dataclasses.field(default_factory=list)
    delete_operations: "list[Operation]" = dataclasses.field(default_factory=list)
    _json: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    _text: str | None = dataclasses.field(default=None, repr=False)

    @property
    def key(self) -> ResourceKey:
        """(project, zone, name): how the tables find it."""
        return (self.project, self.zone, self.name)

    @property
    def is_spot_or_preemptible(self) -> bool:
        """True for a VM GCE may preempt (shorter shutdown grace, preempted by ``--preempt-mean-s``)."""
        return bool(self.scheduling.get("preemptible")) or self.scheduling.get("provisioningModel") == "SPOT"

    def metadata_value(self, key: str) -> str | None:
        """The value of metadata item ``key``, or None if there is none."""
        for item in self.metadata_items:
            if item["key"] == key:
                return item.get("value", "")
        return None

    def touch(self) -> None:
        """Drops the cached JSON; call after every change."""
        self._json = None
        self._text = None

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Returns the compute#instance dict (cached until ``touch()``; do not mutate)."""
        if self._json is None:
            self._json = self._render(base_url)
        return self._json

    def to_text(self, base_url: str) -> str:
        """Returns the compute#instance JSON text (cached until ``touch()``)."""
        if self._text is None:
            self._text = json.dumps(self.to_json(base_url), separators=(",", ":"))
        return self._text

    def self_link(self, base_url: str) -> str:
        """The instance's URL under ``base_url``."""
        return f"{base_url}projects/{self.project}/zones/{self.zone}/instances/{self.name}"

    def _render(self, base_url: str) -> dict[str, Any]:
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        metadata: dict[str, Any] = {"kind": "compute#metadata", "fingerprint": self.metadata_fingerprint}
        if self.metadata_items:
            metadata["items"] = [dict(item) for item in self.metadata_items]
        resource = {
            "kind": "compute#instance",
            "id": str(self.id),
            "creationTimestamp": self.creation_ts,
            "name": self.name,
            "description": self.description,
            "tags": {"items": list(self.tags), "fingerprint": fingerprint(self.tags)} if self.tags else {"fingerprint": fingerprint([])},
            "machineType": f"{zone_url}/machineTypes/{self.machine_type}",
            "status": self.status,
            "zone": zone_url,
            "canIpForward": self.kept.get("canIpForward", False),
            "networkInterfaces": [_render_interface(interface, base_url, self) for interface in self.network_interfaces],
            "disks": [_render_disk(disk, zone_url) for disk in self.disks],
            "metadata": metadata,
            "selfLink": self.self_link(base_url),
            "scheduling": dict(self.scheduling),
            "cpuPlatform": "Intel Broadwell" if self.status == "RUNNING" else "Unknown CPU Platform",
            "labelFingerprint": self.label_fingerprint,
            "startRestricted": False,
            "deletionProtection": self.kept.get("deletionProtection", False),
            "fingerprint": fingerprint([self.id, self.status, self.labels, self.metadata_fingerprint]),
        }
        resource.update((key, value) for key, value in self.kept.items() if key not in resource)
        if self.status_message:
            resource["statusMessage"] = self.status_message
        if self.labels:
            resource["labels"] = dict(self.labels)
        if self.service_accounts:
            resource["serviceAccounts"] = [dict(account) for account in self.service_accounts]
        if self.hostname:
            resource["hostname"] = self.hostname
        if self.last_start_ts:
            resource["lastStartTimestamp"] = self.last_start_ts
        if self.last_stop_ts:
            resource["lastStopTimestamp"] = self.last_stop_ts
        if self.termination_ts:
            resource["resourceStatus"] = {"scheduling": {"terminationTimestamp": self.termination_ts}}
        if self.guest_accelerators:
            resource["guestAccelerators"] = [
                {"acceleratorType": f"{zone_url}/acceleratorTypes/{entry['acceleratorType']}", "acceleratorCount": entry["acceleratorCount"]}
                for entry in self.guest_accelerators
            ]
        return resource


def _render_interface(interface: dict[str, Any], base_url: str, instance: Instance) -> dict[str, Any]:
    network_project = interface.get("networkProject", instance.project)
    rendered: dict[str, Any] = {
        "kind": "compute#networkInterface",
        "network": f"{base_url}projects/{network_project}/global/networks/{interface['network']}",
        "subnetwork": f"{base_url}projects/{network_project}/regions/{instance.region}/subnetworks/{interface['subnetwork']}",
        "networkIP": interface["networkIP"],
        "name": interface["name"],
        "fingerprint": fingerprint(interface["networkIP"]),
        "stackType": "IPV4_ONLY",
    }
    if interface.get("accessConfigs"):
        rendered["accessConfigs"] = []
        for access in interface["accessConfigs"]:
            config = {
                "kind": "compute#accessConfig",
                "type": access.get("type", "ONE_TO_ONE_NAT"),
                "name": access.get("name", "External NAT"),
                "networkTier": access.get("networkTier", "PREMIUM"),
            }
            # A reserved address stays with a stopped VM; an ephemeral one exists only while it runs.
            if access.get("natIP"):
                config["natIP"] = access["natIP"]
            elif instance.status == "RUNNING":
                config["natIP"] = interface["natIP"]
            rendered["accessConfigs"].append(config)
    return rendered


def _render_disk(disk: "DiskSpec", zone_url: str) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "kind": "compute#attachedDisk",
        "type": "PERSISTENT",
        "mode": "READ_WRITE",
        "source": f"{zone_url}/disks/{disk['diskName']}",
        "deviceName": disk["deviceName"],
        "index": disk["index"],
        "boot": disk["boot"],
        "autoDelete": disk["autoDelete"],
        "interface": "SCSI",
        "diskSizeGb": str(disk["diskSizeGb"]),
        "architecture": "X86_64",
    }
    if disk.get("licenses"):
        rendered["licenses"] = list(disk["licenses"])
    return rendered


@dataclasses.dataclass(slots=True, eq=False)
class Disk:
    """One persistent disk (a VM's boot disk is one).

    ``directory`` is where its content lives on the host (the VM's disk
    directory for a boot disk, None for other disks); ``user`` is the key of
    the instance it is attached to, or None.
    """

    id: int
    name: str
    project: str
    zone: str
    size_gb: int
    disk_type: str
    source_image: str | None
    source_image_id: str | None
    licenses: list[str]
    directory: str | None
    user: ResourceKey | None
    creation_ts: str
    last_attach_ts: str | None = None
    last_detach_ts: str | None = None

    @property
    def key(self) -> ResourceKey:
        """(project, zone, name): how the disks table finds it."""
        return (self.project, self.zone, self.name)

    @property
    def path(self) -> str:
        """``projects/P/zones/Z/disks/NAME``."""
        return f"projects/{self.project}/zones/{self.zone}/disks/{self.name}"

    def self_link(self, base_url: str) -> str:
        """The disk's URL under ``base_url``."""
        return base_url + self.path

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Returns the compute#disk dict."""
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        resource: dict[str, Any] = {
            "kind": "compute#disk",
            "id": str(self.id),
            "creationTimestamp": self.creation_ts,
            "name": self.name,
            "sizeGb": str(self.size_gb),
            "zone": zone_url,
            "status": "READY",
            "selfLink": self.self_link(base_url),
            "type": f"{zone_url}/diskTypes/{self.disk_type}",
            "labelFingerprint": fingerprint({}),
            "physicalBlockSizeBytes": "4096",
            "architecture": "X86_64",
        }
        if self.source_image:
            resource["sourceImage"] = self.source_image
            resource["sourceImageId"] = str(self.source_image_id)
        if self.licenses:
            resource["licenses"] = list(self.licenses)
        if self.user is not None:
            project, zone, name = self.user
            resource["users"] = [f"{base_url}projects/{project}/zones/{zone}/instances/{name}"]
        if self.last_attach_ts:
            resource["lastAttachTimestamp"] = self.last_attach_ts
        if self.last_detach_ts:
            resource["lastDetachTimestamp"] = self.last_detach_ts
        return resource


@dataclasses.dataclass(slots=True, eq=False)
class Operation:
    """One zonal operation, a regional one (``region`` set, ``zone`` None), or a global one (both None).

    ``remaining`` counts the VMs an insert or bulkInsert still waits for;
    ``bulk_status`` is a bulkInsert's per-location status;
    ``operation_group_id`` ties a bulkInsert to the ``insert`` operation of
    each VM it creates, as GCE does.
    """

    id: int
    name: str
    project: str
    zone: str | None
    operation_type: str
    target_link: str
    target_id: int | None
    status: str
    progress: int
    insert_ts: str
    start_ts: str
    user: str
    sequence: int
    end_ts: str | None = None
    status_message: str | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    http_error_code: int | None = None
    http_error_message: str | None = None
    bulk_status: dict[str, Any] | None = None
    remaining: int = 0
    region: str | None = None
    operation_group_id: str | None = None

    @property
    def key(self) -> OperationKey:
        """(project, zone or None, name): how the operations table finds it."""
        return (self.project, self.zone, self.name)

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Returns the compute#operation dict."""
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        region_url = f"{base_url}projects/{self.project}/regions/{self.region}"
        scopes = ((self.zone, zone_url), (self.region, region_url), ("global", f"{base_url}projects/{self.project}/global"))
        scope_url = next(url for scope, url in scopes if scope is not None)
        resource: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(self.id),
            "name": self.name,
            "operationType": self.operation_type,
            "targetLink": self.target_link,
            "status": self.status,
            "user": self.user,
            "progress": self.progress,
            "insertTime": self.insert_ts,
            "startTime": self.start_ts,
            "selfLink": f"{scope_url}/operations/{self.name}",
        }
        if self.zone is not None:
            resource["zone"] = zone_url
        if self.region is not None:
            resource["region"] = region_url
        if self.target_id is not None:
            resource["targetId"] = str(self.target_id)
        if self.status_message:
            resource["statusMessage"] = self.status_message
        if self.end_ts:
            resource["endTime"] = self.end_ts
        if self.errors:
            resource["error"] = {"errors": [dict(error) for error in self.errors]}
            resource["httpErrorStatusCode"] = self.http_error_code
            resource["httpErrorMessage"] = self.http_error_message
        if self.operation_group_id is not None:
            resource["operationGroupId"] = self.operation_group_id
        if self.bulk_status is not None:
            resource["instancesBulkInsertOperationMetadata"] = {"perLocationStatus": {f"zones/{self.zone}": dict(self.bulk_status)}}
        return resource
