"""Request bodies checked as GCE checks them, turned into plain specs.

Every function raises ``ApiError`` with GCE's status and reason for bad
input (400 invalid/required/badRequest, 404 notFound for unknown images)
and never anything else for anything a client can send.

What needs the emulator's state is checked by the part that holds it: the
networks an interface names (``networks``), the accelerator types of a zone
(``accelerators``), quotas and policy (``quotas``, ``policy``).
"""

import copy
import dataclasses
import ipaddress
import re
from typing import TYPE_CHECKING, Any, TypedDict

from cflow.local.compute import api_errors
from cflow.local.compute import scheduling as scheduling_rules
from cflow.local.compute.resources import STANDARD_SCOPES, default_service_account

if TYPE_CHECKING:
    from cflow.local.compute.catalog import Catalog

NAME_RULE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
LABEL_KEY_RULE = re.compile(r"[a-z][-_a-z0-9]{0,62}")
LABEL_VALUE_RULE = re.compile(r"[-_a-z0-9]{0,63}")
METADATA_KEY_RULE = re.compile(r"[-_a-zA-Z0-9]{1,128}")
MAX_METADATA_VALUE_BYTES = 256 * 1024
MAX_METADATA_BYTES = 512 * 1024
MAX_LABELS = 64
ACCESS_CONFIG_TYPES = ("ONE_TO_ONE_NAT",)
NETWORK_TIERS = ("PREMIUM", "STANDARD")
DEFAULT_ACCESS_CONFIG_NAME = "External NAT"

class DiskSpec(TypedDict):
    """One disk of an instance, as the engine keeps it (GCE's own field names)."""

    diskName: str
    deviceName: str
    index: int
    boot: bool
    autoDelete: bool
    diskSizeGb: int
    licenses: list[str]
    diskType: str
    sourceImage: str | None
    sourceImageId: str | None


@dataclasses.dataclass(frozen=True)
class NetworkRef:
    """A network an interface names: its project and name, and the reference as sent (for messages)."""

    project: str
    name: str
    sent: str

    @property
    def path(self) -> str:
        """``projects/P/global/networks/N``."""
        return f"projects/{self.project}/global/networks/{self.name}"


@dataclasses.dataclass(frozen=True)
class SubnetworkRef:
    """A subnetwork an interface names: project, region, name, and the reference as sent."""

    project: str
    region: str
    name: str
    sent: str

    @property
    def path(self) -> str:
        """``projects/P/regions/R/subnetworks/S``."""
        return f"projects/{self.project}/regions/{self.region}/subnetworks/{self.name}"


@dataclasses.dataclass(frozen=True)
class InterfaceRequest:
    """One ``networkInterfaces`` entry, checked in form (``networks.Networks.resolve`` checks what it names).

    ``network`` and ``subnetwork`` are None when not sent; ``access_configs``
    are complete (type, name, networkTier, and natIP when one was asked for).
    """

    network: NetworkRef | None
    subnetwork: SubnetworkRef | None
    network_ip: str | None
    access_configs: tuple[dict[str, str], ...]


@dataclasses.dataclass(frozen=True)
class AcceleratorRequest:
    """One ``guestAccelerators`` entry as sent: the type's name and the card count."""

    type_name: str
    count: int


# Instance fields the emulator keeps as sent and answers back (it has no behaviour for them), with their JSON type.
KEPT_INSTANCE_FIELDS: dict[str, type] = {
    "canIpForward": bool,
    "deletionProtection": bool,
    "minCpuPlatform": str,
    "shieldedInstanceConfig": dict,
    "reservationAffinity": dict,
    "advancedMachineFeatures": dict,
    "displayDevice": dict,
    "confidentialInstanceConfig": dict,
    "keyRevocationActionType": str,
    "resourcePolicies": list,
}


class InstanceSpec(TypedDict):
    """A checked Instance (insert) or InstanceProperties (bulkInsert) body; ``name`` is None in the latter.

    ``kept`` holds the ``KEPT_INSTANCE_FIELDS`` that were sent.
    """

    name: str | None
    machine_type: str
    cpus: int
    description: str
    labels: dict[str, str]
    metadata_items: list[dict[str, str]]
    scheduling: dict[str, Any]
    disks: list[DiskSpec]
    network_interfaces: list[InterfaceRequest]
    guest_accelerators: list[AcceleratorRequest]
    service_accounts: list[dict[str, Any]]
    tags: list[str]
    hostname: str | None
    kept: dict[str, Any]


class ImageSpec(TypedDict):
    """A checked images.insert body (made from a disk)."""

    name: str
    family: str | None
    description: str
    source_disk: str


def check_name(name: Any, field: str = "resource.name") -> None:
    """Raises 400 unless ``name`` follows GCE's resource name rule."""
    if name is None or name == "":
        raise api_errors.required(field)
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise api_errors.invalid_name(field, name)


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", bool: "a boolean", str: "a string", int: "an integer"}


def _expect(value: Any, kind: type, field: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = value if not isinstance(value, (dict, list)) else ""
        raise api_errors.invalid_field(field, shown, f"Expected {_JSON_TYPE_NAMES[kind]}.")
    return value


def parse_int64(value: Any, field: str) -> int:
    """int64 fields arrive as JSON strings (or numbers); returns an int or raises 400."""
    if isinstance(value, bool):
        raise api_errors.invalid_field(field, value, "Expected an integer.")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    raise api_errors.invalid_field(field, value, "Expected an integer.")


def check_labels(labels: Any, field: str) -> dict[str, str]:
    """Returns a validated copy of a labels map."""
    if labels is None:
        return {}
    _expect(labels, dict, field)
    if len(labels) > MAX_LABELS:
        raise api_errors.invalid_field(field, "", f"Resources can have at most {MAX_LABELS} labels.")
    for key, value in labels.items():
        if not LABEL_KEY_RULE.fullmatch(key):
            raise api_errors.invalid_field(
                field, "", f"Label key '{key}' violates format constraints. The key must start with a lowercase character, "
                "can only contain lowercase letters, numeric characters, underscores and dashes. The key can be at most 63 characters long."
            )
        if not isinstance(value, str) or not LABEL_VALUE_RULE.fullmatch(value):
            raise api_errors.invalid_field(
                field, "", f"Label value '{value}' violates format constraints. The value can only contain lowercase letters, "
                "numeric characters, underscores and dashes. The value can be at most 63 characters long."
            )
    return dict(labels)


def check_metadata_items(metadata: Any, field: str) -> list[dict[str, str]]:
    """Returns validated metadata items ``[{key, value}]`` from a Metadata body."""
    if metadata is None:
        return []
    _expect(metadata, dict, field)
    items = metadata.get("items") or []
    _expect(items, list, f"{field}.items")
    seen = set()
    total = 0
    result = []
    for index, item in enumerate(items):
        _expect(item, dict, f"{field}.items[{index}]")
        key = item.get("key")
        if key is None:
            raise api_errors.required(f"{field}.items[{index}].key")
        if not isinstance(key, str) or not METADATA_KEY_RULE.fullmatch(key):
            raise api_errors.invalid_field(f"{field}.items[{index}].key", key, "Must be a match of regex '[a-zA-Z0-9-_]{1,128}'")
        if key in seen:
            raise api_errors.invalid_field(field, "", f"Duplicate keys are not allowed: {key}.")
        seen.add(key)
        value = item.get("value", "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise api_errors.invalid_field(f"{field}.items[{index}].value", "", "Expected a string.")
        size = len(value.encode())
        if size > MAX_METADATA_VALUE_BYTES:
            raise api_errors.invalid_field(f"{field}.items[{index}].value", "", f"Value exceeds the maximum size of {MAX_METADATA_VALUE_BYTES} bytes.")
        total += size + len(key)
        result.append({"key": key, "value": value})
    if total > MAX_METADATA_BYTES:
        raise api_errors.invalid_field(field, "", f"Metadata exceeds the maximum total size of {MAX_METADATA_BYTES} bytes.")
    return result


def _last_segment(reference: str) -> str:
    return reference.rstrip("/").rsplit("/", 1)[-1]


def check_machine_type(reference: Any, zone: str, catalog: "Catalog", field: str, name_only: bool = False) -> tuple[str, int]:
    """Returns (machine type name, vCPUs) of an Instance's or InstanceProperties' ``machineType``.

    An Instance names it by a zonal URL: a full URL, ``projects/P/zones/Z/machineTypes/T``
    or ``zones/Z/machineTypes/T`` (a bare name is "The URL is malformed."); InstanceProperties
    (``name_only``) by its bare name. Raises 400 invalid for another zone or an unknown type.
    """
    if not reference:
        raise api_errors.required(field)
    if not isinstance(reference, str):
        raise api_errors.invalid_field(field, "", "Expected a string.")
    if name_only:
        name = reference
    else:
        path = reference.split("://", 1)[1].split("/", 1)[-1] if "://" in reference else reference
        path = re.sub(r"^compute/(?:v1|beta|alpha)/", "", path)
        parts = path.strip("/").split("/")
        if parts[0] == "zones":
            parts = ["projects", "-", *parts]
        if len(parts) != 6 or parts[0] != "projects" or parts[2] != "zones" or parts[4] != "machineTypes" or not all(parts):
            raise api_errors.invalid_field(field, reference, "The URL is malformed.")
        if parts[3] != zone:
            raise api_errors.invalid_field(field, reference, f"Cross-zone references are not allowed; the instance is in zone '{zone}'.")
        name = parts[5]
    cpus = catalog.guest_cpus(name)
    if cpus is None:
        raise api_errors.invalid_field(field, reference, f"Machine type with name '{name}' does not exist in zone '{zone}'.")
    return name, cpus


def check_scheduling(scheduling: Any, field: str) -> dict[str, Any]:
    """Returns the full Scheduling with GCE's defaults for the provisioning model (GCE's rules: ``scheduling.check``)."""
    return scheduling_rules.check(scheduling, field)


def check_disks(disks: Any, instance_name: str, request_project: str, catalog: "Catalog", field: str) -> list[DiskSpec]:
    """Returns disk specs; the boot disk must be made from a known image (404 otherwise)."""
    if not disks:
        raise api_errors.invalid_field(field, "", "Boot disk must be specified.")
    _expect(disks, list, field)
    result: list[DiskSpec] = []
    boot_seen = False
    for index, disk in enumerate(disks):
        _expect(disk, dict, f"{field}[{index}]")
        boot = disk.get("boot", index == 0 and not any(isinstance(other, dict) and other.get("boot") for other in disks))
        params = disk.get("initializeParams") or {}
        _expect(params, dict, f"{field}[{index}].initializeParams")
        if disk.get("source") and not params:
            raise api_errors.not_found(str(disk["source"]).split("/compute/v1/")[-1])
        source_image = params.get("sourceImage")
        licenses: list[str] = []
        image = None
        if boot:
            if boot_seen:
                raise api_errors.invalid_field(f"{field}[{index}].boot", "true", "Only one boot disk is allowed.")
            boot_seen = True
            if not source_image:
                raise api_errors.invalid_field(f"{field}[{index}].initializeParams.sourceImage", "", "Source image must be specified.")
        if source_image:
            if not isinstance(source_image, str):
                raise api_errors.invalid_field(f"{field}[{index}].initializeParams.sourceImage", "", "Expected a string.")
            image = catalog.resolve_source_image(source_image, request_project)
            if image["status"] != "READY":
                raise api_errors.resource_not_ready(image["selfLink"].split("/compute/v1/")[-1])
            licenses = image.get("licenses") or [image["selfLink"].split("/global/images/")[0] + "/global/licenses/" + image.get("family", image["name"])]
        disk_name = params.get("diskName") or (instance_name if boot else f"{instance_name}-{index}")
        size = parse_int64(params.get("diskSizeGb", image["diskSizeGb"] if image else 10), f"{field}[{index}].initializeParams.diskSizeGb")
        if image and size < int(image["diskSizeGb"]):
            raise api_errors.invalid_field(
                f"{field}[{index}].initializeParams.diskSizeGb", size, f"Requested disk size cannot be smaller than the image size ({image['diskSizeGb']} GB)"
            )
        disk_type = params.get("diskType") or "pd-standard"
        if not isinstance(disk_type, str):
            raise api_errors.invalid_field(f"{field}[{index}].initializeParams.diskType", "", "Expected a string.")
        result.append(
            {
                "diskName": disk_name,
                "deviceName": disk.get("deviceName") or disk_name,
                "index": index,
                "boot": bool(boot),
                "autoDelete": bool(disk.get("autoDelete", True)),
                "diskSizeGb": size,
                "licenses": licenses,
                "diskType": _last_segment(disk_type),
                "sourceImage": image["selfLink"] if image else None,
                "sourceImageId": image["id"] if image else None,
            }
        )
    return result


def disk_reference(reference: Any, request_project: str, field: str) -> tuple[str, str, str]:
    """Parses a disk reference as GCE accepts them: a full URL, ``projects/P/zones/Z/disks/D`` or ``zones/Z/disks/D``.

    Returns (project, zone, disk); raises 400 invalid for anything else.
    """
    if not isinstance(reference, str) or not reference:
        raise api_errors.invalid_field(field, "" if not isinstance(reference, str) else reference, "The URL is malformed.")
    path = reference
    if "://" in path:
        marker = "/compute/v1/"
        path = path.split(marker, 1)[1] if marker in path else ""
    parts = path.strip("/").split("/")
    if parts[0] == "zones":
        parts = ["projects", request_project, *parts]
    if len(parts) != 6 or parts[0] != "projects" or parts[2] != "zones" or parts[4] != "disks" or not all(parts):
        raise api_errors.invalid_field(field, reference, "The URL is malformed.")
    return parts[1], parts[3], parts[5]


def image_spec(body: Any, field: str = "resource") -> ImageSpec:
    """Validates an images.insert body made from a disk.

    Returns a dict: name, family (or None), description, source_disk (the reference as sent).
    Raises 400 for a bad name or family, and for anything but exactly one source, a ``sourceDisk``.
    """
    _expect(body, dict, field)
    check_name(body.get("name"), f"{field}.name")
    family = body.get("family")
    if family is not None:
        check_name(family, f"{field}.family")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise api_errors.invalid_field(f"{field}.description", "", "Expected a string.")
    raw_disk = body.get("rawDisk") or {}
    _expect(raw_disk, dict, f"{field}.rawDisk")
    sources = [name for name in ("sourceDisk", "sourceImage", "sourceSnapshot") if body.get(name)]
    if raw_disk.get("source"):
        sources.append("rawDisk.source")
    if len(sources) != 1:
        raise api_errors.invalid_resource_usage("Must specify exactly one source for an image.")
    if sources != ["sourceDisk"]:
        raise api_errors.bad_request(f"The Compute emulator makes images from a sourceDisk only, not from {sources[0]}.")
    return {"name": body["name"], "family": family, "description": description, "source_disk": body["sourceDisk"]}


def _reference_parts(reference: str) -> list[str]:
    """The path segments of a resource reference: a URL is cut after ``/compute/v1/``."""
    path = reference
    if "://" in path:
        marker = "/compute/v1/"
        path = path.split(marker, 1)[1] if marker in path else ""
    return path.strip("/").split("/")


def network_reference(reference: Any, request_project: str, field: str) -> NetworkRef:
    """Parses a network reference: a URL, ``projects/P/global/networks/N``, ``global/networks/N`` or a bare name.

    Raises 400 invalid for anything else.
    """
    if not isinstance(reference, str) or not reference:
        raise api_errors.invalid_field(field, reference if isinstance(reference, str) else "", "The URL is malformed.")
    parts = _reference_parts(reference)
    if parts[0] == "global":
        parts = ["projects", request_project, *parts]
    elif len(parts) == 1:
        parts = ["projects", request_project, "global", "networks", parts[0]]
    if len(parts) != 5 or parts[0] != "projects" or parts[2:4] != ["global", "networks"] or not all(parts):
        raise api_errors.invalid_field(field, reference, "The URL is malformed.")
    return NetworkRef(parts[1], parts[4], reference)


def subnetwork_reference(reference: Any, request_project: str, region: str, field: str) -> SubnetworkRef:
    """Parses a subnetwork reference: a URL, ``projects/P/regions/R/subnetworks/S``, ``regions/R/subnetworks/S``
    or a bare name (in ``region``). Raises 400 invalid for anything else.
    """
    if not isinstance(reference, str) or not reference:
        raise api_errors.invalid_field(field, reference if isinstance(reference, str) else "", "The URL is malformed.")
    parts = _reference_parts(reference)
    if parts[0] == "regions":
        parts = ["projects", request_project, *parts]
    elif len(parts) == 1:
        parts = ["projects", request_project, "regions", region, "subnetworks", parts[0]]
    if len(parts) != 6 or parts[0] != "projects" or parts[2] != "regions" or parts[4] != "subnetworks" or not all(parts):
        raise api_errors.invalid_field(field, reference, "The URL is malformed.")
    return SubnetworkRef(parts[1], parts[3], parts[5], reference)


def check_access_configs(configs: Any, region: str, field: str) -> tuple[dict[str, str], ...]:
    """Returns an interface's access configs with GCE's defaults; GCE takes at most one (ONE_TO_ONE_NAT).

    A ``natIP`` must be an external IPv4 address (the emulator has no
    addresses resource, so any such address stands for a reserved one).
    """
    if configs is None:
        return ()
    _expect(configs, list, field)
    if len(configs) > 1:
        raise api_errors.invalid_field(field, "", "At most one access config currently supported.")
    result = []
    for index, config in enumerate(configs):
        entry_field = f"{field}[{index}]"
        _expect(config, dict, entry_field)
        kind = config.get("type") or "ONE_TO_ONE_NAT"
        if kind not in ACCESS_CONFIG_TYPES:
            raise api_errors.invalid_field(f"{entry_field}.type", kind, "The access config type must be ONE_TO_ONE_NAT.")
        tier = config.get("networkTier") or "PREMIUM"
        if tier not in NETWORK_TIERS:
            raise api_errors.invalid_field(f"{entry_field}.networkTier", tier, "Must be PREMIUM or STANDARD.")
        name = config.get("name") or DEFAULT_ACCESS_CONFIG_NAME
        if not isinstance(name, str):
            raise api_errors.invalid_field(f"{entry_field}.name", "", "Expected a string.")
        checked = {"type": kind, "name": name, "networkTier": tier}
        nat_ip = config.get("natIP")
        if nat_ip:
            if not _is_external_ipv4(nat_ip):
                raise api_errors.invalid_field(
                    f"{entry_field}.natIP", nat_ip, f"The specified external IP address '{nat_ip}' was not found in region '{region}'."
                )
            checked["natIP"] = nat_ip
        result.append(checked)
    return tuple(result)


def _is_external_ipv4(text: Any) -> bool:
    try:
        address = ipaddress.IPv4Address(text)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return False
    return address.is_global


def check_network_interfaces(interfaces: Any, request_project: str, region: str, field: str) -> list[InterfaceRequest]:
    """Returns the interfaces in form: references parsed, access configs checked (none sent: one on the default network)."""
    if interfaces is None:
        interfaces = [{}]
    _expect(interfaces, list, field)
    result = []
    for index, interface in enumerate(interfaces):
        entry_field = f"{field}[{index}]"
        _expect(interface, dict, entry_field)
        network = interface.get("network")
        subnetwork = interface.get("subnetwork")
        network_ip = interface.get("networkIP") or None
        if network_ip is not None:
            try:
                ipaddress.IPv4Address(network_ip)
            except (ipaddress.AddressValueError, ValueError):
                raise api_errors.invalid_field(f"{entry_field}.networkIP", network_ip, "Invalid IPv4 address.") from None
        result.append(
            InterfaceRequest(
                network=network_reference(network, request_project, f"{entry_field}.network") if network else None,
                subnetwork=subnetwork_reference(subnetwork, request_project, region, f"{entry_field}.subnetwork") if subnetwork else None,
                network_ip=network_ip,
                access_configs=check_access_configs(interface.get("accessConfigs"), region, f"{entry_field}.accessConfigs"),
            )
        )
    return result


def check_guest_accelerators(accelerators: Any, zone: str, field: str, bare_names: bool = False) -> list[AcceleratorRequest]:
    """Returns the accelerators asked for, in form; ``accelerators.AcceleratorTypes.check`` applies the zone's rules.

    ``acceleratorType`` is a full or partial URL of the zone's type
    (``zones/Z/acceleratorTypes/T``); ``bare_names`` also takes ``T`` alone,
    as bulkInsert's instanceProperties do.
    """
    if accelerators is None:
        return []
    _expect(accelerators, list, field)
    result = []
    for index, entry in enumerate(accelerators):
        entry_field = f"{field}[{index}]"
        _expect(entry, dict, entry_field)
        reference = entry.get("acceleratorType")
        if not reference:
            raise api_errors.required(f"{entry_field}.acceleratorType")
        if not isinstance(reference, str):
            raise api_errors.invalid_field(f"{entry_field}.acceleratorType", "", "Expected a string.")
        parts = _reference_parts(reference)
        if parts[0] == "zones":
            parts = ["projects", "-", *parts]
        if len(parts) == 1 and bare_names:
            parts = ["projects", "-", "zones", zone, "acceleratorTypes", parts[0]]
        if len(parts) != 6 or parts[0] != "projects" or parts[2] != "zones" or parts[4] != "acceleratorTypes" or not all(parts):
            raise api_errors.invalid_field(f"{entry_field}.acceleratorType", reference, "The URL is malformed.")
        if parts[3] != zone:
            detail = f"Cross-zone references are not allowed; the instance is in zone '{zone}'."
            raise api_errors.invalid_field(f"{entry_field}.acceleratorType", reference, detail)
        count = parse_int64(entry.get("acceleratorCount", 0), f"{entry_field}.acceleratorCount")
        if count < 1:
            raise api_errors.invalid_field(f"{entry_field}.acceleratorCount", count, "The number of accelerator cards must be at least 1.")
        result.append(AcceleratorRequest(parts[5], count))
    return result


def check_service_accounts(accounts: Any, project: str, field: str) -> list[dict[str, Any]]:
    """Returns the service accounts with ``default`` resolved to the project's default account."""
    if not accounts:
        return []
    _expect(accounts, list, field)
    result = []
    for index, account in enumerate(accounts):
        _expect(account, dict, f"{field}[{index}]")
        email = account.get("email") or "default"
        scopes = account.get("scopes") or list(STANDARD_SCOPES)
        _expect(scopes, list, f"{field}[{index}].scopes")
        result.append({"email": default_service_account(project) if email == "default" else email, "scopes": list(scopes)})
    return result


def instance_spec(body: Any, project: str, zone: str, catalog: "Catalog", field: str = "resource", name_required: bool = True) -> InstanceSpec:
    """Validates an Instance (insert) or InstanceProperties (bulkInsert, ``name_required`` False) body.

    Returns a dict: name, machine_type, cpus, description, labels,
    metadata_items, scheduling, disks, network_interfaces,
    guest_accelerators, service_accounts, tags, hostname, kept.
    """
    _expect(body, dict, field)
    name = body.get("name")
    if name_required:
        check_name(name, f"{field}.name")
    machine_type, cpus = check_machine_type(body.get("machineType"), zone, catalog, f"{field}.machineType", name_only=not name_required)
    region = catalog.region_of(zone) or ""
    tags_body = body.get("tags") or {}
    _expect(tags_body, dict, f"{field}.tags")
    tags = tags_body.get("items") or []
    _expect(tags, list, f"{field}.tags.items")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise api_errors.invalid_field(f"{field}.description", "", "Expected a string.")
    return {
        "name": name,
        "machine_type": machine_type,
        "cpus": cpus,
        "description": description,
        "labels": check_labels(body.get("labels"), f"{field}.labels"),
        "metadata_items": check_metadata_items(body.get("metadata"), f"{field}.metadata"),
        "scheduling": check_scheduling(body.get("scheduling"), f"{field}.scheduling"),
        "disks": check_disks(body.get("disks"), name or "instance", project, catalog, f"{field}.disks"),
        "network_interfaces": check_network_interfaces(body.get("networkInterfaces"), project, region, f"{field}.networkInterfaces"),
        "guest_accelerators": check_guest_accelerators(body.get("guestAccelerators"), zone, f"{field}.guestAccelerators", bare_names=not name_required),
        "service_accounts": check_service_accounts(body.get("serviceAccounts"), project, f"{field}.serviceAccounts"),
        "tags": list(tags),
        "hostname": body.get("hostname") if isinstance(body.get("hostname"), str) else None,
        "kept": {key: copy.deepcopy(_expect(body[key], kind, f"{field}.{key}")) for key, kind in KEPT_INSTANCE_FIELDS.items() if body.get(key) is not None},
    }


def name_pattern_parts(pattern: Any, field: str = "bulkInsertInstanceResource.namePattern") -> tuple[str, int, str]:
    """Splits a namePattern around its one run of '#' (1 to 18 of them).

    Returns (prefix, digits, suffix); raises 400 invalid otherwise.
    """
    if not isinstance(pattern, str):
        raise api_errors.invalid_field(field, "", "Expected a string.")
    runs = re.findall(r"#+", pattern)
    if len(runs) != 1 or len(runs[0]) > 18:
        raise api_errors.invalid_field(field, pattern, "The name pattern must contain one continuous sequence of 1 to 18 '#' characters.")
    prefix, suffix = pattern.split(runs[0])
    example = prefix + "1" * len(runs[0]) + suffix
    if not NAME_RULE.fullmatch(example):
        raise api_errors.invalid_name(field, pattern)
    return prefix, len(runs[0]), suffix
