"""HTTP routing: Compute Engine v1 REST paths (and the batch endpoint) onto the engine's parts.

One route table per resource (``zone_routes``, ``instance_routes``,
``operation_routes``, ``disk_routes``, ``image_routes``, ``network_routes``,
``region_routes``, ``accelerator_routes``, ``project_routes``) maps a method
and a path to the part's method; ``Dispatcher`` finds the route, counts the
call against ``--rate-limit-per-minute`` (``rate_limit``), applies
``--error-rate`` faults, parses the body, answers a repeated ``requestId``
with its first operation (``request_ids``) and renders the answer or the
``ApiError``. Serves ``/compute/v1/...`` as googleapiclient calls it with
``client_options={"api_endpoint": "http://H:P/compute/v1/"}``, and
``POST /batch/compute/v1`` (multipart/mixed, as ``BatchHttpRequest`` sends
it). googleapiclient derives a service's batch URI from the discovery
document's rootUrl, not from ``api_endpoint``: callers must pass
``BatchHttpRequest(batch_uri="http://H:P/batch/compute/v1")`` themselves.
With a ``BearerTokenCheck`` (``--auth-token-file``), a request without the
token is answered 401 before anything is routed.
"""

import dataclasses
import email.message
import email.parser
import functools
import json
import logging
import re
import secrets
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from cflow.local.compute import api_errors
from cflow.local.compute.accelerators import AcceleratorTypes
from cflow.local.compute.auth import BearerTokenCheck
from cflow.local.compute.disks import Disks
from cflow.local.compute.engine import ComputeEngine
from cflow.local.compute.faults import Faults
from cflow.local.compute.images import Images
from cflow.local.compute.instances import Instances
from cflow.local.compute.networks import Networks
from cflow.local.compute.operations import Operations
from cflow.local.compute.paging import Answer, Json, RawJson
from cflow.local.compute.projects import Projects
from cflow.local.compute.rate_limit import RateLimiter
from cflow.local.compute.regions import Regions
from cflow.local.compute.request_ids import RequestIds
from cflow.local.compute.zones import Zones

logger = logging.getLogger(__name__)

API_PREFIX = "/compute/v1/"
BATCH_PATHS = ("/batch/compute/v1", "/batch/compute/v1/", "/batch")
MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_METHODS = ("POST", "PUT", "PATCH")

# Path fragments, relative to /compute/v1/.
_P = r"projects/(?P<project>[^/]+)"
_Z = _P + r"/zones/(?P<zone>[^/]+)"
_I = _Z + r"/instances/(?P<instance>[^/]+)"
_O = _Z + r"/operations/(?P<operation>[^/]+)"
_D = _Z + r"/disks/(?P<disk>[^/]+)"
_G = _P + r"/global/operations/(?P<operation>[^/]+)"
_IMAGE = _P + r"/global/images/(?P<image>[^/]+)"
_R = _P + r"/regions/(?P<region>[^/]+)"
_RO = _R + r"/operations/(?P<operation>[^/]+)"
_NETWORK = _P + r"/global/networks/(?P<network>[^/]+)"
_SUBNETWORK = _R + r"/subnetworks/(?P<subnetwork>[^/]+)"

PathArgs = dict[str, str]  # the path's named groups: project, zone, instance...
Query = dict[str, str]
Handler = Callable[[PathArgs, Query, Json | None], Answer]


@dataclasses.dataclass(frozen=True)
class Route:
    """One API method: an HTTP method and path pattern, and what answers it."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler


def route(method: str, pattern: str, handler: Handler) -> Route:
    """A Route; ``pattern`` must match the whole path after /compute/v1/."""
    return Route(method, re.compile(pattern), handler)


# One table per resource: (method, path) -> the part's method, with the path's and query's arguments.


def zone_routes(zones: Zones) -> list[Route]:
    """zones.*, machineTypes.* and diskTypes.*."""
    return [
        route("GET", _P + r"/zones", lambda path, query, body: zones.list_zones(path["project"], query.get("filter"))),
        route("GET", _Z, lambda path, query, body: zones.get_zone(path["project"], path["zone"])),
        route("GET", _Z + r"/machineTypes", lambda path, query, body: zones.list_machine_types(path["project"], path["zone"], query.get("filter"))),
        route("GET", _P + r"/aggregated/machineTypes", lambda path, query, body: zones.aggregated_machine_types(path["project"], query.get("filter"))),
        route("GET", _Z + r"/diskTypes", lambda path, query, body: zones.list_disk_types(path["project"], path["zone"], query.get("filter"))),
        route("GET", _Z + r"/diskTypes/(?P<name>[^/]+)", lambda path, query, body: zones.get_disk_type(path["project"], path["zone"], path["name"])),
        route("GET", _P + r"/aggregated/diskTypes", lambda path, query, body: zones.aggregated_disk_types(path["project"], query.get("filter"))),
        route(
            "GET",
            _Z + r"/machineTypes/(?P<name>[^/]+)",
            lambda path, query, body: zones.get_machine_type(path["project"], path["zone"], path["name"]),
        ),
    ]


def instance_routes(instances: Instances) -> list[Route]:
    """instances.*."""

    def listing(path: PathArgs, query: Query) -> tuple[str | None, str | None, str | None]:
        return query.get("filter"), query.get("maxResults"), query.get("pageToken")

    return [
        route("GET", _P + r"/aggregated/instances", lambda path, query, body: instances.aggregated_list(path["project"], *listing(path, query))),
        route("POST", _Z + r"/instances", lambda path, query, body: instances.insert(path["project"], path["zone"], body)),
        route("GET", _Z + r"/instances", lambda path, query, body: instances.list_instances(path["project"], path["zone"], *listing(path, query))),
        route("POST", _Z + r"/instances/bulkInsert", lambda path, query, body: instances.bulk_insert(path["project"], path["zone"], body)),
        route("GET", _I, lambda path, query, body: instances.get(path["project"], path["zone"], path["instance"])),
        route("DELETE", _I, lambda path, query, body: instances.delete(path["project"], path["zone"], path["instance"])),
        route("POST", _I + r"/stop", lambda path, query, body: instances.stop(path["project"], path["zone"], path["instance"])),
        route("POST", _I + r"/start", lambda path, query, body: instances.start(path["project"], path["zone"], path["instance"])),
        route("POST", _I + r"/reset", lambda path, query, body: instances.reset(path["project"], path["zone"], path["instance"])),
        route(
            "POST",
            _I + r"/setDeletionProtection",
            lambda path, query, body: instances.set_deletion_protection(path["project"], path["zone"], path["instance"], query.get("deletionProtection")),
        ),
        route(
            "POST", _I + r"/setScheduling", lambda path, query, body: instances.set_scheduling(path["project"], path["zone"], path["instance"], body)
        ),
        route("POST", _I + r"/setLabels", lambda path, query, body: instances.set_labels(path["project"], path["zone"], path["instance"], body)),
        route("POST", _I + r"/setMetadata", lambda path, query, body: instances.set_metadata(path["project"], path["zone"], path["instance"], body)),
        route("POST", _I + r"/setScheduling", lambda path, query, body: instances.set_scheduling(path["project"], path["zone"], path["instance"], body)),
        route(
            "POST",
            _I + r"/simulateMaintenanceEvent",
            lambda path, query, body: instances.simulate_maintenance_event(path["project"], path["zone"], path["instance"]),
        ),
        route(
            "GET",
            _I + r"/serialPort",
            lambda path, query, body: instances.serial_port_output(path["project"], path["zone"], path["instance"], query.get("start"), query.get("port")),
        ),
    ]


def operation_routes(operations: Operations) -> list[Route]:
    """zoneOperations.* and globalOperations.* (a global operation has zone None)."""

    def listing(path: PathArgs, query: Query, zone: str | None) -> Json:
        return operations.list_operations(path["project"], zone, query.get("filter"), query.get("maxResults"), query.get("pageToken"))

    return [
        route("GET", _Z + r"/operations", lambda path, query, body: listing(path, query, path["zone"])),
        route("GET", _O, lambda path, query, body: operations.get(path["project"], path["zone"], path["operation"])),
        route("DELETE", _O, lambda path, query, body: operations.delete(path["project"], path["zone"], path["operation"])),
        route("POST", _O + r"/wait", lambda path, query, body: operations.wait(path["project"], path["zone"], path["operation"])),
        route("GET", _P + r"/global/operations", lambda path, query, body: listing(path, query, None)),
        route("GET", _G, lambda path, query, body: operations.get(path["project"], None, path["operation"])),
        route("DELETE", _G, lambda path, query, body: operations.delete(path["project"], None, path["operation"])),
        route("POST", _G + r"/wait", lambda path, query, body: operations.wait(path["project"], None, path["operation"])),
        route(
            "GET",
            _R + r"/operations",
            lambda path, query, body: operations.list_operations(
                path["project"], None, query.get("filter"), query.get("maxResults"), query.get("pageToken"), region=path["region"]
            ),
        ),
        route("GET", _RO, lambda path, query, body: operations.get(path["project"], None, path["operation"], region=path["region"])),
        route("DELETE", _RO, lambda path, query, body: operations.delete(path["project"], None, path["operation"], region=path["region"])),
        route("POST", _RO + r"/wait", lambda path, query, body: operations.wait(path["project"], None, path["operation"], region=path["region"])),
        route(
            "GET",
            _P + r"/aggregated/operations",
            lambda path, query, body: operations.aggregated_list(path["project"], query.get("filter"), query.get("maxResults"), query.get("pageToken")),
        ),
    ]


def disk_routes(disks: Disks) -> list[Route]:
    """disks.*."""
    return [
        route("GET", _Z + r"/disks", lambda path, query, body: disks.list_disks(path["project"], path["zone"], query.get("filter"))),
        route("GET", _P + r"/aggregated/disks", lambda path, query, body: disks.aggregated_list(path["project"], query.get("filter"))),
        route("GET", _D, lambda path, query, body: disks.get(path["project"], path["zone"], path["disk"])),
        route("DELETE", _D, lambda path, query, body: disks.delete(path["project"], path["zone"], path["disk"])),
    ]


def image_routes(images: Images) -> list[Route]:
    """images.*."""

    def force_create(query: Query) -> bool:
        return str(query.get("forceCreate", "")).lower() == "true"

    return [
        route("GET", _P + r"/global/images", lambda path, query, body: images.list_images(path["project"], query.get("filter"))),
        route("POST", _P + r"/global/images", lambda path, query, body: images.insert(path["project"], body, force_create(query))),
        route("GET", _P + r"/global/images/family/(?P<family>[^/]+)", lambda path, query, body: images.get_from_family(path["project"], path["family"])),
        route("GET", _IMAGE, lambda path, query, body: images.get(path["project"], path["image"])),
        route("DELETE", _IMAGE, lambda path, query, body: images.delete(path["project"], path["image"])),
        route("POST", _IMAGE + r"/deprecate", lambda path, query, body: images.deprecate(path["project"], path["image"], body)),
        route(
            "GET",
            _Z + r"/imageFamilyViews/(?P<family>[^/]+)",
            lambda path, query, body: images.get_family_view(path["project"], path["zone"], path["family"]),
        ),
    ]


def project_routes(projects: Projects) -> list[Route]:
    """projects.get and projects.setCommonInstanceMetadata."""
    return [
        route("GET", _P, lambda path, query, body: projects.get(path["project"])),
        route("POST", _P + r"/setCommonInstanceMetadata", lambda path, query, body: projects.set_common_instance_metadata(path["project"], body)),
    ]


def network_routes(networks: Networks) -> list[Route]:
    """networks.* and subnetworks.*."""
    return [
        route("GET", _P + r"/global/networks", lambda path, query, body: networks.list_networks(path["project"], query.get("filter"))),
        route("POST", _P + r"/global/networks", lambda path, query, body: networks.insert_network(path["project"], body)),
        route("GET", _NETWORK, lambda path, query, body: networks.get_network(path["project"], path["network"])),
        route("DELETE", _NETWORK, lambda path, query, body: networks.delete_network(path["project"], path["network"])),
        route("GET", _P + r"/aggregated/subnetworks", lambda path, query, body: networks.aggregated_subnetworks(path["project"], query.get("filter"))),
        route(
            "GET", _R + r"/subnetworks", lambda path, query, body: networks.list_subnetworks(path["project"], path["region"], query.get("filter"))
        ),
        route("POST", _R + r"/subnetworks", lambda path, query, body: networks.insert_subnetwork(path["project"], path["region"], body)),
        route("GET", _SUBNETWORK, lambda path, query, body: networks.get_subnetwork(path["project"], path["region"], path["subnetwork"])),
        route("DELETE", _SUBNETWORK, lambda path, query, body: networks.delete_subnetwork(path["project"], path["region"], path["subnetwork"])),
        route(
            "POST",
            _SUBNETWORK + r"/setPrivateIpGoogleAccess",
            lambda path, query, body: networks.set_private_ip_google_access(path["project"], path["region"], path["subnetwork"], body),
        ),
    ]


def region_routes(regions: Regions) -> list[Route]:
    """regions.*."""
    return [
        route("GET", _P + r"/regions", lambda path, query, body: regions.list_regions(path["project"], query.get("filter"))),
        route("GET", _R, lambda path, query, body: regions.get(path["project"], path["region"])),
    ]


def accelerator_routes(accelerators: AcceleratorTypes) -> list[Route]:
    """acceleratorTypes.*."""
    return [
        route("GET", _P + r"/aggregated/acceleratorTypes", lambda path, query, body: accelerators.aggregated_list(path["project"], query.get("filter"))),
        route(
            "GET", _Z + r"/acceleratorTypes", lambda path, query, body: accelerators.list_types(path["project"], path["zone"], query.get("filter"))
        ),
        route("GET", _Z + r"/acceleratorTypes/(?P<name>[^/]+)", lambda path, query, body: accelerators.get(path["project"], path["zone"], path["name"])),
    ]


def engine_routes(engine: ComputeEngine) -> list[Route]:
    """Every route of the emulator, the most frequent first."""
    return [
        *zone_routes(engine.zones),
        *instance_routes(engine.instances),
        *operation_routes(engine.operations),
        *disk_routes(engine.disks),
        *image_routes(engine.images),
        *network_routes(engine.networks),
        *region_routes(engine.regions),
        *accelerator_routes(engine.accelerators),
        *project_routes(engine.projects),
    ]


class Dispatcher:
    """Answers one API call: (method, path, query string, body bytes) -> (status, JSON text or None).

    Args:
        routes: the API's routes (``engine_routes``).
        faults: the Faults (``--error-rate`` answers come before any work).
        rate_limiter: counts each call against its project's rate quota first (None: no limit).
        request_ids: answers a repeated ``requestId`` with its first operation (None: ids ignored).
    """

    def __init__(self, routes: list[Route], faults: Faults, rate_limiter: RateLimiter | None = None, request_ids: RequestIds | None = None) -> None:
        self.routes = routes
        self.faults = faults
        self.rate_limiter = rate_limiter
        self.request_ids = request_ids

    def dispatch(self, method: str, path: str, query_string: str, body_bytes: bytes) -> tuple[int, str | None]:
        """Answers the call; an ApiError becomes its status and Google's error JSON, anything else a 500."""
        try:
            return 200, self._dispatch(method, path, query_string, body_bytes)
        except api_errors.ApiError as error:
            return error.code, json.dumps(error.to_json())
        except Exception:
            logger.exception("compute emulator failed on %s %s", method, path)
            internal = api_errors.ApiError(500, "internalError", "Internal error. Please try again or contact Google Support.")
            return 500, json.dumps(internal.to_json())

    def _dispatch(self, method: str, path: str, query_string: str, body_bytes: bytes) -> str | None:
        if not path.startswith(API_PREFIX):
            raise api_errors.unknown_url(path)
        relative = urllib.parse.unquote(path[len(API_PREFIX) :]).strip("/")
        for candidate in self.routes:
            match = candidate.pattern.fullmatch(relative)
            if match is None or candidate.method != method:
                continue
            arguments = match.groupdict()
            project = arguments.get("project", "")
            if self.rate_limiter is not None:
                self.rate_limiter.admit(project, method, relative)
            fault = self.faults.request_error(project)
            if fault is not None:
                raise fault
            query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True))
            body = self._parse_body(body_bytes) if method in BODY_METHODS else None
            request_id = query.get("requestId") if method != "GET" else None
            if request_id and self.request_ids is not None:
                answer = functools.partial(candidate.handler, arguments, query, body)
                result = self.request_ids.call(project, request_id, answer)
            else:
                result = candidate.handler(arguments, query, body)
            if result is None:
                return None
            return result if isinstance(result, RawJson) else json.dumps(result)
        raise api_errors.unknown_url(path)

    @staticmethod
    def _parse_body(body_bytes: bytes) -> Json:
        if not body_bytes or not body_bytes.strip():
            return {}
        try:
            body = json.loads(body_bytes)
        except (ValueError, UnicodeDecodeError) as error:
            raise api_errors.parse_error(str(error)) from None
        if not isinstance(body, dict):
            raise api_errors.parse_error("The request body must be a JSON object.")
        return body


_STATUS_TEXT = {
    200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 412: "Precondition Failed",
    429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip
_JSON = "application/json; charset=UTF-8"


def _error_body(error: api_errors.ApiError) -> bytes:
    return json.dumps(error.to_json()).encode()


def answer_batch(dispatcher: Dispatcher, content_type: str | None, body_bytes: bytes) -> tuple[int, str, bytes]:
    """Answers a multipart/mixed batch; returns (status, content type, body bytes).

    Each part is an ``application/http`` request; the answer has one
    ``application/http`` part per request, ``Content-ID: <response-ID>``.
    """
    if "multipart/mixed" not in (content_type or ""):
        return 400, _JSON, _error_body(api_errors.bad_request("A batch request must be multipart/mixed."))
    message = email.parser.Parser().parsestr(f"Content-Type: {content_type}\r\n\r\n" + body_bytes.decode("utf-8", errors="replace"))
    if not message.is_multipart():
        return 400, _JSON, _error_body(api_errors.bad_request("The batch request has no parts."))
    boundary = "batch_" + secrets.token_hex(12)
    chunks = []
    for part in cast(list[email.message.Message], message.get_payload()):
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


def _answer_part(dispatcher: Dispatcher, payload: Any) -> tuple[int, str | None]:
    if isinstance(payload, list):
        return 400, json.dumps(api_errors.bad_request("Nested multipart parts are not supported.").to_json())
    request_line, _, rest = str(payload).lstrip("\r\n").partition("\n")
    pieces = request_line.strip().split(" ")
    if len(pieces) < 2:
        return 400, json.dumps(api_errors.bad_request("Malformed request line in batch part.").to_json())
    method, target = pieces[0].upper(), pieces[1]
    separator = re.search(r"\r?\n\r?\n", rest)
    body = rest[separator.end() :] if separator else ""
    parsed = urllib.parse.urlsplit(target)
    return dispatcher.dispatch(method, parsed.path, parsed.query, body.encode())


class ApiServer(ThreadingHTTPServer):
    """The emulator's HTTP server, answering through ``dispatcher``."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher | None = None, token_check: BearerTokenCheck | None = None) -> None:
        super().__init__(address, ApiRequestHandler)
        self.dispatcher = dispatcher
        self.token_check = token_check


class ApiRequestHandler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection to the API: batches go to ``answer_batch``, the rest to the dispatcher."""

    protocol_version = "HTTP/1.1"
    server_version = "cflow-compute-emulator"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines go to the debug log, not stderr."""
        logger.debug("api: " + format, *args)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, _JSON, _error_body(api_errors.bad_request("Request too large.")))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        server = cast(ApiServer, self.server)
        if server.token_check is not None:
            refusal = server.token_check.refusal(self.headers.get("Authorization"))
            if refusal is not None:
                self._reply(refusal.code, _JSON, _error_body(refusal), refusal.headers)
                return
        parsed = urllib.parse.urlsplit(self.path)
        dispatcher = server.dispatcher
        assert dispatcher is not None, "the emulator sets the dispatcher before serving"
        if self.command == "POST" and parsed.path in BATCH_PATHS:
            status, content_type, data = answer_batch(dispatcher, self.headers.get("Content-Type"), body)
            self._reply(status, content_type, data)
            return
        status, text = dispatcher.dispatch(self.command, parsed.path, parsed.query, body)
        if text is None:
            self._reply(204, None, b"")
        else:
            self._reply(status, _JSON, text.encode())

    def _reply(self, status: int, content_type: str | None, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle
