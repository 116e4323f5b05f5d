"""Instance and operation records, and their Compute Engine v1 JSON forms.

Records are plain objects with ``__slots__`` (a VM costs the emulator a few
kB); an instance's JSON is built once per change (``touch()``) and cached,
because list calls over hundreds of VMs are the hot path.
"""

import base64
import datetime
import hashlib
import json

from cflow.local.compute.catalog import stable_id

STANDARD_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


def rfc3339(epoch_s):
    """Formats a wall-clock time as GCE does: milliseconds and an explicit offset."""
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC).isoformat(timespec="milliseconds")


def fingerprint(value):
    """Returns a GCE-style fingerprint (8 bytes, base64) of a JSON-able value."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


def project_number(project):
    return stable_id("project/" + project) % 10**12


def default_service_account(project):
    return f"{project_number(project)}-compute@developer.gserviceaccount.com"


class Instance:
    """One VM's state. Mutated only under the engine's lock; call ``touch()`` after."""

    __slots__ = (
        "_json",
        "_text",
        "after_stop",
        "boot_operations",
        "cpus",
        "creation_ts",
        "delete_operations",
        "description",
        "disk_image",
        "disks",
        "epoch",
        "guest",
        "hostname",
        "id",
        "label_fingerprint",
        "labels",
        "last_start_ts",
        "last_stop_ts",
        "machine_type",
        "metadata_fingerprint",
        "metadata_items",
        "metadata_port",
        "metadata_version",
        "name",
        "network_interfaces",
        "preempted",
        "project",
        "region",
        "scheduling",
        "service_accounts",
        "status",
        "status_message",
        "stop_operations",
        "stop_status_message",
        "tags",
        "zone",
    )  # fmt: skip

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))
        self.epoch = 0
        self.metadata_version = 0
        self.preempted = False
        self.boot_operations = []
        self.stop_operations = []
        self.delete_operations = []

    @property
    def key(self):
        return (self.project, self.zone, self.name)

    @property
    def is_spot_or_preemptible(self):
        return bool(self.scheduling.get("preemptible")) or self.scheduling.get("provisioningModel") == "SPOT"

    def metadata_value(self, key):
        for item in self.metadata_items:
            if item["key"] == key:
                return item.get("value", "")
        return None

    def touch(self):
        """Drops the cached JSON; call after every change."""
        self._json = None
        self._text = None

    def to_json(self, base_url):
        """Returns the compute#instance dict (cached until ``touch()``; do not mutate)."""
        if self._json is None:
            self._json = self._render(base_url)
        return self._json

    def to_text(self, base_url):
        """Returns the compute#instance JSON text (cached until ``touch()``)."""
        if self._text is None:
            self._text = json.dumps(self.to_json(base_url), separators=(",", ":"))
        return self._text

    def self_link(self, base_url):
        return f"{base_url}projects/{self.project}/zones/{self.zone}/instances/{self.name}"

    def _render(self, base_url):
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        metadata = {"kind": "compute#metadata", "fingerprint": self.metadata_fingerprint}
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
            "canIpForward": False,
            "networkInterfaces": [_render_interface(interface, base_url, self) for interface in self.network_interfaces],
            "disks": [_render_disk(disk, zone_url) for disk in self.disks],
            "metadata": metadata,
            "selfLink": self.self_link(base_url),
            "scheduling": dict(self.scheduling),
            "cpuPlatform": "Intel Broadwell" if self.status == "RUNNING" else "Unknown CPU Platform",
            "labelFingerprint": self.label_fingerprint,
            "startRestricted": False,
            "deletionProtection": False,
            "fingerprint": fingerprint([self.id, self.status, self.labels, self.metadata_fingerprint]),
        }
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
        return resource


def _render_interface(interface, base_url, instance):
    rendered = {
        "kind": "compute#networkInterface",
        "network": f"{base_url}projects/{instance.project}/global/networks/{interface['network']}",
        "subnetwork": f"{base_url}projects/{instance.project}/regions/{instance.region}/subnetworks/{interface['subnetwork']}",
        "networkIP": interface["networkIP"],
        "name": interface["name"],
        "fingerprint": fingerprint(interface["networkIP"]),
        "stackType": "IPV4_ONLY",
    }
    if interface.get("accessConfigs"):
        rendered["accessConfigs"] = []
        for access in interface["accessConfigs"]:
            config = {"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT", "name": access.get("name", "External NAT"), "networkTier": "PREMIUM"}
            if instance.status == "RUNNING":
                config["natIP"] = interface["natIP"]
            rendered["accessConfigs"].append(config)
    return rendered


def _render_disk(disk, zone_url):
    rendered = {
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


class Disk:
    """One persistent disk (a VM's boot disk is one). Mutated only under the engine's lock.

    ``directory`` is where its content lives on the host (the VM's disk
    directory for a boot disk, None for other disks); ``user`` is the key of
    the instance it is attached to, or None.
    """

    __slots__ = (
        "creation_ts",
        "directory",
        "disk_type",
        "id",
        "last_attach_ts",
        "last_detach_ts",
        "licenses",
        "name",
        "project",
        "size_gb",
        "source_image",
        "source_image_id",
        "user",
        "zone",
    )  # fmt: skip

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))

    @property
    def key(self):
        return (self.project, self.zone, self.name)

    @property
    def path(self):
        return f"projects/{self.project}/zones/{self.zone}/disks/{self.name}"

    def self_link(self, base_url):
        return base_url + self.path

    def to_json(self, base_url):
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        resource = {
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


class Operation:
    """One zonal operation, or a global one (``zone`` None). Mutated only under the engine's lock."""

    __slots__ = (
        "bulk_status",
        "end_ts",
        "errors",
        "http_error_code",
        "http_error_message",
        "id",
        "insert_ts",
        "name",
        "operation_type",
        "progress",
        "project",
        "remaining",
        "sequence",
        "start_ts",
        "status",
        "status_message",
        "target_id",
        "target_link",
        "user",
        "zone",
    )  # fmt: skip

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.get(name))
        self.errors = []
        self.remaining = 0

    @property
    def key(self):
        return (self.project, self.zone, self.name)

    def to_json(self, base_url):
        zone_url = f"{base_url}projects/{self.project}/zones/{self.zone}"
        scope_url = zone_url if self.zone is not None else f"{base_url}projects/{self.project}/global"
        resource = {
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
        if self.bulk_status is not None:
            resource["instancesBulkInsertOperationMetadata"] = {"perLocationStatus": {f"zones/{self.zone}": dict(self.bulk_status)}}
        return resource
