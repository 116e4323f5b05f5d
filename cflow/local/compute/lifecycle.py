"""A VM's life, as on GCE: boot, power-off, preemption, removal, and the emulator's own shutdown.

Instance states:

- insert / start: PROVISIONING -> STAGING -> RUNNING (``boot_delay_s`` split
  over the first two); the startup script starts on entering RUNNING, and the
  operation is DONE then. A startup script that exits leaves the VM RUNNING.
- stop, preemption, guest poweroff: STOPPING (shutdown script, SIGTERM,
  SIGKILL; see ``vm.PowerOff``) -> TERMINATED. Preemption sets
  ``instance/preempted`` TRUE first, ends with statusMessage "Instance was
  preempted." and records a ``compute.instances.preempted`` operation;
  ``instanceTerminationAction: DELETE`` deletes the VM instead.
- time limit (``scheduling.maxRunDuration`` from each start, or
  ``terminationTime``): on reaching it a running VM is stopped (STOP) or
  deleted (DELETE) as ``instanceTerminationAction`` says, its shutdown
  script running within the grace as for a preemption; a system ``stop``
  or ``delete`` operation records it. ``resourceStatus.scheduling.
  terminationTimestamp`` shows the deadline while the VM runs.
- delete: STOPPING -> gone (404).
- reset: stays RUNNING; every process is killed at once (no shutdown
  script) and the startup script runs again.
- slow VMs (``--slow-vms``): a VM the faults pick at boot is made slow
  (``vm.SlowGuests``) until its power-off begins; a reset keeps it slow.

Timed steps run on the core's TimerQueue and check the instance's ``epoch``,
so a step armed for an earlier boot does nothing. Slow work (waiting for
guest processes) happens on the PowerOff thread; copying an image into a
disk happens outside the lock.
"""

import functools
import logging
import os
from typing import Protocol

from cflow.local.compute import scheduling
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.disk_images import DiskImages
from cflow.local.compute.disks import Disks
from cflow.local.compute.images import Images
from cflow.local.compute.resources import Instance, Operation, rfc3339
from cflow.local.compute.vm import SERIAL_LOG_NAME, GuestLauncher, PowerOff, SlowGuests

logger = logging.getLogger(__name__)

STANDARD_GRACE_S = 90
INTERRUPTIBLE_GRACE_S = 30
REAP_INTERVAL_S = 1.0
SHUTDOWN_MARGIN_S = 15
BOOTING = ("PROVISIONING", "STAGING")
PREEMPTED_MESSAGE = "Instance was preempted."


class MetadataPorts(Protocol):
    """Opens and closes a VM's own metadata server (``metadata.MetadataServers``)."""

    def open(self, vm_key: int) -> int:
        """Starts listening for VM ``vm_key``; returns the port."""
        ...

    def close(self, vm_key: int) -> None:
        """Stops listening for VM ``vm_key``."""
        ...


class Lifecycle:
    """Moves instances through their states. Every method but the timer callbacks is called with the core's lock held.

    Args:
        core: the shared state.
        disks, images: what goes with a VM's disks when it is removed.
        launcher: prepares disk directories and starts startup scripts.
        power_off: runs shutdown scripts and stops a VM's processes.
        disk_images: copies a project image into a disk at first boot.
        metadata_ports: opens and closes each VM's metadata server.
        boot_delay_s: time spent in PROVISIONING + STAGING.
        shutdown_grace_s: overrides the grace period (30 s Spot, 90 s standard).
        metadata_host: the address VMs reach their metadata server on.
        slow_guests: runs the slow VMs' duty cycle (None: no VM is slow).
    """

    def __init__(
        self,
        core: ComputeCore,
        *,
        disks: Disks,
        images: Images,
        launcher: GuestLauncher,
        power_off: PowerOff,
        disk_images: DiskImages,
        metadata_ports: MetadataPorts,
        boot_delay_s: float = 0.0,
        shutdown_grace_s: float | None = None,
        metadata_host: str = "127.0.0.1",
        slow_guests: SlowGuests | None = None,
    ) -> None:
        self.core = core
        self.slow_guests = slow_guests
        self.disks = disks
        self.images = images
        self.launcher = launcher
        self.power_off = power_off
        self.disk_images = disk_images
        self.metadata_ports = metadata_ports
        self.boot_delay_s = boot_delay_s
        self.shutdown_grace_s = shutdown_grace_s
        self.metadata_host = metadata_host

    def grace_s(self, instance: Instance) -> float:
        """How long the VM's shutdown script may run."""
        if self.shutdown_grace_s is not None:
            return self.shutdown_grace_s
        return INTERRUPTIBLE_GRACE_S if instance.is_spot_or_preemptible else STANDARD_GRACE_S

    # Boot.

    def admit(self, instance: Instance) -> None:
        """A new VM (its disks attached) enters the tables, gets its metadata server, and starts booting."""
        instance.metadata_port = self.metadata_ports.open(instance.id)
        self.core.instances[instance.key] = instance
        self.core.instances_by_id[instance.id] = instance
        self.schedule_boot(instance)
        self.core.changed.notify_all()

    def schedule_boot(self, instance: Instance) -> None:
        """PROVISIONING -> STAGING after half the boot delay, then RUNNING after the other half."""
        self.core.timers.call_later(self.boot_delay_s / 2, self._boot_stage, instance.id, instance.epoch)

    def _boot_stage(self, instance_id: int, epoch: int) -> None:
        core = self.core
        with core.lock:
            instance = core.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "PROVISIONING":
                return
            instance.status = "STAGING"
            instance.touch()
            core.changed.notify_all()
        core.timers.call_later(self.boot_delay_s / 2, self._boot_run, instance_id, epoch)

    def _boot_run(self, instance_id: int, epoch: int) -> None:
        core = self.core
        with core.lock:
            instance = core.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "STAGING":
                return
            image_tree, instance.disk_image = instance.disk_image, None
            disk_dir = self.launcher.disk_dir(instance.name, instance.id)
        if image_tree is not None:
            # Outside the lock: copying a large image must not stall the API.
            self._initialise_disk(image_tree, disk_dir)
        with core.lock:
            instance = core.instances_by_id.get(instance_id)
            if instance is None or instance.epoch != epoch or instance.status != "STAGING":
                return
            guest = self.launcher.prepare_disk(instance.name, instance.id, f"{self.metadata_host}:{instance.metadata_port}")
            try:
                self.launcher.boot(guest, instance.metadata_value("startup-script"))
            except OSError as error:
                logger.warning("startup script of %s did not start: %s", instance.name, error)
                with open(guest.serial_log, "ab") as serial:
                    serial.write(f"cflow-emulator: startup-script failed to start: {error}\n".encode())
            instance.guest = guest
            if self.slow_guests is not None and core.faults.slow_vm():
                self.slow_guests.add(guest)
                logger.info("%s is slow: it gets 1/%g of the time (--slow-vms)", instance.name, self.slow_guests.factor)
                with open(guest.serial_log, "ab") as serial:
                    serial.write(f"cflow-emulator: this VM is slow: it gets 1/{self.slow_guests.factor:g} of the time (--slow-vms)\n".encode())
            instance.status = "RUNNING"
            instance.status_message = None
            started_s = core.wall_clock()
            instance.last_start_ts = rfc3339(started_s)
            self._arm_time_limit(instance, started_s)
            instance.touch()
            self.complete_boot_operations(instance)
            if instance.is_spot_or_preemptible:
                delay = core.faults.preemption_delay()
                if delay is not None:
                    core.timers.call_later(delay, self._preempt_due, instance.id, instance.epoch)
            core.changed.notify_all()

    def _initialise_disk(self, image_tree: str, disk_dir: str) -> None:
        try:
            self.disk_images.restore(image_tree, disk_dir)
        except OSError as error:
            logger.warning("disk %s was not initialised from its image: %s", disk_dir, error)
            os.makedirs(disk_dir, exist_ok=True)
            with open(os.path.join(disk_dir, SERIAL_LOG_NAME), "ab") as serial:
                serial.write(f"cflow-emulator: disk not initialised from its image: {error}\n".encode())

    def complete_boot_operations(self, instance: Instance) -> None:
        """The VM is RUNNING (or will never be): each operation waiting for its boot counts it done."""
        for operation in instance.boot_operations:
            operation.remaining -= 1
            if operation.remaining <= 0:
                self.core.finish_operation(operation)
        instance.boot_operations = []

    # Power-off.

    def begin_power_off(self, instance: Instance, after_stop: str, status_message: str | None = None) -> None:
        """STOPPING now; TERMINATED (``after_stop`` "terminate") or gone ("delete") once its processes are."""
        if instance.status in BOOTING:
            self.complete_boot_operations(instance)
        instance.epoch += 1
        instance.status = "STOPPING"
        instance.termination_ts = None
        instance.after_stop = after_stop
        instance.stop_status_message = status_message
        instance.touch()
        self.core.changed.notify_all()
        done = functools.partial(self._powered_off, instance.id)
        if instance.guest is not None and self.slow_guests is not None:
            self.slow_guests.release(instance.guest)  # its shutdown runs at full speed, and nothing is left stopped
        if instance.guest is None:
            self.core.timers.call_later(0, done)
        else:
            self.power_off.submit(instance.guest, instance.metadata_value("shutdown-script"), self.grace_s(instance), done)

    def _powered_off(self, instance_id: int) -> None:
        core = self.core
        with core.lock:
            instance = core.instances_by_id.get(instance_id)
            if instance is None:
                return
            instance.guest = None
            instance.last_stop_ts = core.now()
            for operation in instance.stop_operations:
                core.finish_operation(operation)
            instance.stop_operations = []
            if instance.after_stop == "delete":
                self.remove(instance)
            else:
                instance.status = "TERMINATED"
                instance.status_message = instance.stop_status_message
                instance.touch()
            core.changed.notify_all()

    def remove(self, instance: Instance) -> None:
        """The VM is gone: its operations finish, its disks detach (or go), its metadata server closes."""
        core = self.core
        instance.epoch += 1
        self.complete_boot_operations(instance)
        for operation in instance.stop_operations + instance.delete_operations:
            core.finish_operation(operation)
        instance.stop_operations = []
        instance.delete_operations = []
        core.instances.pop(instance.key, None)
        core.instances_by_id.pop(instance.id, None)
        self.disks.detach(instance)
        self.images.release_boot_content(instance)
        self.metadata_ports.close(instance.id)
        core.changed.notify_all()
        core.metadata_changed.notify_all()

    # Reset.

    def reset(self, instance: Instance, operation: Operation) -> None:
        """Hard reset of a RUNNING VM, as GCE's instances.reset: every process is killed at once (no
        shutdown script), then the startup script runs again; ``operation`` is DONE once it does.

        The VM stays RUNNING and keeps its epoch, so its preemption and time limit stand.
        """
        core = self.core
        epoch = instance.epoch
        guest, instance.guest = instance.guest, None
        # A slow host stays slow after a reset; its old processes run again only to be killed.
        slow_guests = self.slow_guests if guest is not None and self.slow_guests is not None and self.slow_guests.is_slow(guest) else None
        if slow_guests is not None and guest is not None:
            slow_guests.release(guest)

        def killed() -> None:
            with core.lock:
                current = core.instances_by_id.get(instance.id)
                # guest None: no other reset has booted it again meanwhile.
                if current is not None and current.epoch == epoch and current.status == "RUNNING" and current.guest is None and not core.closing:
                    fresh = self.launcher.prepare_disk(current.name, current.id, f"{self.metadata_host}:{current.metadata_port}")
                    try:
                        self.launcher.boot(fresh, current.metadata_value("startup-script"))
                    except OSError as error:
                        logger.warning("startup script of %s did not start after a reset: %s", current.name, error)
                    current.guest = fresh
                    if slow_guests is not None:
                        slow_guests.add(fresh)
                    current.touch()
                core.finish_operation(operation)

        if guest is None:
            core.timers.call_later(0, killed)
        else:
            self.power_off.submit(guest, None, 0, killed)

    # Preemption.

    def preempt(self, instance: Instance) -> None:
        """GCE takes the Spot VM back: ``preempted`` TRUE, a system operation, shutdown script, then stopped or deleted."""
        core = self.core
        instance.preempted = True
        instance.metadata_version += 1
        core.metadata_changed.notify_all()
        operation = core.new_operation(
            instance.project, instance.zone, "compute.instances.preempted", instance.self_link(core.base_url), instance.id, user="system"
        )
        operation.status_message = PREEMPTED_MESSAGE
        instance.stop_operations.append(operation)
        after = "delete" if instance.scheduling.get("instanceTerminationAction") == "DELETE" else "terminate"
        logger.info("preempting %s (then %s)", instance.name, after)
        self.begin_power_off(instance, after, PREEMPTED_MESSAGE)

    def _preempt_due(self, instance_id: int, epoch: int) -> None:
        with self.core.lock:
            instance = self.core.instances_by_id.get(instance_id)
            if instance is not None and instance.epoch == epoch and instance.status == "RUNNING" and not self.core.closing:
                self.preempt(instance)

    # Time limits (maxRunDuration, terminationTime).

    def _arm_time_limit(self, instance: Instance, started_s: float) -> None:
        deadline_s = scheduling.termination_deadline(instance.scheduling, started_s)
        instance.termination_ts = None if deadline_s is None else rfc3339(deadline_s)
        if deadline_s is not None:
            self.core.timers.call_later(deadline_s - self.core.wall_clock(), self._time_limit_due, instance.id, instance.epoch)

    def _time_limit_due(self, instance_id: int, epoch: int) -> None:
        with self.core.lock:
            instance = self.core.instances_by_id.get(instance_id)
            if instance is not None and instance.epoch == epoch and instance.status == "RUNNING" and not self.core.closing:
                self.end_at_time_limit(instance)

    def end_at_time_limit(self, instance: Instance) -> None:
        """The VM's time limit has come: GCE stops or deletes it, as ``instanceTerminationAction`` says."""
        core = self.core
        delete = instance.scheduling.get("instanceTerminationAction") == "DELETE"
        operation = core.new_operation(
            instance.project, instance.zone, "delete" if delete else "stop", instance.self_link(core.base_url), instance.id, user="system"
        )
        (instance.delete_operations if delete else instance.stop_operations).append(operation)
        logger.info("%s reached its time limit (then %s)", instance.name, "delete" if delete else "terminate")
        self.begin_power_off(instance, "delete" if delete else "terminate")

    # The reaper: exit statuses of startup scripts, and empty process groups.

    def start_reaper(self) -> None:
        """Reaps exited startup scripts every ``REAP_INTERVAL_S`` (call without the lock)."""
        self.core.timers.call_later(REAP_INTERVAL_S, self._reap)

    def _reap(self) -> None:
        with self.core.lock:
            if self.core.closing:
                return
            guests = [instance.guest for instance in self.core.instances.values() if instance.status == "RUNNING" and instance.guest is not None]
        for guest in guests:
            try:
                self.launcher.reap(guest)
            except OSError:
                logger.exception("reaping %s failed", guest.disk_dir)
        self.core.timers.call_later(REAP_INTERVAL_S, self._reap)

    # Emulator shutdown.

    def shutdown(self) -> None:
        """Powers every VM off in parallel (shutdown scripts, grace, kill); returns when all are down (call without the lock)."""
        core = self.core
        with core.lock:
            core.closing = True
            longest_grace: float = 0
            for instance in list(core.instances.values()):
                if instance.status == "RUNNING":
                    longest_grace = max(longest_grace, self.grace_s(instance))
                    self.begin_power_off(instance, "terminate")
                elif instance.status in BOOTING:
                    self.begin_power_off(instance, "terminate")
                elif instance.status == "STOPPING":
                    longest_grace = max(longest_grace, self.grace_s(instance))
            all_down = core.changed.wait_for(
                lambda: all(instance.status != "STOPPING" and instance.guest is None for instance in core.instances.values()),
                longest_grace + SHUTDOWN_MARGIN_S,
            )
            core.metadata_changed.notify_all()
            core.changed.notify_all()
        if not all_down:
            logger.warning("some emulated VMs did not power off in time; the watchdog will kill them")
