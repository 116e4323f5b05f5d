"""The VM's metadata server: who am I, what run am I in, am I being preempted, what does the scheduler say.

On GCE the server is metadata.google.internal; the local Compute emulator
serves one per VM and sets ``GCE_METADATA_HOST`` (the variable google-auth
honours) to it.
"""

import json
import logging
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

log = logging.getLogger(__name__)

DEFAULT_HOST = "metadata.google.internal"


class MetadataError(Exception):
    """The metadata server did not answer as expected."""


class Metadata:
    """Read-only view of this VM's metadata, plus power-off.

    Args:
        host: ``HOST[:PORT]`` of the metadata server; default from
            ``GCE_METADATA_HOST`` or metadata.google.internal.
        environ: the environment to read (tests pass their own).
    """

    def __init__(self, host: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.host = host or self.environ.get("GCE_METADATA_HOST") or DEFAULT_HOST

    def _url(self, path: str) -> str:
        return f"http://{self.host}/computeMetadata/v1/{path}"

    def get(self, path: str, timeout: float = 5.0) -> str | None:
        """Returns the text at ``path`` (e.g. "instance/name"), or None if it does not exist.

        Raises:
            MetadataError: the server could not be reached or refused.
        """
        request = urllib.request.Request(self._url(path), headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise MetadataError(f"metadata server answered {error.code} for {path}") from None
        except (urllib.error.URLError, OSError) as error:
            raise MetadataError(f"metadata server {self.host} unreachable: {error}") from None

    def watch_attributes(self, last_etag: str | None, timeout_seconds: int = 60) -> tuple[dict[str, str], str]:
        """The instance's attributes once they differ from the answer whose ETag was ``last_etag``.

        The server holds the call (``?wait_for_change=true``) until an
        attribute changes or ``timeout_seconds`` pass; with ``last_etag``
        None it answers at once.

        Returns:
            ``(attributes, etag)``: pass the ETag to the next call.
        Raises:
            MetadataError: the server could not be reached or refused.
        """
        query = "recursive=true&alt=json"
        if last_etag is not None:
            query += f"&wait_for_change=true&timeout_sec={int(timeout_seconds)}&last_etag={urllib.parse.quote(last_etag)}"
        request = urllib.request.Request(self._url(f"instance/attributes/?{query}"), headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_seconds + 10) as response:
                etag = response.headers.get("ETag", "")
                document = json.loads(response.read().decode() or "{}")
        except urllib.error.HTTPError as error:
            raise MetadataError(f"metadata server answered {error.code} for the instance's attributes") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise MetadataError(f"metadata server {self.host}: no answer about the instance's attributes: {error}") from None
        attributes = {str(key): str(value) for key, value in document.items()} if isinstance(document, dict) else {}
        return attributes, etag

    def attribute(self, key: str) -> str | None:
        """The instance attribute ``key`` (custom metadata), or None."""
        return self.get(f"instance/attributes/{key}")

    def instance_name(self) -> str | None:
        return self.get("instance/name")

    def preempted(self) -> bool:
        """True once the VM is being preempted."""
        try:
            return (self.get("instance/preempted", timeout=2.0) or "").strip().upper() == "TRUE"
        except MetadataError:
            return False

    def power_off(self) -> None:
        """Power this VM off, as `poweroff` does on GCE.

        On the emulator the guest asks its metadata server (never the host's
        own power switch); on GCE the OS shuts down and the VM stops.
        """
        if self.environ.get("CFLOW_EMULATED_VM") == "1":
            request = urllib.request.Request(
                f"http://{self.host}/cflow-emulator/v1/poweroff",
                data=b"",
                method="POST",
                headers={"Metadata-Flavor": "Google"},
            )
            urllib.request.urlopen(request, timeout=10).read()
            return
        subprocess.run(["shutdown", "-h", "now"], check=False)
