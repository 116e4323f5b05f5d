"""images.* and imageFamilyViews.get: project images made from a disk, their content on the host, and the public images.

The catalog (``catalog.Catalog``) holds every image's JSON, public images
included (read-only: changing one is 403). ``images.insert`` copies a boot
disk's directory tree (``disk_images.DiskImages``) on a thread of its own and
answers a global operation that is DONE when the image is READY. A VM made
from a project image holds that image's tree until its first boot copies it
into its disk (``hold_boot_content`` / ``release_boot_content``).
"""

import logging
import threading

from cflow.local.compute import api_errors, validation
from cflow.local.compute.catalog import PUBLIC_PROJECTS, Catalog
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.disk_images import DiskImages
from cflow.local.compute.disks import Disks
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, item_list
from cflow.local.compute.resources import Instance, Operation, fingerprint

logger = logging.getLogger(__name__)

DEPRECATION_STATES = ("ACTIVE", "DEPRECATED", "OBSOLETE", "DELETED")


class Images:
    """images.insert/get/getFromFamily/list/delete/deprecate of any project.

    Args:
        core: the shared state (``core.image_trees``: where each project image's content is).
        disks: finds the source disk of an image.
        disk_images: copies image content on the host.

    API methods raise ``ApiError``; the others are called with the core's lock held.
    """

    def __init__(self, core: ComputeCore, disks: Disks, disk_images: DiskImages) -> None:
        self.core = core
        self.catalog: Catalog = core.catalog
        self.disks = disks
        self.disk_images = disk_images

    # For instances (hold the lock).

    def hold_boot_content(self, instance: Instance) -> None:
        """A new VM whose boot disk comes from a project image keeps that image's content until its first boot."""
        for spec in instance.disks:
            tree = self._tree_of(spec.get("sourceImage")) if spec["boot"] else None
            if tree is not None:
                self.disk_images.hold(tree)
                instance.disk_image = tree

    def release_boot_content(self, instance: Instance) -> None:
        """The VM went before its first boot copied its image: drop the hold."""
        if instance.disk_image is not None:
            self.disk_images.release(instance.disk_image)
            instance.disk_image = None

    def _tree_of(self, image_link: str | None) -> str | None:
        if not image_link:
            return None
        project, _, name = image_link.split("/compute/v1/")[-1].removeprefix("projects/").partition("/global/images/")
        return self.core.image_trees.get((project, name))

    # images.* API.

    @staticmethod
    def _refuse_public(project: str, permission: str, name: str) -> None:
        if project in PUBLIC_PROJECTS:
            raise api_errors.permission_denied(permission, f"projects/{project}/global/images/{name}")

    def get(self, project: str, name: str) -> Json:
        """images.get."""
        return self.catalog.image_json(project, name)

    def get_from_family(self, project: str, family: str) -> Json:
        """images.getFromFamily: the newest READY image of the family that is not deprecated."""
        return self.catalog.image_from_family(project, family)

    def get_family_view(self, project: str, zone: str, family: str) -> Json:
        """imageFamilyViews.get: the image of the family a VM in ``zone`` would boot (``{"image": ...}``).

        Raises:
            ApiError: 400 for an unknown zone; 404 for a family without a usable image.
        """
        self.core.check_zone(zone)
        return {"image": self.catalog.image_from_family(project, family)}

    def list_images(self, project: str, filter_text: str | None = None) -> Json:
        """images.list of a project, in creation order."""
        predicate = compile_filter(filter_text)
        images = [image for image in self.catalog.images_of(project) if predicate(image)]
        return item_list(self.core.base_url, "compute#imageList", project, "global/images", images)

    def insert(self, project: str, body: Json | None, force_create: bool = False) -> Json:
        """images.insert from a ``sourceDisk``: a global operation, DONE when the image is READY.

        Raises:
            ApiError: 400 resourceInUseByAnotherResource for a disk attached to
            a VM that is not TERMINATED, unless ``force_create``; 409 for a
            taken name; 403 in a public image project.
        """
        spec = validation.image_spec(body)
        self._refuse_public(project, "compute.images.create", spec["name"])
        disk_key = validation.disk_reference(spec["source_disk"], project, "resource.sourceDisk")
        core = self.core
        with core.lock:
            core.refuse_if_closing()
            disk = self.disks.record(*disk_key)
            user = core.instances.get(disk.user) if disk.user is not None else None
            if user is not None and user.status != "TERMINATED" and not force_create:
                raise api_errors.resource_in_use(disk.path, f"projects/{user.project}/zones/{user.zone}/instances/{user.name}")
            image_id = core.new_id()
            self_link = f"{core.base_url}projects/{project}/global/images/{spec['name']}"
            image: Json = {
                "kind": "compute#image",
                "id": str(image_id),
                "creationTimestamp": core.now(),
                "name": spec["name"],
                "description": spec["description"],
                "sourceType": "RAW",
                "status": "PENDING",
                "archiveSizeBytes": "0",
                "diskSizeGb": str(disk.size_gb),
                "sourceDisk": disk.self_link(core.base_url),
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
            core.image_trees[(project, spec["name"])] = tree
            operation = core.new_operation(project, None, "insert", self_link, image_id)
            source_dir = disk.directory
        threading.Thread(
            target=self._capture, args=(project, spec["name"], source_dir, tree, operation), name="compute-image", daemon=True
        ).start()
        return operation.to_json(core.base_url)

    def _capture(self, project: str, name: str, source_dir: str | None, tree: str, operation: Operation) -> None:
        try:
            size = self.disk_images.capture(source_dir, tree)
            failure = None
        except OSError as error:
            logger.warning("image %s of %s failed: %s", name, project, error)
            size, failure = 0, str(error)
        with self.core.lock:
            if failure is None:
                self.catalog.update_image(project, name, status="READY", archiveSizeBytes=str(size))
                self.core.finish_operation(operation)
            else:
                self.catalog.update_image(project, name, status="FAILED")
                self.core.finish_operation(operation, [{"code": "INTERNAL_ERROR", "message": failure}], 500, "INTERNAL SERVER ERROR")

    def delete(self, project: str, name: str) -> Json:
        """images.delete; the content goes once no VM waits to copy it.

        Raises:
            ApiError: 400 resourceNotReady while the image is still PENDING; 404; 403 for a public image.
        """
        self._refuse_public(project, "compute.images.delete", name)
        core = self.core
        with core.lock:
            image = self.catalog.image_json(project, name)
            if image["status"] == "PENDING":
                raise api_errors.resource_not_ready(f"projects/{project}/global/images/{name}")
            operation = core.new_operation(project, None, "delete", image["selfLink"], int(image["id"]))
            self.catalog.remove_image(project, name)
            tree = core.image_trees.pop((project, name), None)
            core.finish_operation(operation)
            answer = operation.to_json(core.base_url)
        if tree is not None:
            self.disk_images.discard(tree)
        return answer

    def deprecate(self, project: str, name: str, body: Json | None) -> Json:
        """images.deprecate: ``state`` ACTIVE clears the deprecation; DEPRECATED, OBSOLETE, DELETED set it."""
        self._refuse_public(project, "compute.images.deprecate", name)
        body = body or {}
        state = body.get("state") or "ACTIVE"
        if state not in DEPRECATION_STATES:
            raise api_errors.invalid_field("deprecationStatus.state", state, "Must be one of ACTIVE, DEPRECATED, OBSOLETE, DELETED.")
        core = self.core
        with core.lock:
            image = self.catalog.image_json(project, name)
            deprecated = None
            if state != "ACTIVE":
                deprecated = {"state": state}
                if isinstance(body.get("replacement"), str) and body["replacement"]:
                    deprecated["replacement"] = body["replacement"]
            operation = core.new_operation(project, None, "deprecate", image["selfLink"], int(image["id"]))
            self.catalog.update_image(project, name, deprecated=deprecated)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)
