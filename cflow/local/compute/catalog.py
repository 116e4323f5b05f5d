"""What exists before any VM does: zones, machine types (predefined and custom), disk types and images.

One ``Catalog`` holds every table. Public images (``PUBLIC_IMAGES``) are
there from the start and read-only; project images come and go with
``images.insert`` and ``images.delete`` (the engine keeps their content).
"""

import hashlib
import re
import threading
from typing import Any

from cflow.local.compute import api_errors
from cflow.zones import KNOWN_ZONES, region_of

CATALOG_TIMESTAMP = "2016-01-01T00:00:00.000-08:00"


def _machine_types() -> dict[str, tuple[int, int, bool, str]]:
    """Returns {name: (guestCpus, memoryMb, isSharedCpu, description)}."""
    types = {
        "e2-micro": (2, 1024, True, "Efficient Instance, 2 vCPU (1/8 shared physical core) and 1 GB RAM"),
        "e2-small": (2, 2048, True, "Efficient Instance, 2 vCPU (1/4 shared physical core) and 2 GB RAM"),
        "e2-medium": (2, 4096, True, "Efficient Instance, 2 vCPU (1/2 shared physical core) and 4 GB RAM"),
    }
    for cpus in (2, 4, 8, 16, 32):
        types[f"e2-standard-{cpus}"] = (cpus, cpus * 4096, False, f"Efficient Instance, {cpus} vCPUs, {cpus * 4} GB RAM")
        types[f"e2-highcpu-{cpus}"] = (cpus, cpus * 1024, False, f"Efficient Instance, {cpus} vCPUs, {cpus} GB RAM")
        types[f"n2-standard-{cpus}"] = (cpus, cpus * 4096, False, f"{cpus} vCPUs {cpus * 4} GB RAM")
    for cpus in (1, 2, 4, 8, 16):
        memory_mb = cpus * 3840
        types[f"n1-standard-{cpus}"] = (cpus, memory_mb, False, f"{cpus} vCPU{'s' if cpus > 1 else ''}, {memory_mb / 1024:g} GB RAM")
    for cpus in (4, 8, 16):
        types[f"c2-standard-{cpus}"] = (cpus, cpus * 4096, False, f"Compute Optimized: {cpus} vCPUs, {cpus * 4} GB RAM")
    return types


# Disk types of every zone: name -> (description, valid sizes, default size GB).
DISK_TYPES = {
    "pd-standard": ("Standard Persistent Disk", "10GB-65536GB", 500),
    "pd-balanced": ("Balanced Persistent Disk", "10GB-65536GB", 100),
    "pd-ssd": ("SSD Persistent Disk", "10GB-65536GB", 100),
    "pd-extreme": ("Extreme Persistent Disk", "500GB-65536GB", 1000),
    "hyperdisk-balanced": ("Hyperdisk Balanced Persistent Disk", "4GB-65536GB", 100),
    "local-ssd": ("Local SSD", "375GB-375GB", 375),
}

# Custom machine types, as GCE names them: [SERIES-]custom-CPUS-MEMORY_MB[-ext] (no series: N1).
CUSTOM_MACHINE_TYPE = re.compile(r"(?:(?P<series>e2|n1|n2|n2d)-)?custom-(?P<cpus>[0-9]+)-(?P<memory>[0-9]+)(?P<ext>-ext)?")
# Series -> (allowed vCPU counts, min and max MB of memory per vCPU without -ext).
CUSTOM_LIMITS: dict[str, tuple[range, int, int]] = {
    "n1": (range(1, 97), 922, 6656),
    "e2": (range(2, 33), 512, 8192),
    "n2": (range(2, 129), 512, 8192),
    "n2d": (range(2, 225), 512, 8192),
}


def custom_machine_type(name: str) -> tuple[int, int, bool, str] | None:
    """(guestCpus, memoryMb, isSharedCpu, description) of a valid custom machine type name, else None.

    GCE's rules: memory a multiple of 256 MB, within the series' per-vCPU
    range (no upper bound with ``-ext``); vCPUs 1 or an even number.
    """
    match = CUSTOM_MACHINE_TYPE.fullmatch(name)
    if match is None:
        return None
    series = match.group("series") or "n1"
    cpus, memory_mb = int(match.group("cpus")), int(match.group("memory"))
    allowed_cpus, least_per_cpu, most_per_cpu = CUSTOM_LIMITS[series]
    if cpus not in allowed_cpus or (cpus > 1 and cpus % 2) or memory_mb % 256:
        return None
    if memory_mb < least_per_cpu * cpus or (not match.group("ext") and memory_mb > most_per_cpu * cpus):
        return None
    return cpus, memory_mb, False, "Custom created machine type."


# (project, name, family, description); the newest image of a family comes last.
PUBLIC_IMAGES = (
    ("debian-cloud", "debian-11-bullseye-v20240110", "debian-11", "Debian, Debian GNU/Linux, 11 (bullseye), amd64 built on 20240110"),
    ("debian-cloud", "debian-12-bookworm-v20240110", "debian-12", "Debian, Debian GNU/Linux, 12 (bookworm), amd64 built on 20240110"),
    ("ubuntu-os-cloud", "ubuntu-2004-focal-v20240110", "ubuntu-2004-lts", "Canonical, Ubuntu, 20.04 LTS, amd64 focal image built on 2024-01-10"),
    ("ubuntu-os-cloud", "ubuntu-2204-jammy-v20240110", "ubuntu-2204-lts", "Canonical, Ubuntu, 22.04 LTS, amd64 jammy image built on 2024-01-10"),
    ("cos-cloud", "cos-109-17800-66-54", "cos-109-lts", "Google, Container-Optimized OS, 109-17800.66.54 LTS"),
)
PUBLIC_PROJECTS = frozenset(project for project, _, _, _ in PUBLIC_IMAGES)
DEPRECATION_STATES = ("DEPRECATED", "OBSOLETE", "DELETED")


def stable_id(text: str) -> int:
    """Returns a uint64-style id (as int) derived from ``text``, stable across runs."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class Catalog:
    """Zones, machine types and images, with their GCE JSON forms.

    ``base_url`` is the emulator's own ``http://H:P/compute/v1/`` so selfLinks
    point back at it.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.zone_region = {zone: region_of(zone) for zone in KNOWN_ZONES}
        self.machine_types = _machine_types()
        self._images_lock = threading.Lock()
        self._images: dict[tuple[str, str], dict[str, Any]] = {}
        for project, name, family, description in PUBLIC_IMAGES:
            self.add_image(project, name, family=family, description=description)

    # Zones and regions.

    def region_of(self, zone: str) -> str | None:
        """Returns the zone's region name, or None for an unknown zone."""
        return self.zone_region.get(zone)

    def zone_url(self, project: str, zone: str) -> str:
        """``BASE/projects/P/zones/Z``."""
        return f"{self.base_url}projects/{project}/zones/{zone}"

    def zone_json(self, project: str, zone: str) -> dict[str, Any]:
        """Returns a compute#zone; raises ApiError 404 for an unknown zone."""
        region = self.zone_region.get(zone)
        if region is None:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}")
        return {
            "kind": "compute#zone",
            "id": str(stable_id("zone/" + zone)),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": zone,
            "description": zone,
            "status": "UP",
            "region": f"{self.base_url}projects/{project}/regions/{region}",
            "selfLink": self.zone_url(project, zone),
            "availableCpuPlatforms": ["Intel Cascade Lake", "Intel Ice Lake", "AMD Milan"],
            "supportsPzs": False,
        }

    def zone_names(self) -> list[str]:
        """Every zone, sorted."""
        return sorted(self.zone_region)

    # Machine types.

    def machine_type_entry(self, name: str) -> tuple[int, int, bool, str] | None:
        """(guestCpus, memoryMb, isSharedCpu, description) of a predefined or custom machine type; None if unknown."""
        return self.machine_types.get(name) or custom_machine_type(name)

    def guest_cpus(self, machine_type: str) -> int | None:
        """Returns the vCPU count, or None for an unknown machine type (predefined or custom)."""
        entry = self.machine_type_entry(machine_type)
        return entry[0] if entry else None

    def machine_type_json(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """Returns a compute#machineType (predefined or custom); raises ApiError 404 if unknown."""
        entry = self.machine_type_entry(name)
        if entry is None or zone not in self.zone_region:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/machineTypes/{name}")
        cpus, memory_mb, shared, description = entry
        return {
            "kind": "compute#machineType",
            "id": str(stable_id("machineType/" + name)),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": name,
            "description": description,
            "guestCpus": cpus,
            "memoryMb": memory_mb,
            "imageSpaceGb": 0,
            "maximumPersistentDisks": 128,
            "maximumPersistentDisksSizeGb": "263168",
            "zone": zone,
            "selfLink": f"{self.zone_url(project, zone)}/machineTypes/{name}",
            "isSharedCpu": shared,
            "architecture": "X86_64",
        }

    # Disk types.

    def disk_type_json(self, project: str, zone: str, name: str) -> dict[str, Any]:
        """Returns a compute#diskType; raises ApiError 404 if unknown."""
        entry = DISK_TYPES.get(name)
        if entry is None or zone not in self.zone_region:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/diskTypes/{name}")
        description, valid_sizes, default_gb = entry
        return {
            "kind": "compute#diskType",
            "id": str(stable_id("diskType/" + name)),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": name,
            "description": description,
            "validDiskSize": valid_sizes,
            "zone": self.zone_url(project, zone),
            "selfLink": f"{self.zone_url(project, zone)}/diskTypes/{name}",
            "defaultDiskSizeGb": str(default_gb),
        }

    # Images.

    def add_image(self, project: str, name: str, family: str | None = None, description: str = "", disk_size_gb: int = 10) -> dict[str, Any]:
        """Registers an image (public or project-owned) and returns its JSON."""
        image = {
            "kind": "compute#image",
            "id": str(stable_id(f"image/{project}/{name}")),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": name,
            "description": description,
            "sourceType": "RAW",
            "status": "READY",
            "archiveSizeBytes": "0",
            "diskSizeGb": str(disk_size_gb),
            "selfLink": f"{self.base_url}projects/{project}/global/images/{name}",
            "labelFingerprint": "42WmSpB8rSM=",
            "storageLocations": ["us", "eu", "asia"],
            "architecture": "X86_64",
        }
        if family:
            image["family"] = family
        with self._images_lock:
            self._images[(project, name)] = image
        return image

    def image_json(self, project: str, name: str) -> dict[str, Any]:
        """Returns a compute#image; raises ApiError 404 if unknown."""
        with self._images_lock:
            image = self._images.get((project, name))
        if image is None:
            raise api_errors.not_found(f"projects/{project}/global/images/{name}")
        return image

    def image_from_family(self, project: str, family: str) -> dict[str, Any]:
        """Returns the newest READY, non-deprecated image of ``family``; raises ApiError 404 if none."""
        with self._images_lock:
            matches = [
                image
                for (owner, _), image in self._images.items()
                if owner == project
                and image.get("family") == family
                and image["status"] == "READY"
                and image.get("deprecated", {}).get("state") not in DEPRECATION_STATES
            ]
        if not matches:
            raise api_errors.not_found(f"projects/{project}/global/images/family/{family}")
        # Insertion order is creation order: a project image is added when it is created.
        return matches[-1]

    def images_of(self, project: str) -> list[dict[str, Any]]:
        """The project's images, in creation order."""
        with self._images_lock:
            return [image for (owner, _), image in self._images.items() if owner == project]

    def insert_image(self, project: str, image: dict[str, Any]) -> None:
        """Adds a project image (its JSON); raises ApiError 409 if the name is taken."""
        with self._images_lock:
            if (project, image["name"]) in self._images:
                raise api_errors.already_exists(f"projects/{project}/global/images/{image['name']}")
            self._images[(project, image["name"])] = image

    def update_image(self, project: str, name: str, **fields: Any) -> dict[str, Any]:
        """Replaces fields of an image (a value of None removes the field); returns the new JSON.

        The JSON is replaced, never mutated, so answers already handed out stay as they were.
        """
        with self._images_lock:
            image = dict(self._images[(project, name)])
            for field, value in fields.items():
                if value is None:
                    image.pop(field, None)
                else:
                    image[field] = value
            self._images[(project, name)] = image
            return image

    def remove_image(self, project: str, name: str) -> None:
        """Forgets the image (nothing if it is not there)."""
        with self._images_lock:
            self._images.pop((project, name), None)

    def resolve_source_image(self, source: str, request_project: str) -> dict[str, Any]:
        """Resolves a ``sourceImage`` reference as GCE accepts them.

        Accepts full URLs, ``projects/P/global/images/[family/]X``,
        ``global/images/[family/]X`` (the request's project) and the zonal view
        of a family gcloud sends for ``--image-family``,
        ``projects/P/zones/Z/imageFamilyViews/F`` (``Z`` a zone or ``-``: any).

        Returns the image JSON; raises ApiError 404 for an unknown image and
        400 for a reference that is not an image path at all.
        """
        path = source
        marker = "/compute/v1/"
        if "://" in path:
            path = path.split(marker, 1)[1] if marker in path else path.split("://", 1)[1].split("/", 1)[-1]
        path = path.strip("/")
        parts = path.split("/")
        if parts[0] == "global":
            parts = ["projects", request_project, *parts]
        if len(parts) == 5 and parts[0] == "projects" and parts[2:4] == ["global", "images"]:
            return self.image_json(parts[1], parts[4])
        if len(parts) == 6 and parts[0] == "projects" and parts[2:5] == ["global", "images", "family"]:
            return self.image_from_family(parts[1], parts[5])
        if len(parts) == 6 and parts[0] == "projects" and parts[2] == "zones" and parts[4] == "imageFamilyViews":
            if parts[3] != "-" and parts[3] not in self.zone_region:
                raise api_errors.not_found(path)
            return self.image_from_family(parts[1], parts[5])
        raise api_errors.invalid_field("resource.disks[0].initializeParams.sourceImage", source, "The URL is malformed.")
