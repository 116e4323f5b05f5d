"""Helpers every test may use (not fixtures; those are in the conftest files).

- ``wait_until(predicate, timeout, what)``: the one way a test waits for
  something that happens in another process or thread.
- The Compute emulator as a subprocess (``compute_emulator_process``), a
  googleapiclient aimed at it (``compute_client``), an instances.insert body
  as GCP code sends it (``instance_body``), and ``wait_operation``.
"""

import contextlib
import dataclasses
import re
import selectors
import signal
import subprocess
import sys
import time

READY_LINE = re.compile(r"compute emulator listening on (http://\S+/compute/v1/)")
DEFAULT_IMAGE = "projects/debian-cloud/global/images/family/debian-12"


def wait_until(predicate, timeout=10.0, what="condition", interval=0.05):
    """Poll ``predicate()`` until it returns a truthy value, and return that value.

    Raises:
        AssertionError: ``timeout`` seconds passed first; the message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class EmulatorStartError(RuntimeError):
    """The emulator subprocess exited or stayed silent instead of printing its URL."""


@dataclasses.dataclass
class EmulatorProcess:
    """A running ``cflow emulator compute``: its Popen and base URL (``http://H:P/compute/v1/``)."""

    process: subprocess.Popen
    base_url: str

    @property
    def pid(self):
        return self.process.pid

    @property
    def batch_uri(self):
        return self.base_url.split("/compute/v1/")[0] + "/batch/compute/v1"


def _read_ready_line(process, timeout_s):
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = process.stdout.readline()
            if not line:
                raise EmulatorStartError(f"compute emulator exited with status {process.wait()} before it was ready")
            match = READY_LINE.search(line)
            if match:
                return match.group(1)
    raise EmulatorStartError(f"compute emulator printed no URL within {timeout_s} s")


@contextlib.contextmanager
def compute_emulator_process(*extra_args, shutdown_grace_s=2, start_timeout_s=30, stop_timeout_s=60, env=None):
    """Run ``python -m cflow emulator compute --port 0 ...`` for the ``with`` block.

    Args:
        *extra_args: more command-line options (``"--boot-delay", "1"``...).
        shutdown_grace_s: ``--shutdown-grace`` (small keeps tests fast); None omits it.
        env: the subprocess environment (default: inherited).
    Yields:
        An EmulatorProcess.
    Raises:
        EmulatorStartError: it did not print its URL in ``start_timeout_s``.

    At exit the emulator gets SIGTERM (by pid) and is waited for; SIGKILL if it
    is not gone within ``stop_timeout_s``.
    """
    command = [sys.executable, "-m", "cflow", "emulator", "compute", "--host", "127.0.0.1", "--port", "0"]
    if shutdown_grace_s is not None:
        command += ["--shutdown-grace", str(shutdown_grace_s)]
    command += [str(arg) for arg in extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        base_url = _read_ready_line(process, start_timeout_s)
        yield EmulatorProcess(process, base_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def compute_client(base_url):
    """Return a googleapiclient ``compute`` v1 service aimed at the emulator, as GCP code builds it."""
    import google.auth.credentials

    from cflow.gcp.clients import build_compute

    return build_compute(google.auth.credentials.AnonymousCredentials(), base_url)


def instance_body(name, zone="us-central1-a", machine_type="e2-small", startup_script=None, shutdown_script=None,
                  labels=None, spot=False, termination_action=None, metadata=None, service_account=True):
    """Return an instances.insert body as GCP code sends it (full partial-URL forms)."""
    items = [{"key": key, "value": value} for key, value in (metadata or {}).items()]
    if startup_script is not None:
        items.append({"key": "startup-script", "value": startup_script})
    if shutdown_script is not None:
        items.append({"key": "shutdown-script", "value": shutdown_script})
    body = {
        "name": name,
        "machineType": f"zones/{zone}/machineTypes/{machine_type}",
        "disks": [{"boot": True, "autoDelete": True, "initializeParams": {"sourceImage": DEFAULT_IMAGE}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
        "metadata": {"items": items},
        "labels": dict(labels or {}),
    }
    if service_account:
        body["serviceAccounts"] = [{"email": "default", "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
    if spot:
        body["scheduling"] = {"provisioningModel": "SPOT", "instanceTerminationAction": termination_action or "STOP"}
    return body


def wait_operation(client, project, zone, operation, timeout_s=30):
    """Wait (zoneOperations.wait, repeated) until the operation is DONE; return it."""
    name = operation["name"] if isinstance(operation, dict) else operation
    deadline = time.monotonic() + timeout_s
    while True:
        result = client.zoneOperations().wait(project=project, zone=zone, operation=name).execute()
        if result["status"] == "DONE":
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"operation {name} not DONE after {timeout_s} s")
