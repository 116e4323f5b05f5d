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
"""

import hashlib
import json
import logging
import selectors
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler

logger = logging.getLogger(__name__)

MAX_WAIT_S = 3600


class Verbatim(dict):
    """A metadata directory whose keys are user data (attributes, account emails): never camelCased."""


class MetadataSource:
    """What the metadata servers ask of the emulator; the engine implements it.

    ``metadata_tree(vm_key)`` returns a nested dict (str leaves) or None if
    the VM is gone; ``metadata_token(vm_key)`` returns the token JSON;
    ``wait_metadata_change(vm_key, version, timeout_s)`` blocks until the VM's
    metadata version differs from ``version`` (or timeout) and returns the
    current version, or None once the VM is gone or the emulator stops; ``metadata_version(vm_key)``; ``guest_poweroff(vm_key)``.
    """


def _camel(key):
    head, *rest = key.split("-")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _to_json(node):
    if isinstance(node, Verbatim):
        return {key: _to_json(value) for key, value in node.items()}
    if isinstance(node, dict):
        return {_camel(key): _to_json(value) for key, value in node.items()}
    return node


def _resolve(tree, path):
    node = tree
    for part in [part for part in path.split("/") if part]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _render(node, recursive, as_json):
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


def _listing(directory):
    return [key + "/" if isinstance(value, dict) else key for key, value in directory.items()]


class _Binding:
    """What a connection's handler knows: which VM it serves and whom to ask."""

    def __init__(self, vm_key, source):
        self.vm_key = vm_key
        self.source = source


class _MetadataHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Metadata Server for VM"
    sys_version = ""
    timeout = 60

    def log_message(self, format, *args):
        logger.debug("metadata %s: " + format, self.server.vm_key, *args)

    def _send(self, status, body, content_type="application/text", etag=None):
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(data)

    def _flavor_ok(self):
        return self.headers.get("Metadata-Flavor", "") == "Google"

    def do_GET(self):
        self._serve()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path == "/cflow-emulator/v1/poweroff":
            if not self._flavor_ok():
                self._send(403, "Missing required header: Metadata-Flavor: Google\n")
                return
            accepted = self.server.source.guest_poweroff(self.server.vm_key)
            self._send(200 if accepted else 404, "OK\n" if accepted else "Not Found\n")
            return
        if parsed.path.endswith("/token"):
            self._serve()
            return
        self._send(405, "Method Not Allowed\n")

    def _serve(self):
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
        source, vm_key = self.server.source, self.server.vm_key
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

    def _lookup(self, relative, recursive, as_json):
        tree = self.server.source.metadata_tree(self.server.vm_key)
        if tree is None:
            return None
        node = _resolve(tree, relative)
        if node is None:
            return None
        content_type, body = _render(node, recursive, as_json)
        return content_type, body, hashlib.sha256(body.encode()).hexdigest()[:16]

    def _wait_for_change(self, relative, recursive, as_json, answer, version, last_etag, timeout_s):
        deadline = time.monotonic() + timeout_s
        baseline = last_etag or answer[2]
        while answer[2] == baseline:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            version = self.server.source.wait_metadata_change(self.server.vm_key, version, remaining)
            if version is None:
                # The VM is gone or the emulator is stopping: answer now, do not spin.
                return self._lookup(relative, recursive, as_json)
            answer = self._lookup(relative, recursive, as_json)
            if answer is None:
                return None
        return answer


class MetadataServers:
    """Every VM's metadata server, accepted on one selector thread.

    Args:
        host: interface to listen on (127.0.0.1).
        source: a MetadataSource.
    """

    def __init__(self, host, source):
        self._host = host
        self._source = source
        self._selector = selectors.DefaultSelector()
        self._listeners = {}  # vm_key -> socket
        self._pending = []
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="metadata-accept", daemon=True)

    def start(self):
        self._thread.start()

    def open(self, vm_key):
        """Starts listening for one VM; returns its port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(64)
        listener.setblocking(False)
        with self._lock:
            self._listeners[vm_key] = listener
            self._pending.append(("add", vm_key, listener))
        self._wake()
        return listener.getsockname()[1]

    def close(self, vm_key):
        """Stops listening for one VM (connections already open finish)."""
        with self._lock:
            listener = self._listeners.pop(vm_key, None)
            if listener is not None:
                self._pending.append(("remove", vm_key, listener))
        self._wake()

    def stop(self):
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(timeout=5)
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._wake_read.close()
        self._wake_write.close()
        self._selector.close()

    def _wake(self):
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass

    def _apply_pending(self):
        with self._lock:
            pending, self._pending = self._pending, []
            stopped = self._stopped
        for action, vm_key, listener in pending:
            if action == "add":
                self._selector.register(listener, selectors.EVENT_READ, _Binding(vm_key, self._source))
            else:
                try:
                    self._selector.unregister(listener)
                except (KeyError, ValueError):
                    pass
                listener.close()
        return stopped

    def _run(self):
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
                    connection, address = key.fileobj.accept()
                except (BlockingIOError, OSError):
                    continue
                connection.setblocking(True)
                threading.Thread(target=self._serve_connection, args=(connection, address, key.data), daemon=True).start()

    @staticmethod
    def _serve_connection(connection, address, binding):
        try:
            _MetadataHandler(connection, address, binding)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception:
            logger.exception("metadata request for %s failed", binding.vm_key)
        finally:
            try:
                connection.close()
            except OSError:
                pass
