"""The Compute Engine control plane: one ``ComputeCore`` and a part per resource, wired together.

Where each behaviour lives:

- ``core``: the lock, ids, timestamps, the shared tables, making and finishing operations;
- ``instances``: instances.* (insert, bulkInsert, list, stop, start, ...);
- ``lifecycle``: the VM state machine (boot, power-off, preemption, removal, the emulator's shutdown);
- ``disks``, ``images``, ``operations``, ``zones``, ``projects``: those resources' API;
- ``networks`` (networks, subnetworks, VMs' interfaces and addresses), ``regions``,
  ``accelerators`` (accelerator types, GPU rules), ``quotas``, ``policy`` (organization policy);
- ``guest_metadata``: what each VM's metadata server answers;
- ``server``: the HTTP routes onto these parts.

To add a resource: write its part (a class over ``ComputeCore``), build it
here, and give it a route table in ``server``.
"""

import random

from cflow.local.compute.accelerators import AcceleratorTypes
from cflow.local.compute.catalog import Catalog
from cflow.local.compute.core import ComputeCore, WallClock
from cflow.local.compute.disk_images import DiskImages
from cflow.local.compute.disks import Disks
from cflow.local.compute.faults import Faults
from cflow.local.compute.guest_metadata import GuestMetadata
from cflow.local.compute.images import Images
from cflow.local.compute.instances import Instances
from cflow.local.compute.lifecycle import Lifecycle, MetadataPorts
from cflow.local.compute.networks import Networks
from cflow.local.compute.operations import Operations
from cflow.local.compute.policy import OrganizationPolicy
from cflow.local.compute.projects import Projects, project_usage_counters
from cflow.local.compute.quotas import QuotaLimits, Quotas
from cflow.local.compute.regions import Regions
from cflow.local.compute.timers import TimerQueue
from cflow.local.compute.vm import GuestLauncher, PowerOff, SlowGuests
from cflow.local.compute.zones import Zones


class ComputeEngine:
    """Instances, disks, images, operations, zones, regions, networks and accelerator types of any number of projects.

    Args:
        base_url: ``http://H:P/compute/v1/`` (selfLinks point here).
        catalog: a Catalog (zones, machine types, images).
        faults: a Faults.
        launcher: a vm.GuestLauncher.
        power_off: a vm.PowerOff.
        disk_images: a disk_images.DiskImages (image content on the host).
        metadata_ports: opens and closes each VM's metadata server.
        timers: a timers.TimerQueue.
        wall_clock: ``time.time``-like (timestamps).
        id_random: a ``random.Random`` for resource ids.
        boot_delay_s: time spent in PROVISIONING + STAGING.
        shutdown_grace_s: overrides the grace period (30 s Spot, 90 s standard).
        metadata_host: the address VMs reach their metadata server on.
        refuse_not_ready: delete and stop of a booting or stopping VM are 400
            resourceNotReady, as on GCE (False: accepted).
        quota_limits: the quotas' limits (None: every metric generous).
        policy: the organization policy (None: no constraint).
        default_network: every project has the ``default`` auto network.
        slow_guests: runs the slow VMs' duty cycle (None: no VM is slow).

    Attributes:
        core, zones, instances, disks, images, operations, networks, regions, accelerators, projects: the parts
            (``server`` routes onto them).
        quotas: usage and limits (``regions`` and ``projects.get`` report them).
        lifecycle: the VM state machine.
        guest_metadata: the ``metadata.MetadataSource`` of every VM's metadata server.
    """

    def __init__(
        self,
        *,
        base_url: str,
        catalog: Catalog,
        faults: Faults,
        launcher: GuestLauncher,
        power_off: PowerOff,
        disk_images: DiskImages,
        metadata_ports: MetadataPorts,
        timers: TimerQueue,
        wall_clock: WallClock,
        id_random: random.Random,
        boot_delay_s: float = 0.0,
        shutdown_grace_s: float | None = None,
        metadata_host: str = "127.0.0.1",
        refuse_not_ready: bool = True,
        quota_limits: QuotaLimits | None = None,
        policy: OrganizationPolicy | None = None,
        default_network: bool = True,
        slow_guests: SlowGuests | None = None,
    ) -> None:
        self.core = ComputeCore(base_url=base_url, catalog=catalog, faults=faults, timers=timers, wall_clock=wall_clock, id_random=id_random)
        self.zones = Zones(base_url, catalog)
        self.networks = Networks(self.core, default_network)
        self.accelerators = AcceleratorTypes(base_url, catalog)
        self.quotas = Quotas(self.core, quota_limits or QuotaLimits())
        self.regions = Regions(self.core, self.quotas)
        self.policy = policy or OrganizationPolicy()
        self.operations = Operations(self.core)
        self.disks = Disks(self.core, launcher)
        self.images = Images(self.core, self.disks, disk_images)
        self.lifecycle = Lifecycle(
            self.core,
            disks=self.disks,
            images=self.images,
            launcher=launcher,
            power_off=power_off,
            disk_images=disk_images,
            metadata_ports=metadata_ports,
            boot_delay_s=boot_delay_s,
            shutdown_grace_s=shutdown_grace_s,
            metadata_host=metadata_host,
            slow_guests=slow_guests,
        )
        self.instances = Instances(
            self.core,
            self.disks,
            self.images,
            self.lifecycle,
            launcher,
            networks=self.networks,
            accelerators=self.accelerators,
            quotas=self.quotas,
            policy=self.policy,
            refuse_not_ready=refuse_not_ready,
        )
        self.guest_metadata = GuestMetadata(self.core, self.lifecycle)
        self.projects = Projects(self.core, self.quotas, usage_counters=project_usage_counters(self.core, self.networks))

    def start(self) -> None:
        """Starts the engine's own timed work (the reaper of exited startup scripts)."""
        self.lifecycle.start_reaper()

    def shutdown(self) -> None:
        """Powers every VM off in parallel (shutdown scripts, grace, kill); returns when all are down."""
        self.lifecycle.shutdown()
