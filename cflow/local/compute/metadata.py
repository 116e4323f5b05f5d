"""Per-VM metadata servers, as http://metadata.google.internal/ answers a guest.

Each emulated VM gets its own listening port on the emulator host (its
``GCE_METADATA_HOST``). One selector thread accepts for every VM's port;
each connection is then served on a short-lived thread. What a VM sees is
asked of a ``MetadataSource`` (the emulator's engine) on every request, so it
is always current.

Served under ``/computeMetadata/v1/``: directory listings (``dir/``), leaves,
``?recursive=true`` (JSON with camelCase keys, user keys verbatim),
``?alt=json``, ``?wait_for_change=true`` with ``last_etag``/``timeout_sec``,
``instance/service-accounts/default/token`` (a fake token). Requests need
``Metadata-Flavor: Google`` (else 403) and answers carry it.

Emulator-only: ``POST /cflow-emulator/v1/poweroff`` (with the header) powers
the VM off as ``poweroff`` in the guest would; the per-VM ``poweroff`` shim
calls it.

A VM on a real root (``guest_root``) reaches its server as GCE's guests do,
at ``http://metadata.google.internal/`` (port 80): ``open_guest_address``
also listens for it on an address of its own, ``127.77.X.Y:80``, which its
``/etc/hosts`` names.
"""

import errno
import hashlib
import json
import logging
import selectors
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol, cast

logger = logging.getLogger(__name__)

MAX_WAIT_S = 3600
# Guests on a real root get 127.77.0.1 ... 127.77.255.254 (all of 127/8 is loopback on Linux).
GUEST_ADDRESS_PREFIX = "127.77"
GUEST_ADDRESS_COUNT = 65534
GUEST_METADATA_PORT = 80


class Verbatim(dict):
    """A metadata directory whose keys are user data (attributes, account emails): never camelCased."""


class MetadataSource(Protocol):
    """What the metadata servers ask of the emulator (``guest_metadata.GuestMetadata``); ``vm_key`` is the instance id."""

    def metadata_tree(self, vm_key: int) -> dict[str, Any] | None:
        """A nested dict (str leaves; ``Verbatim`` for user keys), or None if the VM is gone."""
        ...

    def metadata_token(self, vm_key: int) -> dict[str, Any] | None:
        """The access token JSON, or None if the VM has no service account."""
        ...

    def metadata_version(self, vm_key: int) -> int:
        """The VM's metadata version."""
        ...

    def wait_metadata_change(self, vm_key: int, version: int, timeout_s: float) -> int | None:
        """Blocks until the version differs from ``version`` (or timeout); the current one, or None once the VM is gone."""
        ...

    def guest_poweroff(self, vm_key: int) -> bool:
        """The guest asks to power off; False if the VM is gone."""
        ...


def _camel(key: str) -> str:
    head, *rest = key.split("-")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _to_json(node: Any) -> Any:
    if isinstance(node, Verbatim):
        return {key: _to_json(value) for key, value in node.items()}
    if isinstance(node, dict):
        return {_camel(key): _to_json(value) for key, value in node.items()}
    return node


def _resolve(tree: dict[str, Any], path: str) -> Any:
    node = tree
    for part in [part for part in path.split("/") if part]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _render(node: Any, recursive: bool, as_json: bool) -> tuple[str, str]:
    """Returns (content type, body text) for a tree node."""
    if isinstance(node, dict):
        if recursive or as_json:
            return "application/json", json.dumps(_to_json(node) if recursive else sorted(_listing(node)))
        return "application/text", "\n".join(_listing(node)) + "\n"
    if as_json:
        return "application/json", json.dumps(node)
    if isinstance(node, list):
        return "application/text", "\n".join(str(item) for item in node) + "\n"
    return "application/text", str(node)


def _listing(directory: dict[str, Any]) -> list[str]:
    return [key + "/" if isinstance(value, dict) else key for key, value in directory.items()]


class _Binding:
    """What a connection's handler knows: which VM it serves and whom to ask (the handler's ``server``)."""

    def __init__(self, vm_key: int, source: MetadataSource) -> None:
        self.vm_key = vm_key
        self.source = source


class _MetadataHandler(BaseHTTPRequestHandler):
    """Serves one connection to a VM's metadata server."""

    protocol_version = "HTTP/1.1"
    server_version = "Metadata Server for VM"
    sys_version = ""
    timeout = 60

    @property
    def binding(self) -> _Binding:
        """The VM this connection is for (handed to the handler where a server usually goes)."""
        return cast(_Binding, self.server)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metadata %s: " + format, self.binding.vm_key, *args)

    def _send(self, status: int, body: str, content_type: str = "application/text", etag: str | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(data)

    def _flavor_ok(self) -> bool:
        return self.headers.get("Metadata-Flavor", "") == "Google"

    def do_GET(self) -> None:
        """Metadata reads."""
        self._serve()

    def do_POST(self) -> None:
        """Guest power-off, and token requests sent as POST."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path == "/cflow-emulator/v1/poweroff":
            if not self._flavor_ok():
                self._send(403, "Missing required header: Metadata-Flavor: Google\n")
                return
            accepted = self.binding.source.guest_poweroff(self.binding.vm_key)
            self._send(200 if accepted else 404, "OK\n" if accepted else "Not Found\n")
            return
        if parsed.path.endswith("/token"):
            self._serve()
            return
        self._send(405, "Method Not Allowed\n")

    def _serve(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        path = parsed.path
        if path == "/":
            self._send(200, "computeMetadata/\n")
            return
        if not self._flavor_ok():
            self._send(403, "Missing required header: Metadata-Flavor: Google\n", "text/html; charset=UTF-8")
            return
        prefix = "/computeMetadata/v1"
        if path != prefix and not path.startswith(prefix + "/"):
            self._send(404, "Not Found\n", "text/html; charset=UTF-8")
            return
        relative = path[len(prefix) :].lstrip("/")
        source, vm_key = self.binding.source, self.binding.vm_key
        if relative.startswith("instance/service-accounts/") and relative.endswith("/token"):
            token = source.metadata_token(vm_key)
            if token is None:
                self._send(404, "Not Found\n", "text/html; charset=UTF-8")
            else:
                self._send(200, json.dumps(token), "application/json")
            return
        recursive = query.get("recursive", "").lower() == "true"
        as_json = query.get("alt") == "json"
        wait = query.get("wait_for_change", "").lower() == "true"
        timeout_s = min(float(query.get("timeout_sec") or MAX_WAIT_S), MAX_WAIT_S)
        last_etag = query.get("last_etag")
        version = source.metadata_version(vm_key)
        answer = self._lookup(relative, recursive, as_json)
        if answer is None:
            self._send(404, "Not Found\n", "text/html; charset=UTF-8")
            return
        if wait:
            answer = self._wait_for_change(relative, recursive, as_json, answer, version, last_etag, timeout_s)
            if answer is None:
                self._send(404, "Not Found\n", "text/html; charset=UTF-8")
                return
        content_type, body, etag = answer
        self._send(200, body, content_type, etag)

    def _lookup(self, relative: str, recursive: bool, as_json: bool) -> tuple[str, str, str] | None:
        tree = self.binding.source.metadata_tree(self.binding.vm_key)
        if tree is None:
            return None
        node = _resolve(tree, relative)
        if node is None:
            return None
        content_type, body = _render(node, recursive, as_json)
        return content_type, body, hashlib.sha256(body.encode()).hexdigest()[:16]

    def _wait_for_change(
        self, relative: str, recursive: bool, as_json: bool, answer: tuple[str, str, str], version: int, last_etag: str | None, timeout_s: float
    ) -> tuple[str, str, str] | None:
        deadline = time.monotonic() + timeout_s
        baseline = last_etag or answer[2]
        while answer[2] == baseline:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed_version = self.binding.source.wait_metadata_change(self.binding.vm_key, version, remaining)
            if changed_version is None:
                # The VM is gone or the emulator is stopping: answer now, do not spin.
                return self._lookup(relative, recursive, as_json)
            version = changed_version
            current = self._lookup(relative, recursive, as_json)
            if current is None:
                return None
            answer = current
        return answer


class MetadataServers:
    """Every VM's metadata server, accepted on one selector thread.

    Args:
        host: interface to listen on (127.0.0.1).

    ``open``/``close`` a VM's server at any time; connections are served,
    asking ``source`` about the VM, once ``start(source)`` has run.
    """

    def __init__(self, host: str) -> None:
        self._host = host
        self._source: MetadataSource | None = None
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[int, list[socket.socket]] = {}
        self._guest_addresses: dict[int, str] = {}
        self._next_guest_address = 0
        self._pending: list[tuple[str, int, socket.socket]] = []
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="metadata-accept", daemon=True)

    def start(self, source: MetadataSource) -> None:
        """Starts serving every VM's metadata from ``source``."""
        self._source = source
        self._thread.start()

    def open(self, vm_key: int) -> int:
        """Starts listening for one VM; returns its port."""
        listener = self._listen(self._host, 0)
        self._add(vm_key, listener)
        port: int = listener.getsockname()[1]
        return port

    def open_guest_address(self, vm_key: int) -> str:
        """Also serves VM ``vm_key`` on port 80 of an address of its own (``127.77.X.Y``); returns the address.

        The same address comes back until ``close(vm_key)``. Addresses taken by
        another process (another emulator's VMs) are skipped.

        Raises:
            OSError: no address is free, or port 80 cannot be bound (not root).
        """
        with self._lock:
            known = self._guest_addresses.get(vm_key)
            taken = set(self._guest_addresses.values())
        if known is not None:
            return known
        for _ in range(GUEST_ADDRESS_COUNT):
            with self._lock:
                self._next_guest_address = self._next_guest_address % GUEST_ADDRESS_COUNT + 1
                number = self._next_guest_address
            address = f"{GUEST_ADDRESS_PREFIX}.{number >> 8}.{number & 255}"
            if address in taken:
                continue
            try:
                listener = self._listen(address, GUEST_METADATA_PORT)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    continue
                raise
            with self._lock:
                self._guest_addresses[vm_key] = address
            self._add(vm_key, listener)
            return address
        raise OSError(errno.EADDRNOTAVAIL, f"no free metadata address left in {GUEST_ADDRESS_PREFIX}.0.0/16")

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        return listener

    def _add(self, vm_key: int, listener: socket.socket) -> None:
        with self._lock:
            self._listeners.setdefault(vm_key, []).append(listener)
            self._pending.append(("add", vm_key, listener))
        self._wake()

    def close(self, vm_key: int) -> None:
        """Stops listening for one VM, on every address (connections already open finish)."""
        with self._lock:
            self._guest_addresses.pop(vm_key, None)
            for listener in self._listeners.pop(vm_key, []):
                self._pending.append(("remove", vm_key, listener))
        self._wake()

    def stop(self) -> None:
        """Stops accepting and closes every listener (connections being served finish on their own)."""
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(timeout=5)
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.close()
        self._listeners.clear()
        self._wake_read.close()
        self._wake_write.close()
        self._selector.close()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass

    def _apply_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, []
            stopped = self._stopped
        for action, vm_key, listener in pending:
            if action == "add":
                assert self._source is not None, "start() sets the source before the thread runs"
                self._selector.register(listener, selectors.EVENT_READ, _Binding(vm_key, self._source))
            else:
                try:
                    self._selector.unregister(listener)
                except (KeyError, ValueError):
                    pass
                listener.close()
        return stopped

    def _run(self) -> None:
        while True:
            if self._apply_pending():
                return
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        while self._wake_read.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                try:
                    connection, address = cast(socket.socket, key.fileobj).accept()
                except (BlockingIOError, OSError):
                    continue
                connection.setblocking(True)
                threading.Thread(target=self._serve_connection, args=(connection, address, key.data), daemon=True).start()

    @staticmethod
    def _serve_connection(connection: socket.socket, address: Any, binding: _Binding) -> None:
        try:
            # The handler takes its server as third argument; ours is the binding (see ``_MetadataHandler.binding``).
            _MetadataHandler(connection, address, cast(Any, binding))
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception:
            logger.exception("metadata request for %s failed", binding.vm_key)
        finally:
            try:
                connection.close()
            except OSError:
                pass
