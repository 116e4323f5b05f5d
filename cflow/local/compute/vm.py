"""Emulated VMs as local process groups: boot, shutdown, and no orphans.

A booted VM is its metadata ``startup-script`` running in a process group of
its own (``process_group=0``: a new group in the emulator's session, so the
VM's ``shutdown-script`` can later join that very group with
``Popen(process_group=pgid)``, which the kernel refuses across sessions).
Every VM process also carries ``CFLOW_VM_MARKER=<emulator token>-<instance id>``
in its environment; that finds the children that left the group (setsid).

By default a VM shares the host's filesystem (its disk is a directory, see
``GuestLauncher.prepare_disk``). With a ``guest_root.GuestRoots`` it runs on
a real root instead: the group's leader is then the VM's namespace holder,
and every script enters that namespace (see ``guest_root``).

A script's stdout and stderr go through a pipe to the ``console.SerialConsole``,
which writes each line to the VM's serial log as GCE's script runner does.

Powering a VM off (stop, delete, preemption, guest poweroff, emulator exit):
shutdown script within the grace period, SIGTERM to the group and marked
processes, SIGKILL to whatever is left. ``PowerOff`` runs all of them in
parallel from one thread. ``Watchdog`` covers the emulator dying without
doing any of this (SIGKILL): it kills every VM process when its pipe closes.

Slow VMs (``--slow-vms``, ``SlowGuests``): each second, a slow guest's
processes run for 1/X of it and are stopped (SIGSTOP) for the rest. A guest
is let go (SIGCONT) as its power-off begins and when the emulator stops, so
nothing is left stopped; SIGKILL (the watchdog's) ends stopped processes too.
"""

import logging
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping

from cflow import procinfo
from cflow.local.compute import guest_root
from cflow.local.compute.console import ScriptOutput, SerialConsole

logger = logging.getLogger(__name__)

MARKER_NAME = "CFLOW_VM_MARKER"
SERIAL_LOG_NAME = "serial-port-1.log"
STARTUP_SCRIPT_NAME = "startup-script"
SHUTDOWN_SCRIPT_NAME = "shutdown-script"
POWEROFF_SHIM_PATH = os.path.join("bin", "poweroff")
# What the emulator itself writes into a disk directory (paths relative to
# it); every boot writes them anew, so they are no part of a disk's content.
BOOKKEEPING_PATHS = (SERIAL_LOG_NAME, STARTUP_SCRIPT_NAME, SHUTDOWN_SCRIPT_NAME, POWEROFF_SHIM_PATH, *guest_root.BOOKKEEPING_PATHS)
# How long a VM's root may take to mount (the holder says when it is done).
ROOT_MOUNT_TIMEOUT_S = 30.0
# Variables a VM inherits from the emulator's environment; everything else of
# the host (credentials above all) stays out, as on a fresh GCE VM.
INHERITED_VARIABLES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "SHELL", "PYTHONPATH", "VIRTUAL_ENV", "TERM")

_POWEROFF_SHIM = """#!{python} -I
# Powers this emulated VM off, as `poweroff` does on GCE: the Compute emulator
# runs the shutdown-script, then stops every process of the VM (TERMINATED).
import sys
import urllib.request

request = urllib.request.Request(
    "http://{metadata_host}/cflow-emulator/v1/poweroff",
    data=b"",
    method="POST",
    headers={{"Metadata-Flavor": "Google"}},
)
try:
    urllib.request.build_opener(urllib.request.ProxyHandler({{}})).open(request, timeout=30).read()
except OSError as error:
    sys.exit("poweroff: cannot reach the metadata server: %s" % error)
"""


class Guest:
    """The live processes of one booted VM.

    Attributes:
        marker: value of ``CFLOW_VM_MARKER`` in every process of this boot.
        name: the VM's name (its hostname on the serial console).
        leader: Popen of the startup script, or None when there is none.
        holder: on a real root, Popen of the process that holds the VM's mount namespace; else None.
        process_groups: pgids that belong to this VM.
        shutdown: Popen of the shutdown script while it runs, else None.
        startup_output, shutdown_output: the scripts' pipes to the serial console.
    """

    __slots__ = (
        "disk_dir", "environment", "holder", "leader", "marker", "name", "process_groups", "serial_log", "shutdown",
        "shutdown_output", "startup_output",
    )  # fmt: skip

    def __init__(self, marker: str, disk_dir: str, environment: dict[str, str], serial_log: str, name: str = "") -> None:
        self.marker = marker
        self.name = name
        self.disk_dir = disk_dir
        self.environment = environment
        self.serial_log = serial_log
        self.leader: subprocess.Popen[bytes] | None = None
        self.holder: subprocess.Popen[bytes] | None = None
        self.process_groups: set[int] = set()
        self.shutdown: subprocess.Popen[bytes] | None = None
        self.startup_output: ScriptOutput | None = None
        self.shutdown_output: ScriptOutput | None = None

    def processes_reaped(self) -> bool:
        """True once the startup and shutdown script processes (and the namespace holder) have exited (and are reaped)."""
        return all(process.poll() is not None for process in (self.leader, self.shutdown, self.holder) if process is not None)


class ProcessScan:
    """One look at /proc: marked processes and live members of process groups.

    Attributes:
        marked: {marker value: [pid, ...]} of live processes carrying the marker.
        group_members: {pgid: number of live (non-zombie) processes}.
    """

    __slots__ = ("group_members", "marked")

    def __init__(self, marked: dict[str, list[int]], group_members: dict[int, int]) -> None:
        self.marked = marked
        self.group_members = group_members


class ProcessTable:
    """Finds processes by the marker variable in /proc/PID/environ."""

    def __init__(self, marker_prefix: str) -> None:
        self._needle = f"\0{MARKER_NAME}={marker_prefix}".encode()

    def scan(self) -> ProcessScan:
        """Returns a ProcessScan. Zombies are left out: they hold no resources and
        whoever inherited them (possibly a slow init) reaps them in its own time."""
        marked: dict[str, list[int]] = {}
        group_members: dict[int, int] = {}
        own_pid = os.getpid()
        for pid, process_stat in procinfo.iter_processes():
            if pid == own_pid or not procinfo.is_alive(process_stat):
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as environ_file:
                    environ = b"\0" + environ_file.read()
            except OSError:
                continue
            group_members[process_stat.pgid] = group_members.get(process_stat.pgid, 0) + 1
            start = environ.find(self._needle)
            if start < 0:
                continue
            value_start = start + len(MARKER_NAME) + 2
            value_end = environ.find(b"\0", value_start)
            value = environ[value_start : value_end if value_end >= 0 else None].decode(errors="replace")
            marked.setdefault(value, []).append(pid)
        return ProcessScan(marked, group_members)


class Watchdog:
    """A small child process that kills every VM process if the emulator dies.

    Args:
        marker_prefix: this emulator's marker prefix (``<token>-``).

    ``track``/``forget`` tell it which process groups exist; closing the pipe
    (``close()``, or the emulator's death) triggers its cleanup.
    """

    def __init__(self, marker_prefix: str) -> None:
        self._marker_prefix = marker_prefix
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Starts the watchdog process."""
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "watchdog.py")
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", script, MARKER_NAME, self._marker_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    @property
    def pid(self) -> int | None:
        """The watchdog's pid (None before ``start``)."""
        return self._process.pid if self._process else None

    def _send(self, line: str) -> None:
        with self._lock:
            stdin = self._process.stdin if self._process is not None else None
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(line + "\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):
                logger.warning("compute emulator watchdog is gone; VM processes may outlive a crash")

    def track(self, pgid: int) -> None:
        """The watchdog kills process group ``pgid`` if the emulator dies."""
        self._send(f"track {pgid}")

    def forget(self, pgid: int) -> None:
        """Process group ``pgid`` is gone; the watchdog leaves it alone."""
        self._send(f"forget {pgid}")

    def close(self, timeout_s: float = 15) -> None:
        """Closes the pipe and waits for the watchdog's cleanup to finish."""
        with self._lock:
            if self._process is None:
                return
            if self._process.stdin is not None and not self._process.stdin.closed:
                self._process.stdin.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("compute emulator watchdog did not exit in %ss", timeout_s)


class GuestLauncher:
    """Creates VM disks and starts their scripts.

    Args:
        state_dir: VM disks live in ``state_dir/vms/NAME-ID/``.
        marker_prefix: this emulator's marker prefix (``<token>-``).
        base_environment: variables every VM gets (emulator hosts, endpoint...).
        watchdog: told about every process group started.
        console: takes every script's output to the VM's serial log.
        host_environment: where the inherited variables come from (default ``os.environ``).
        root: runs VMs on a real root (``--vm-root``); None shares the host's filesystem.
    """

    def __init__(
        self,
        state_dir: str,
        marker_prefix: str,
        base_environment: Mapping[str, str],
        watchdog: Watchdog,
        console: SerialConsole,
        host_environment: Mapping[str, str] | None = None,
        root: guest_root.GuestRoots | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.marker_prefix = marker_prefix
        self.watchdog = watchdog
        self.console = console
        self.root = root
        self.service_environment = dict(base_environment)
        host_environment = os.environ if host_environment is None else host_environment
        self.base_environment = {name: host_environment[name] for name in INHERITED_VARIABLES if name in host_environment}
        self.base_environment.update(base_environment)

    def disk_dir(self, name: str, instance_id: int) -> str:
        """Where VM ``name`` (id ``instance_id``) has its disk: ``STATE_DIR/vms/NAME-ID``."""
        return os.path.join(self.state_dir, "vms", f"{name}-{instance_id}")

    def prepare_disk(self, name: str, instance_id: int, metadata_host: str) -> Guest:
        """Makes the VM's disk ready for a boot; returns a Guest.

        Sharing the host's filesystem: the disk dir gets home, tmp, and bin with the
        poweroff shim, and the environment points there. On a real root: see
        ``guest_root.GuestRoots.prepare`` (``metadata_host`` is then unused: the VM
        reaches metadata.google.internal).

        Raises:
            OSError: the disk cannot be laid out.
        """
        disk_dir = self.disk_dir(name, instance_id)
        marker = f"{self.marker_prefix}{instance_id}"
        if self.root is not None:
            os.makedirs(disk_dir, exist_ok=True)
            environment = self.root.prepare(disk_dir, name, instance_id, self.service_environment)
            environment[MARKER_NAME] = marker
            return Guest(marker, disk_dir, environment, os.path.join(disk_dir, SERIAL_LOG_NAME), name)
        home, tmp, bin_dir = (os.path.join(disk_dir, part) for part in ("home", "tmp", "bin"))
        for path in (home, tmp, bin_dir):
            os.makedirs(path, exist_ok=True)
        shim = os.path.join(disk_dir, POWEROFF_SHIM_PATH)
        with open(shim, "w") as shim_file:
            shim_file.write(_POWEROFF_SHIM.format(python=sys.executable, metadata_host=metadata_host))
        os.chmod(shim, 0o755)
        environment = dict(self.base_environment)
        environment.update(
            HOME=home,
            TMPDIR=tmp,
            PATH=bin_dir + os.pathsep + self.base_environment.get("PATH", os.defpath),
            GCE_METADATA_HOST=metadata_host,
            GCE_METADATA_IP=metadata_host,
            CFLOW_EMULATED_VM="1",
            # VMs share the host's filesystem: a guest's absolute path /X is $CFLOW_VM_ROOT/X.
            CFLOW_VM_ROOT=disk_dir,
        )
        environment[MARKER_NAME] = marker
        return Guest(marker, disk_dir, environment, os.path.join(disk_dir, SERIAL_LOG_NAME), name)

    def _script_command(self, guest: Guest, script_name: str, content: str) -> list[str]:
        path = os.path.join(guest.disk_dir, script_name)
        with open(path, "w") as script_file:
            script_file.write(content)
        if self.root is not None:
            assert guest.holder is not None, "_holder_group starts the holder before a script runs"
            return self.root.script_command(guest.holder.pid, guest.disk_dir, path, script_name)
        if content.startswith("#!"):
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
            return [path]
        return ["bash", path]

    def _spawn(self, guest: Guest, script_name: str, content: str, process_group: int) -> "tuple[subprocess.Popen[bytes], ScriptOutput]":
        command = self._script_command(guest, script_name, content)
        write_fd, output = self.console.open_script(guest.serial_log, guest.name, script_name)
        try:
            process = subprocess.Popen(
                command,
                cwd=guest.disk_dir,
                env=guest.environment,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=subprocess.STDOUT,
                process_group=process_group,
            )
        except BaseException:
            self.console.abandon(output)
            raise
        finally:
            os.close(write_fd)
        self.console.attach(output, process.pid)
        return process, output

    def _holder_group(self, guest: Guest) -> int:
        """On a real root: the pgid of the VM's namespace holder, starting it (and waiting for its mounts) if needed.

        Raises:
            OSError: the root could not be mounted (the reason is on the serial console).
        """
        assert self.root is not None
        if guest.holder is not None and guest.holder.poll() is None:
            return guest.holder.pid
        with open(guest.serial_log, "ab") as serial:
            holder = subprocess.Popen(
                self.root.holder_command(guest.disk_dir, guest.name),
                cwd=guest.disk_dir,
                env=guest.environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=serial,
                process_group=0,
            )
        guest.holder = holder
        guest.process_groups.add(holder.pid)
        self.watchdog.track(holder.pid)
        assert holder.stdout is not None
        with holder.stdout:
            ready = _read_line(holder.stdout.fileno(), ROOT_MOUNT_TIMEOUT_S) == guest_root.READY_LINE
        if not ready:
            _kill_group(holder.pid)
            holder.wait()
            raise OSError("the VM's root could not be mounted (the reason is above on its serial console)")
        return holder.pid

    def boot(self, guest: Guest, startup_script: str | None) -> None:
        """Starts the startup script (if any) in a new process group of the VM (on a real root: in the holder's).

        Raises:
            OSError: the script (or the VM's root) could not be started.
        """
        if not startup_script:
            return
        if self.root is not None:
            guest.leader, guest.startup_output = self._spawn(guest, STARTUP_SCRIPT_NAME, startup_script, process_group=self._holder_group(guest))
            return
        guest.leader, guest.startup_output = self._spawn(guest, STARTUP_SCRIPT_NAME, startup_script, process_group=0)
        guest.process_groups.add(guest.leader.pid)
        self.watchdog.track(guest.leader.pid)

    def start_shutdown_script(self, guest: Guest, shutdown_script: str | None) -> None:
        """Starts the shutdown script in the VM's process group (a new one if that is gone)."""
        if not shutdown_script:
            return
        if self.root is not None:
            guest.shutdown, guest.shutdown_output = self._spawn(guest, SHUTDOWN_SCRIPT_NAME, shutdown_script, process_group=self._holder_group(guest))
            return
        if guest.leader is not None and guest.leader.poll() is None:
            try:
                guest.shutdown, guest.shutdown_output = self._spawn(guest, SHUTDOWN_SCRIPT_NAME, shutdown_script, process_group=guest.leader.pid)
                return
            except (OSError, subprocess.SubprocessError):
                logger.debug("cannot join process group %s; starting the shutdown script in its own", guest.leader.pid)
        guest.shutdown, guest.shutdown_output = self._spawn(guest, SHUTDOWN_SCRIPT_NAME, shutdown_script, process_group=0)
        guest.process_groups.add(guest.shutdown.pid)
        self.watchdog.track(guest.shutdown.pid)

    def reap(self, guest: Guest) -> int | None:
        """Reaps exited scripts and forgets process groups that are now empty.

        Returns the startup script's exit status the first time it is seen, else None.
        The serial console shows it after the script's last line.
        """
        if guest.leader is None or guest.leader.returncode is not None:
            return None
        status = guest.leader.poll()
        if status is None:
            return None
        # On a real root the group is the holder's, which lives as long as the VM.
        if self.root is None and not _group_alive(guest.leader.pid):
            guest.process_groups.discard(guest.leader.pid)
            self.watchdog.forget(guest.leader.pid)
        if guest.startup_output is not None:
            self.console.finish(guest.startup_output, status)
        return status

    def powered_off(self, guest: Guest) -> None:
        """Every process of the VM is gone: the serial console shows how the shutdown script ended."""
        if guest.shutdown is not None and guest.shutdown_output is not None and guest.shutdown.returncode is not None:
            self.console.finish(guest.shutdown_output, guest.shutdown.returncode)


def _read_line(fd: int, timeout_s: float) -> bytes | None:
    """The first line read from ``fd`` (without its newline), or None at end of file or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            data += chunk
    return data.split(b"\n", 1)[0]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_guest(guest: Guest, signal_number: int, marked_pids: list[int]) -> None:
    for pgid in list(guest.process_groups):
        try:
            os.killpg(pgid, signal_number)
        except ProcessLookupError:
            pass
    for pid in marked_pids:
        try:
            os.kill(pid, signal_number)
        except ProcessLookupError:
            pass


class _PowerOffJob:
    __slots__ = ("deadline", "grace_s", "guest", "on_done", "phase", "shutdown_script", "term_deadline")

    def __init__(self, guest: Guest, shutdown_script: str | None, grace_s: float, on_done: Callable[[], None]) -> None:
        self.guest = guest
        self.shutdown_script = shutdown_script
        self.grace_s = grace_s
        self.on_done = on_done
        self.phase = "new"
        self.deadline = 0.0  # set when the job starts
        self.term_deadline = 0.0


class PowerOff:
    """Powers guests off in parallel from one thread.

    For each submitted guest: run its shutdown script (with the guest's
    environment, in its process group) until it exits or ``grace_s`` passes;
    SIGTERM the process groups and marked processes; once they are gone or at
    ``max(grace deadline, SIGTERM + term_wait_s)``, SIGKILL what is left. Then
    call ``on_done()`` (on this class's thread; keep it short).

    Args:
        launcher: the GuestLauncher (starts shutdown scripts).
        process_table: a ProcessTable for marked processes.
        monotonic: clock function.
    """

    def __init__(
        self, launcher: GuestLauncher, process_table: ProcessTable, monotonic: Callable[[], float], poll_interval_s: float = 0.05, term_wait_s: float = 1.0
    ) -> None:
        self._launcher = launcher
        self._process_table = process_table
        self._monotonic = monotonic
        self._poll_interval_s = poll_interval_s
        self._term_wait_s = term_wait_s
        self._jobs: list[_PowerOffJob] = []
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="compute-poweroff", daemon=True)

    def start(self) -> None:
        """Starts the power-off thread."""
        self._thread.start()

    def submit(self, guest: Guest, shutdown_script: str | None, grace_s: float, on_done: Callable[[], None]) -> None:
        """Queues one guest for power-off; returns at once."""
        with self._wakeup:
            self._jobs.append(_PowerOffJob(guest, shutdown_script, grace_s, on_done))
            self._wakeup.notify()

    def pending(self) -> int:
        """How many guests are being powered off."""
        with self._wakeup:
            return len(self._jobs)

    def stop(self) -> None:
        """Stops the thread (guests still being powered off are left as they are)."""
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._jobs and not self._stopped:
                    self._wakeup.wait()
                if self._stopped:
                    return
                jobs = list(self._jobs)
            finished = self._advance(jobs)
            if finished:
                with self._wakeup:
                    self._jobs = [job for job in self._jobs if job not in finished]
                for job in finished:
                    try:
                        job.on_done()
                    except Exception:
                        logger.exception("power-off completion failed")
            with self._wakeup:
                if self._jobs and not self._stopped:
                    self._wakeup.wait(self._poll_interval_s)

    def _advance(self, jobs: list[_PowerOffJob]) -> list[_PowerOffJob]:
        now = self._monotonic()
        for job in jobs:
            if job.phase == "new":
                job.deadline = now + job.grace_s
                job.phase = "script"
                try:
                    self._launcher.start_shutdown_script(job.guest, job.shutdown_script)
                except OSError:
                    logger.exception("cannot start the shutdown script of %s", job.guest.disk_dir)
        needs_scan = any(job.phase != "script" or job.guest.shutdown is None or job.guest.shutdown.poll() is not None or now >= job.deadline for job in jobs)
        scan = self._process_table.scan() if needs_scan else ProcessScan({}, {})
        finished = []
        for job in jobs:
            guest = job.guest
            pids = scan.marked.get(guest.marker, [])
            if job.phase == "script":
                if guest.shutdown is not None and guest.shutdown.poll() is None and now < job.deadline:
                    continue
                _signal_guest(guest, signal.SIGTERM, pids)
                job.phase = "term"
                job.term_deadline = max(job.deadline, now + self._term_wait_s)
                continue
            if self._gone(guest, pids, scan):
                finished.append(job)
                for pgid in list(guest.process_groups):
                    self._launcher.watchdog.forget(pgid)
                guest.process_groups.clear()
                self._launcher.powered_off(guest)
            elif job.phase == "kill" or now >= job.term_deadline:
                _signal_guest(guest, signal.SIGKILL, pids)
                job.phase = "kill"
        return finished

    @staticmethod
    def _gone(guest: Guest, marked_pids: list[int], scan: ProcessScan) -> bool:
        if not guest.processes_reaped() or marked_pids:
            return False
        return not any(scan.group_members.get(pgid) for pgid in guest.process_groups)


class SlowGuests:
    """Gives the processes of some guests only 1/``factor`` of the time, from one thread.

    Every ``period_s``: SIGCONT lets each slow guest's processes run for
    ``period_s / factor``, then SIGSTOP stops them for the rest of the period.
    A /proc scan before each finds them: the guest's process groups and every
    process carrying its marker (the task a worker starts in a session of its
    own too). A pause stops the process groups first, then scans: a process
    forked just before the stop and gone to a session of its own is found
    then, instead of running a whole period at full speed.

    Args:
        process_table: a ProcessTable for marked processes.
        factor: the slow-down, at least 1 (5: a fifth of the time).
        monotonic: clock function.
        period_s: the duty cycle's length.
    """

    def __init__(self, process_table: ProcessTable, factor: float, monotonic: Callable[[], float] = time.monotonic, period_s: float = 1.0) -> None:
        self._process_table = process_table
        self.factor = max(1.0, factor)
        self._monotonic = monotonic
        self._period_s = period_s
        self._guests: dict[str, Guest] = {}  # marker -> guest
        # Held while signalling: once release() returns, its guest is never stopped again.
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compute-slow-vms", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, guest: Guest) -> None:
        """``guest`` is slow from now on: paused at once, it runs in each period's share from the next one on.

        Paused here, not at the duty cycle's next pause: that can be up to a
        period away, and a VM slow from its boot must not start at full speed.
        """
        with self._lock:
            self._guests[guest.marker] = guest
            self._pause([guest])

    def release(self, guest: Guest) -> None:
        """``guest`` runs at full speed again, at once (its power-off begins)."""
        with self._lock:
            if self._guests.pop(guest.marker, None) is None:
                return
            _signal_guest(guest, signal.SIGCONT, self._process_table.scan().marked.get(guest.marker, []))

    def is_slow(self, guest: Guest) -> bool:
        with self._lock:
            return guest.marker in self._guests

    def stop(self) -> None:
        """Stop the duty cycle and let every slow guest run (the emulator stops)."""
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            guests, self._guests = list(self._guests.values()), {}
            if guests:
                scan = self._process_table.scan()
                for guest in guests:
                    _signal_guest(guest, signal.SIGCONT, scan.marked.get(guest.marker, []))

    def _signal_all(self, signal_number: int, scan: ProcessScan) -> None:
        with self._lock:
            for guest in self._guests.values():
                _signal_guest(guest, signal_number, scan.marked.get(guest.marker, []))

    def _pause(self, guests: list[Guest]) -> None:
        """SIGSTOP every process of ``guests``. Call with the lock held."""
        for guest in guests:
            _signal_guest(guest, signal.SIGSTOP, [])  # the groups first: their members fork no more
        scan = self._process_table.scan()
        for guest in guests:
            _signal_guest(guest, signal.SIGSTOP, scan.marked.get(guest.marker, []))

    def _run(self) -> None:
        while not self._stopped.is_set():
            started = self._monotonic()
            with self._lock:
                any_slow = bool(self._guests)
            if any_slow:
                self._signal_all(signal.SIGCONT, self._process_table.scan())
                if self._stopped.wait(self._period_s / self.factor):
                    return
                # Scanned again: a task started while the guest ran (in a session of its own) is stopped too.
                with self._lock:
                    self._pause(list(self._guests.values()))
            self._stopped.wait(max(0.0, started + self._period_s - self._monotonic()))
