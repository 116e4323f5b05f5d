"""Each VM's serial console: what its startup and shutdown scripts print, shown as GCE shows it.

On GCE the guest agent's script runner (``google_metadata_script_runner``)
runs a metadata script with a pipe on its stdout and stderr and logs every
line it reads as ``startup-script: LINE``; on a Debian image the journal
forwards that to the serial console, where ``gcloud compute instances
get-serial-port-output`` reads::

    Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: Starting startup scripts (version 20240213.00).
    Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: Found startup-script in metadata.
    Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: startup-script: hello
    Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: startup-script exit status 0
    Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: Finished running startup scripts.

A script that fails ends with ``Script "startup-script" failed with error:
exit status N`` instead (``signal: killed`` for a killed one). The runner
logs the exit status only once the pipe is closed, after every process that
held it is gone, and so does this module.

``SerialConsole`` plays the runner for every VM of the emulator from one
thread: ``open_script`` writes the runner's opening lines and gives the pipe
to hand to the script as stdout and stderr; the thread reads every VM's pipe
and appends the prefixed lines to that VM's serial log; ``finish`` records
the script's exit status, written after its last line.
"""

import dataclasses
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

RUNNER = "google_metadata_script_runner"
RUNNER_VERSION = "cflow-emulator"
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
READ_SIZE = 65536
# Longer lines are cut into pieces of this size (the pipe must keep flowing).
MAX_LINE_BYTES = 65536


def runner_prefix(moment: float, hostname: str, runner_pid: int) -> bytes:
    """``Mmm dd HH:MM:SS HOST google_metadata_script_runner[PID]: `` in UTC, as a GCE VM's console shows a journal line."""
    parts = time.gmtime(moment)
    stamp = f"{MONTHS[parts.tm_mon - 1]} {parts.tm_mday:2d} {parts.tm_hour:02d}:{parts.tm_min:02d}:{parts.tm_sec:02d}"
    return f"{stamp} {hostname} {RUNNER}[{runner_pid}]: ".encode()


def exit_message(script_name: str, status: int) -> str:
    """What the runner logs when a script ends: ``startup-script exit status 0`` or ``Script "startup-script" failed with error: ...``."""
    if status == 0:
        return f"{script_name} exit status 0"
    if status < 0:
        try:
            described = f"signal: {(signal.strsignal(-status) or str(-status)).lower()}"
        except ValueError:
            described = f"signal: {-status}"
    else:
        described = f"exit status {status}"
    return f'Script "{script_name}" failed with error: {described}'


def phase_of(script_name: str) -> str:
    """``startup`` for ``startup-script``, ``shutdown`` for ``shutdown-script`` (the runner's own argument)."""
    return script_name.removesuffix("-script")


@dataclasses.dataclass(eq=False)
class ScriptOutput:
    """One script's pipe and where its lines go.

    Attributes:
        serial_log: the VM's serial log (appended to).
        hostname: the VM's name, as its journal lines show it.
        runner_pid: the pid shown in ``google_metadata_script_runner[PID]``.
        script_name: ``startup-script`` or ``shutdown-script``.
        closed: True once the pipe reached end of file.
        exit_status: set by ``finish``; written once the pipe is closed.
    """

    serial_log: str
    hostname: str
    runner_pid: int
    script_name: str
    read_fd: int = -1
    pending: bytes = b""
    closed: bool = False
    exit_status: int | None = None
    exit_written: bool = False


class SerialConsole:
    """Copies every VM script's output to its VM's serial log, one prefixed line at a time.

    Args:
        wall_clock: ``time.time``-like, for the lines' time stamps.

    ``start()`` before the first ``open_script``; ``stop()`` closes every pipe
    still open (scripts still writing then get EPIPE, as on a VM whose
    console went away).
    """

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._to_register: list[ScriptOutput] = []
        self._outputs: set[ScriptOutput] = set()
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="compute-serial-console", daemon=True)

    def start(self) -> None:
        """Starts the reading thread."""
        self._thread.start()

    def open_script(self, serial_log: str, hostname: str, script_name: str) -> tuple[int, ScriptOutput]:
        """A pipe for one script run: returns (write end for the script's stdout and stderr, its ScriptOutput).

        Call ``attach(output, pid)`` once the script started (or ``abandon`` if it did
        not); the caller closes the write end after handing it to the child.
        """
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        return write_fd, ScriptOutput(serial_log, hostname, 0, script_name, read_fd)

    def attach(self, output: ScriptOutput, runner_pid: int) -> None:
        """The script runs as ``runner_pid``: write the runner's opening lines, then start copying its output."""
        output.runner_pid = runner_pid
        phase = phase_of(output.script_name)
        self._append(output, [f"Starting {phase} scripts (version {RUNNER_VERSION}).".encode(), f"Found {output.script_name} in metadata.".encode()])
        with self._lock:
            if self._stopped:
                os.close(output.read_fd)
                output.closed = True
                return
            self._outputs.add(output)
            self._to_register.append(output)
        self._wake()

    @staticmethod
    def abandon(output: ScriptOutput) -> None:
        """The script never started: close the read end."""
        os.close(output.read_fd)
        output.closed = True

    def finish(self, output: ScriptOutput, status: int) -> None:
        """The script exited with ``status`` (Popen's returncode): its exit line follows its last output line."""
        with self._lock:
            if output.exit_status is not None:
                return
            output.exit_status = status
            ready = output.closed
        if ready:
            self._write_exit(output)

    def stop(self) -> None:
        """Stops the thread and closes every pipe still open."""
        with self._lock:
            self._stopped = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            outputs, self._outputs = list(self._outputs), set()
        for output in outputs:
            if not output.closed:
                try:
                    os.close(output.read_fd)
                except OSError:
                    pass
                output.closed = True
        self._selector.close()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)

    # The reading thread.

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the console is stopped

    def _run(self) -> None:
        while True:
            with self._lock:
                stopped = self._stopped
                to_register, self._to_register = self._to_register, []
            if stopped:
                return
            for output in to_register:
                self._selector.register(output.read_fd, selectors.EVENT_READ, output)
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        while os.read(self._wake_read, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                try:
                    self._read(key.data)
                except Exception:
                    logger.exception("serial console of %s failed", key.data.hostname)

    def _read(self, output: ScriptOutput) -> None:
        try:
            data = os.read(output.read_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            lines = (output.pending + data).split(b"\n")
            output.pending = lines.pop()
            while len(output.pending) > MAX_LINE_BYTES:
                lines.append(output.pending[:MAX_LINE_BYTES])
                output.pending = output.pending[MAX_LINE_BYTES:]
            if lines:
                self._append(output, [output.script_name.encode() + b": " + line.removesuffix(b"\r") for line in lines])
            return
        # End of file: every process holding the pipe is gone.
        if output.pending:
            self._append(output, [output.script_name.encode() + b": " + output.pending.removesuffix(b"\r")])
            output.pending = b""
        self._selector.unregister(output.read_fd)
        os.close(output.read_fd)
        with self._lock:
            output.closed = True
            self._outputs.discard(output)
            ready = output.exit_status is not None
        if ready:
            self._write_exit(output)

    def _write_exit(self, output: ScriptOutput) -> None:
        with self._lock:
            if output.exit_written or output.exit_status is None:
                return
            output.exit_written = True
            status = output.exit_status
        phase = phase_of(output.script_name)
        self._append(output, [exit_message(output.script_name, status).encode(), f"Finished running {phase} scripts.".encode()])

    def _append(self, output: ScriptOutput, messages: list[bytes]) -> None:
        prefix = runner_prefix(self._wall_clock(), output.hostname, output.runner_pid)
        try:
            with open(output.serial_log, "ab") as serial:
                serial.write(b"".join(prefix + message + b"\n" for message in messages))
        except OSError:
            pass  # the VM and its disk are gone; nobody can read its console any more
