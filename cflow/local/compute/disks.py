"""disks.* (get, list, aggregatedList, delete): every disk of a VM as a zonal resource, and what happens to disks when VMs come and go.

A disk is named as GCE names it (the VM's name for the boot disk unless
``initializeParams.diskName``); it goes with its VM when ``autoDelete`` is
true, else it stays, detached. A boot disk's content is the VM's disk
directory on the host (``vm.GuestLauncher.disk_dir``).
"""

from collections.abc import Iterable

from cflow.local.compute import api_errors
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, aggregated_list
from cflow.local.compute.resources import Disk, Instance
from cflow.local.compute.validation import DiskSpec, InstanceSpec
from cflow.local.compute.vm import GuestLauncher


class Disks:
    """disks.get/list/aggregatedList/delete, and the disks of instances being created and removed.

    Args:
        core: the shared state (``core.disks`` is the table).
        launcher: knows where a VM's disk directory is.

    API methods raise ``ApiError``; the others are called with the core's lock held.
    """

    def __init__(self, core: ComputeCore, launcher: GuestLauncher) -> None:
        self.core = core
        self.launcher = launcher

    # For instances (hold the lock).

    @staticmethod
    def specs_for(spec: InstanceSpec, name: str) -> list[DiskSpec]:
        """The disks of VM ``name`` made from ``spec``."""
        disks = [disk.copy() for disk in spec["disks"]]
        if spec["name"] is None:
            # bulkInsert: one properties block for many VMs, so disk names follow each VM's name.
            for disk in disks:
                disk["diskName"] = disk["deviceName"] = name if disk["boot"] else f"{name}-{disk['index']}"
        return disks

    def refuse_taken_names(self, project: str, zone: str, spec: InstanceSpec, names: Iterable[str]) -> None:
        """Raises ApiError 409 if a disk of any of the VMs ``names`` would take a disk name in use."""
        for name in names:
            for disk in self.specs_for(spec, name):
                if (project, zone, disk["diskName"]) in self.core.disks:
                    raise api_errors.already_exists(f"projects/{project}/zones/{zone}/disks/{disk['diskName']}")

    def names_in(self, project: str, zone: str) -> list[str]:
        """The names of the disks of a zone."""
        return [name for (owner, where, name) in self.core.disks if owner == project and where == zone]

    def attach_new(self, instance: Instance) -> None:
        """Creates the disk resources of a new VM, attached to it."""
        for spec in instance.disks:
            disk = Disk(
                id=self.core.new_id(),
                name=spec["diskName"],
                project=instance.project,
                zone=instance.zone,
                size_gb=spec["diskSizeGb"],
                disk_type=spec.get("diskType") or "pd-standard",
                source_image=spec.get("sourceImage"),
                source_image_id=spec.get("sourceImageId"),
                licenses=list(spec.get("licenses") or []),
                directory=self.launcher.disk_dir(instance.name, instance.id) if spec["boot"] else None,
                user=instance.key,
                creation_ts=instance.creation_ts,
                last_attach_ts=instance.creation_ts,
            )
            self.core.disks[disk.key] = disk

    def detach(self, instance: Instance) -> None:
        """The VM is gone: its ``autoDelete`` disks go too, the others stay, detached."""
        for spec in instance.disks:
            disk = self.core.disks.get((instance.project, instance.zone, spec["diskName"]))
            if disk is None or disk.user != instance.key:
                continue
            if spec["autoDelete"]:
                del self.core.disks[disk.key]
            else:
                disk.user = None
                disk.last_detach_ts = self.core.now()

    def record(self, project: str, zone: str, name: str) -> Disk:
        """The disk; raises ApiError 404 if there is none."""
        disk = self.core.disks.get((project, zone, name))
        if disk is None:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/disks/{name}")
        return disk

    # disks.* API.

    def get(self, project: str, zone: str, name: str) -> Json:
        """disks.get."""
        self.core.check_zone(zone)
        with self.core.lock:
            return self.record(project, zone, name).to_json(self.core.base_url)

    def list_disks(self, project: str, zone: str, filter_text: str | None = None) -> Json:
        """disks.list of a zone, by name."""
        self.core.check_zone(zone)
        predicate = compile_filter(filter_text)
        base_url = self.core.base_url
        with self.core.lock:
            rendered = [disk.to_json(base_url) for (owner, where, _), disk in sorted(self.core.disks.items()) if owner == project and where == zone]
        return {
            "kind": "compute#diskList",
            "id": f"projects/{project}/zones/{zone}/disks",
            "items": [disk for disk in rendered if predicate(disk)],
            "selfLink": f"{self.core.zone_url(project, zone)}/disks",
        }

    def aggregated_list(self, project: str, filter_text: str | None = None) -> Json:
        """disks.aggregatedList: every disk of the project, by zone and name."""
        predicate = compile_filter(filter_text)
        base_url = self.core.base_url
        with self.core.lock:
            rendered = [(f"zones/{zone}", disk.to_json(base_url)) for (owner, zone, _), disk in sorted(self.core.disks.items()) if owner == project]
        scopes = [f"zones/{zone}" for zone in self.core.catalog.zone_names()]
        return aggregated_list(base_url, "compute#diskAggregatedList", project, "disks", scopes, [item for item in rendered if predicate(item[1])])

    def delete(self, project: str, zone: str, name: str) -> Json:
        """disks.delete of a detached disk (its content stays on the host, as a deleted VM's does).

        Raises:
            ApiError: 400 resourceInUseByAnotherResource for a disk attached to a VM.
        """
        self.core.check_zone(zone)
        core = self.core
        with core.lock:
            disk = self.record(project, zone, name)
            if disk.user is not None:
                user_project, user_zone, user_name = disk.user
                raise api_errors.resource_in_use(disk.path, f"projects/{user_project}/zones/{user_zone}/instances/{user_name}")
            operation = core.new_operation(project, zone, "delete", disk.self_link(core.base_url), disk.id)
            del core.disks[disk.key]
            core.finish_operation(operation)
            return operation.to_json(core.base_url)
