"""What a VM sees of itself through its metadata server: the ``metadata.MetadataSource`` of the emulator.

Each VM's metadata server (``metadata.MetadataServers``) asks this on every
request, so a guest always sees the current labels, attributes, preempted
flag and service accounts; ``wait_metadata_change`` is what makes
``?wait_for_change=true`` return as soon as any of it changes. A guest's
``poweroff`` also arrives here.
"""

import json
from typing import Any

from cflow.local.compute.core import ComputeCore
from cflow.local.compute.lifecycle import Lifecycle
from cflow.local.compute.metadata import Verbatim
from cflow.local.compute.resources import project_number


class GuestMetadata:
    """Answers the metadata servers about the VM with id ``vm_key``.

    Args:
        core: the shared state (``core.instances_by_id``).
        lifecycle: powers a VM off when its guest asks to.
    """

    def __init__(self, core: ComputeCore, lifecycle: Lifecycle) -> None:
        self.core = core
        self.lifecycle = lifecycle

    def metadata_version(self, vm_key: int) -> int:
        """The VM's metadata version (-1 once it is gone)."""
        with self.core.lock:
            instance = self.core.instances_by_id.get(vm_key)
            return -1 if instance is None else instance.metadata_version

    def wait_metadata_change(self, vm_key: int, version: int, timeout_s: float) -> int | None:
        """Blocks until the VM's metadata version differs from ``version`` or ``timeout_s`` passes.

        Returns:
            The current version, or None once the VM is gone or the emulator stops.
        """
        core = self.core
        with core.lock:

            def changed() -> bool:
                instance = core.instances_by_id.get(vm_key)
                return instance is None or instance.metadata_version != version or core.closing

            core.metadata_changed.wait_for(changed, timeout_s)
            instance = core.instances_by_id.get(vm_key)
            return None if instance is None or core.closing else instance.metadata_version

    def metadata_token(self, vm_key: int) -> dict[str, Any] | None:
        """A fake access token of the VM's service account, or None if it has none."""
        with self.core.lock:
            instance = self.core.instances_by_id.get(vm_key)
            if instance is None or not instance.service_accounts:
                return None
            return {"access_token": f"ya29.cflow-emulator-{instance.id}-{self.core.id_random.getrandbits(64):016x}", "expires_in": 3599, "token_type": "Bearer"}

    def guest_poweroff(self, vm_key: int) -> bool:
        """The guest powers itself off (operation ``compute.instances.guestTerminate``); False if the VM is gone."""
        core = self.core
        with core.lock:
            instance = core.instances_by_id.get(vm_key)
            if instance is None:
                return False
            if instance.status == "RUNNING":
                operation = core.new_operation(
                    instance.project, instance.zone, "compute.instances.guestTerminate", instance.self_link(core.base_url), instance.id, user="system"
                )
                instance.stop_operations.append(operation)
                self.lifecycle.begin_power_off(instance, "terminate")
            return True

    def metadata_tree(self, vm_key: int) -> dict[str, Any] | None:
        """The VM's whole metadata tree (str leaves; ``Verbatim`` for user keys), or None once it is gone."""
        with self.core.lock:
            instance = self.core.instances_by_id.get(vm_key)
            if instance is None:
                return None
            number = project_number(instance.project)
            accounts = Verbatim()
            for index, account in enumerate(instance.service_accounts):
                entry = {"aliases": ["default"] if index == 0 else [], "email": account["email"], "scopes": list(account["scopes"])}
                if index == 0:
                    accounts["default"] = entry
                accounts[account["email"]] = entry
            scheduling = instance.scheduling
            return {
                "instance": {
                    "attributes": Verbatim((item["key"], item["value"]) for item in instance.metadata_items),
                    "cpu-platform": "Intel Broadwell",
                    "description": instance.description,
                    "hostname": instance.hostname or f"{instance.name}.{instance.zone}.c.{instance.project}.internal",
                    "id": instance.id,
                    "machine-type": f"projects/{number}/machineTypes/{instance.machine_type}",
                    "maintenance-event": "NONE",
                    "name": instance.name,
                    "network-interfaces": {
                        str(index): {"ip": interface["networkIP"], "network": f"projects/{number}/networks/{interface['network']}"}
                        for index, interface in enumerate(instance.network_interfaces)
                    },
                    "preempted": _flag(instance.preempted),
                    "scheduling": {
                        "automatic-restart": _flag(scheduling.get("automaticRestart")),
                        "on-host-maintenance": scheduling.get("onHostMaintenance"),
                        "preemptible": _flag(scheduling.get("preemptible")),
                        "provisioning-model": scheduling.get("provisioningModel"),
                    },
                    "service-accounts": accounts,
                    "tags": json.dumps(instance.tags),
                    "zone": f"projects/{number}/zones/{instance.zone}",
                },
                "project": {
                    "attributes": Verbatim((item["key"], item["value"]) for item in self.core.project_metadata_of(instance.project).items),
                    "numeric-project-id": number,
                    "project-id": instance.project,
                },
            }


def _flag(value: object) -> str:
    return "TRUE" if value else "FALSE"
