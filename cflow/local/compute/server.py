"""HTTP routing: Compute Engine v1 REST paths (and the batch endpoint) onto the engine.

Serves ``/compute/v1/...`` as googleapiclient calls it with
``client_options={"api_endpoint": "http://H:P/compute/v1/"}``, and
``POST /batch/compute/v1`` (multipart/mixed, as ``BatchHttpRequest`` sends
it). googleapiclient derives a service's batch URI from the discovery
document's rootUrl, not from ``api_endpoint``: callers must pass
``BatchHttpRequest(batch_uri="http://H:P/batch/compute/v1")`` themselves.
"""

import email.parser
import json
import logging
import re
import secrets
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cflow.local.compute import api_errors
from cflow.local.compute.engine import RawJson
from cflow.local.compute.filters import compile_filter

logger = logging.getLogger(__name__)

API_PREFIX = "/compute/v1/"
BATCH_PATHS = ("/batch/compute/v1", "/batch/compute/v1/", "/batch")
MAX_BODY_BYTES = 32 * 1024 * 1024

_P = r"projects/(?P<project>[^/]+)"
_Z = _P + r"/zones/(?P<zone>[^/]+)"
_I = _Z + r"/instances/(?P<instance>[^/]+)"
_O = _Z + r"/operations/(?P<operation>[^/]+)"
_D = _Z + r"/disks/(?P<disk>[^/]+)"
_G = _P + r"/global/operations/(?P<operation>[^/]+)"


ROUTES = tuple(
    (method, re.compile(pattern), handler)
    for method, pattern, handler in (
        ("GET", _P + r"/zones", "list_zones"),
        ("GET", _Z, "get_zone"),
        ("GET", _Z + r"/machineTypes", "list_machine_types"),
        ("GET", _Z + r"/machineTypes/(?P<name>[^/]+)", "get_machine_type"),
        ("GET", _P + r"/aggregated/instances", "aggregated_list_instances"),
        ("POST", _Z + r"/instances", "insert_instance"),
        ("GET", _Z + r"/instances", "list_instances"),
        ("POST", _Z + r"/instances/bulkInsert", "bulk_insert"),
        ("GET", _I, "get_instance"),
        ("DELETE", _I, "delete_instance"),
        ("POST", _I + r"/stop", "stop_instance"),
        ("POST", _I + r"/start", "start_instance"),
        ("POST", _I + r"/setLabels", "set_labels"),
        ("POST", _I + r"/setMetadata", "set_metadata"),
        ("POST", _I + r"/simulateMaintenanceEvent", "simulate_maintenance_event"),
        ("GET", _I + r"/serialPort", "serial_port_output"),
        ("GET", _Z + r"/operations", "list_operations"),
        ("GET", _O, "get_operation"),
        ("DELETE", _O, "delete_operation"),
        ("POST", _O + r"/wait", "wait_operation"),
        ("GET", _Z + r"/disks", "list_disks"),
        ("GET", _D, "get_disk"),
        ("DELETE", _D, "delete_disk"),
        ("GET", _P + r"/global/images", "list_images"),
        ("POST", _P + r"/global/images", "insert_image"),
        ("GET", _P + r"/global/images/family/(?P<family>[^/]+)", "get_image_from_family"),
        ("GET", _P + r"/global/images/(?P<image>[^/]+)", "get_image"),
        ("DELETE", _P + r"/global/images/(?P<image>[^/]+)", "delete_image"),
        ("POST", _P + r"/global/images/(?P<image>[^/]+)/deprecate", "deprecate_image"),
        ("GET", _P + r"/global/operations", "list_global_operations"),
        ("GET", _G, "get_global_operation"),
        ("DELETE", _G, "delete_global_operation"),
        ("POST", _G + r"/wait", "wait_global_operation"),
    )
)
BODY_METHODS = ("POST", "PUT", "PATCH")


class Handlers:
    """One method per route: (path arguments, query dict, parsed body) -> JSON-ready result.

    Args:
        engine: the ComputeEngine (instances, operations) and its catalog.
    """

    def __init__(self, engine):
        self.engine = engine
        self.catalog = engine.catalog

    def _list(self, kind, project, path, items):
        return {"kind": kind, "id": f"projects/{project}/{path}", "items": items, "selfLink": f"{self.engine.base_url}projects/{project}/{path}"}

    def list_zones(self, args, query, body):
        predicate = compile_filter(query.get("filter"))
        zones = (self.catalog.zone_json(args["project"], name) for name in self.catalog.zone_names())
        return self._list("compute#zoneList", args["project"], "zones", [zone for zone in zones if predicate(zone)])

    def get_zone(self, args, query, body):
        return self.catalog.zone_json(args["project"], args["zone"])

    def list_machine_types(self, args, query, body):
        project, zone = args["project"], args["zone"]
        self.catalog.zone_json(project, zone)
        predicate = compile_filter(query.get("filter"))
        types = (self.catalog.machine_type_json(project, zone, name) for name in sorted(self.catalog.machine_types))
        return self._list("compute#machineTypeList", project, f"zones/{zone}/machineTypes", [item for item in types if predicate(item)])

    def get_machine_type(self, args, query, body):
        return self.catalog.machine_type_json(args["project"], args["zone"], args["name"])

    def list_images(self, args, query, body):
        predicate = compile_filter(query.get("filter"))
        images = [image for image in self.catalog.images_of(args["project"]) if predicate(image)]
        return self._list("compute#imageList", args["project"], "global/images", images)

    def insert_image(self, args, query, body):
        force_create = str(query.get("forceCreate", "")).lower() == "true"
        return self.engine.insert_image(args["project"], body, force_create)

    def delete_image(self, args, query, body):
        return self.engine.delete_image(args["project"], args["image"])

    def deprecate_image(self, args, query, body):
        return self.engine.deprecate_image(args["project"], args["image"], body)

    def list_disks(self, args, query, body):
        return self.engine.list_disks(args["project"], args["zone"], query.get("filter"))

    def get_disk(self, args, query, body):
        return self.engine.get_disk(args["project"], args["zone"], args["disk"])

    def delete_disk(self, args, query, body):
        return self.engine.delete_disk(args["project"], args["zone"], args["disk"])

    def list_global_operations(self, args, query, body):
        return self.engine.list_operations(args["project"], None, query.get("filter"), query.get("maxResults"), query.get("pageToken"))

    def get_global_operation(self, args, query, body):
        return self.engine.get_operation(args["project"], None, args["operation"])

    def delete_global_operation(self, args, query, body):
        return self.engine.delete_operation(args["project"], None, args["operation"])

    def wait_global_operation(self, args, query, body):
        return self.engine.wait_operation(args["project"], None, args["operation"])

    def get_image(self, args, query, body):
        return self.catalog.image_json(args["project"], args["image"])

    def get_image_from_family(self, args, query, body):
        return self.catalog.image_from_family(args["project"], args["family"])

    def aggregated_list_instances(self, args, query, body):
        return self.engine.aggregated_list_instances(args["project"], query.get("filter"), query.get("maxResults"), query.get("pageToken"))

    def list_instances(self, args, query, body):
        return self.engine.list_instances(args["project"], args["zone"], query.get("filter"), query.get("maxResults"), query.get("pageToken"))

    def insert_instance(self, args, query, body):
        return self.engine.insert_instance(args["project"], args["zone"], body)

    def bulk_insert(self, args, query, body):
        return self.engine.bulk_insert(args["project"], args["zone"], body)

    def get_instance(self, args, query, body):
        return self.engine.get_instance(args["project"], args["zone"], args["instance"])

    def delete_instance(self, args, query, body):
        return self.engine.delete_instance(args["project"], args["zone"], args["instance"])

    def stop_instance(self, args, query, body):
        return self.engine.stop_instance(args["project"], args["zone"], args["instance"])

    def start_instance(self, args, query, body):
        return self.engine.start_instance(args["project"], args["zone"], args["instance"])

    def set_labels(self, args, query, body):
        return self.engine.set_labels(args["project"], args["zone"], args["instance"], body)

    def set_metadata(self, args, query, body):
        return self.engine.set_metadata(args["project"], args["zone"], args["instance"], body)

    def simulate_maintenance_event(self, args, query, body):
        return self.engine.simulate_maintenance_event(args["project"], args["zone"], args["instance"])

    def serial_port_output(self, args, query, body):
        return self.engine.serial_port_output(args["project"], args["zone"], args["instance"], query.get("start"))

    def list_operations(self, args, query, body):
        return self.engine.list_operations(args["project"], args["zone"], query.get("filter"), query.get("maxResults"), query.get("pageToken"))

    def get_operation(self, args, query, body):
        return self.engine.get_operation(args["project"], args["zone"], args["operation"])

    def delete_operation(self, args, query, body):
        return self.engine.delete_operation(args["project"], args["zone"], args["operation"])

    def wait_operation(self, args, query, body):
        return self.engine.wait_operation(args["project"], args["zone"], args["operation"])


class Dispatcher:
    """Answers one API call: (method, path, query string, body bytes) -> (status, JSON text or None).

    Args:
        engine: the ComputeEngine.
        faults: the Faults (``--error-rate`` answers come before any work).
    """

    def __init__(self, engine, faults):
        self.handlers = Handlers(engine)
        self.faults = faults

    def dispatch(self, method, path, query_string, body_bytes):
        try:
            return 200, self._dispatch(method, path, query_string, body_bytes)
        except api_errors.ApiError as error:
            return error.code, json.dumps(error.to_json())
        except Exception:
            logger.exception("compute emulator failed on %s %s", method, path)
            error = api_errors.ApiError(500, "internalError", "Internal error. Please try again or contact Google Support.")
            return 500, json.dumps(error.to_json())

    def _dispatch(self, method, path, query_string, body_bytes):
        if not path.startswith(API_PREFIX):
            raise api_errors.unknown_url(path)
        relative = urllib.parse.unquote(path[len(API_PREFIX) :]).strip("/")
        for route_method, pattern, handler in ROUTES:
            match = pattern.fullmatch(relative)
            if match is None or route_method != method:
                continue
            fault = self.faults.request_error(match.groupdict().get("project", ""))
            if fault is not None:
                raise fault
            query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True))
            body = self._parse_body(body_bytes) if method in BODY_METHODS else None
            result = getattr(self.handlers, handler)(match.groupdict(), query, body)
            if result is None:
                return None
            return result if isinstance(result, RawJson) else json.dumps(result)
        raise api_errors.unknown_url(path)

    @staticmethod
    def _parse_body(body_bytes):
        if not body_bytes or not body_bytes.strip():
            return {}
        try:
            body = json.loads(body_bytes)
        except (ValueError, UnicodeDecodeError) as error:
            raise api_errors.parse_error(str(error)) from None
        if not isinstance(body, dict):
            raise api_errors.parse_error("The request body must be a JSON object.")
        return body


_STATUS_TEXT = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 412: "Precondition Failed", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def answer_batch(dispatcher, content_type, body_bytes):
    """Answers a multipart/mixed batch; returns (status, content type, body bytes).

    Each part is an ``application/http`` request; the answer has one
    ``application/http`` part per request, ``Content-ID: <response-ID>``.
    """
    if "multipart/mixed" not in (content_type or ""):
        error = api_errors.bad_request("A batch request must be multipart/mixed.")
        return 400, "application/json; charset=UTF-8", json.dumps(error.to_json()).encode()
    message = email.parser.Parser().parsestr(f"Content-Type: {content_type}\r\n\r\n" + body_bytes.decode("utf-8", errors="replace"))
    if not message.is_multipart():
        error = api_errors.bad_request("The batch request has no parts.")
        return 400, "application/json; charset=UTF-8", json.dumps(error.to_json()).encode()
    boundary = "batch_" + secrets.token_hex(12)
    chunks = []
    for part in message.get_payload():
        # googleapiclient's MIME generator folds long headers; unfold (RFC 5322 2.2.3).
        content_id = re.sub(r"\r?\n", "", part.get("Content-ID") or "").strip()
        status, text = _answer_part(dispatcher, part.get_payload())
        response_id = f"<response-{content_id[1:]}" if content_id.startswith("<") else f"response-{content_id}"
        inner = text.encode() if text is not None else b""
        chunks.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: {response_id}\r\n\r\n"
            f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Status')}\r\n"
            f"Content-Type: application/json; charset=UTF-8\r\nContent-Length: {len(inner)}\r\n\r\n".encode()
            + inner
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return 200, f"multipart/mixed; boundary={boundary}", b"".join(chunks)


def _answer_part(dispatcher, payload):
    if isinstance(payload, list):
        return 400, json.dumps(api_errors.bad_request("Nested multipart parts are not supported.").to_json())
    request_line, _, rest = payload.lstrip("\r\n").partition("\n")
    pieces = request_line.strip().split(" ")
    if len(pieces) < 2:
        return 400, json.dumps(api_errors.bad_request("Malformed request line in batch part.").to_json())
    method, target = pieces[0].upper(), pieces[1]
    separator = re.search(r"\r?\n\r?\n", rest)
    body = rest[separator.end() :] if separator else ""
    parsed = urllib.parse.urlsplit(target)
    return dispatcher.dispatch(method, parsed.path, parsed.query, body.encode())


class ApiServer(ThreadingHTTPServer):
    """The emulator's HTTP server; ``dispatcher`` is set before serving."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address):
        super().__init__(address, ApiRequestHandler)
        self.dispatcher = None


class ApiRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cflow-compute-emulator"
    sys_version = ""

    def log_message(self, format, *args):
        logger.debug("api: " + format, *args)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, "application/json; charset=UTF-8", json.dumps(api_errors.bad_request("Request too large.").to_json()).encode())
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        parsed = urllib.parse.urlsplit(self.path)
        dispatcher = self.server.dispatcher
        if self.command == "POST" and parsed.path in BATCH_PATHS:
            status, content_type, data = answer_batch(dispatcher, self.headers.get("Content-Type"), body)
            self._reply(status, content_type, data)
            return
        status, text = dispatcher.dispatch(self.command, parsed.path, parsed.query, body)
        if text is None:
            self._reply(204, None, b"")
        else:
            self._reply(status, "application/json; charset=UTF-8", text.encode())

    def _reply(self, status, content_type, data):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle
