"""Google's refusals turned into CFlow's own exception classes (see ``cflow.errors``).

``classify`` is the one place that reads a Google error: a googleapiclient
``HttpError``, a ``google.api_core`` exception, a google-auth error, a
transport error (no answer at all), or one entry of a Compute operation's
``error.errors`` (``classify_operation_error``). It returns a ``CloudError``
subclass that keeps the service's status, reason and message (and the
request field, resource and policy constraint GCE's message names), and whose
text is one line the user can act on: an API that is not enabled, a
permission the account lacks (naming the role that grants it), a missing
bucket, a quota, rejected credentials. The seams (``Compute``, ``PubSub``,
``RunStorage``, ``Bucket``) raise only these classes: ``translated`` wraps
their methods.

The rules are data (the reason sets below), checked in order; the first that
matches decides the class. Two of GCE's answers look alike and are not: a
rate limit ("Quota exceeded for quota metric 'Queries' and limit 'Queries per
minute'", reason ``rateLimitExceeded``) is a ``RateLimited``, never a
``QuotaExceeded``; a resource quota ("Quota 'CPUS' exceeded", reason
``quotaExceeded`` at once or code ``QUOTA_EXCEEDED`` in an operation) is a
``QuotaExceeded`` whose ``metric`` is GCE's metric name as ``regions.get``
lists it (``CPUS``, ``PREEMPTIBLE_CPUS``, ``IN_USE_ADDRESSES``...).
"""

import errno
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, ParamSpec, TypedDict, TypeVar

from cflow.errors import (
    ApiNotEnabled,
    BucketNotFound,
    CloudError,
    Conflict,
    CredentialsRejected,
    NotFound,
    PermanentRequestError,
    PermissionDenied,
    PreconditionFailed,
    QuotaExceeded,
    RateLimited,
    ResourceNotReady,
    ServiceUnreachable,
    TransientError,
    ZoneStockout,
)

SERVICES = {
    "compute": ("Compute Engine", "compute.googleapis.com", "roles/compute.instanceAdmin.v1"),
    "pubsub": ("Pub/Sub", "pubsub.googleapis.com", "roles/pubsub.editor"),
    "storage": ("Cloud Storage", "storage.googleapis.com", "roles/storage.objectAdmin"),
}

API_DISABLED_MARKS = ("SERVICE_DISABLED", "accessNotConfigured", "has not been used", "is disabled")
RATE_LIMIT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}
QUOTA_REASONS = {"QUOTA_EXCEEDED", "quotaExceeded"}
STOCKOUT_REASONS = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
PERMISSION_REASONS = {"PERMISSION_DENIED", "insufficientPermissions", "forbidden"}
CREDENTIALS_REASONS = {"UNAUTHENTICATED", "authError"}
# 400s that mean "not yet", not "never": GCE answers resourceNotReady while a disk or VM is settling.
NOT_READY_REASONS = {"resourceNotReady", "RESOURCE_NOT_READY"}
TRANSIENT_REASONS = NOT_READY_REASONS | {"backendError", "internalError", "INTERNAL_ERROR"}
# What googleapiclient itself treats as a lost connection worth retrying.
TRANSPORT_ERRNOS = {errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ECONNRESET}
QUOTA_MESSAGE_RE = re.compile(r"Quota '(?P<metric>[^']+)' exceeded\.\s*Limit: (?P<limit>[0-9.]+)(?: in region (?P<region>[a-z0-9-]+))?")
# A rate limit in a quota's words: a limit "per minute" (or second, day) on requests, not on resources.
RATE_QUOTA_RE = re.compile(r"quota metric '[^']+' and limit '[^']*per (?:minute|second|100 seconds|day)", re.IGNORECASE)
# What GCE's messages name, read once here so the rest of CFlow never reads wording.
FIELD_RE = re.compile(r"field '(?P<field>[^']+)'")
RESOURCE_RE = re.compile(r"resource '(?P<resource>(?:projects/|https?://|global/|regions/|zones/)[^']+)'")
SERVICE_ACCOUNT_RE = re.compile(r"(?i)service ?accounts? '?(?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)")
CONSTRAINT_RE = re.compile(r"\b(?P<constraint>constraints/[A-Za-z0-9_.]+)")


class _Refusal(NamedTuple):
    """What a Google error says, whatever its type."""

    status: int | None
    reasons: tuple[str, ...]  # machine-readable reasons, the service's own first
    message: str
    document: Any  # the decoded JSON error, searched for quotaInfo
    details: tuple[str, ...] = ()  # api_core's error details as text: matched, not kept


class _Details(TypedDict):
    """What every classified error keeps of the service's answer."""

    status: int | None
    reason: str
    message: str
    service: str | None


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def _google_types() -> dict[str, tuple[type[BaseException], ...]]:
    """The Google exception types, imported on first use: the clients are heavy."""
    import httplib2
    import requests
    from google.api_core import exceptions as api_core
    from google.auth import exceptions as auth
    from googleapiclient.errors import HttpError

    return {
        "http": (HttpError,),
        "api_core": (api_core.GoogleAPICallError,),
        "retry": (api_core.RetryError,),
        "credentials": (auth.RefreshError, auth.DefaultCredentialsError),
        "transport": (
            ConnectionError,
            TimeoutError,
            httplib2.ServerNotFoundError,
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            auth.TransportError,
        ),
    }


def _is_transport_error(error: BaseException) -> bool:
    if isinstance(error, _google_types()["transport"]):
        return True
    import ssl

    return isinstance(error, ssl.SSLError) or (isinstance(error, OSError) and error.errno in TRANSPORT_ERRNOS)


def is_google_error(error: BaseException) -> bool:
    """True for the errors ``classify`` reads: Google's API, auth and transport errors."""
    types = _google_types()
    return isinstance(error, types["http"] + types["api_core"] + types["retry"] + types["credentials"]) or _is_transport_error(error)


def _service_of(error: BaseException) -> str:
    if isinstance(error, _google_types()["http"]):
        return "compute"
    response = getattr(error, "response", None)
    url = str(getattr(response, "url", "") or getattr(getattr(response, "request", None), "url", "") or "")
    if "storage" in url or "/b/" in url or "/o/" in url:
        return "storage"
    return "pubsub"


def _refusal_of(error: BaseException) -> _Refusal:
    if isinstance(error, _google_types()["http"]):
        http_status = int(getattr(getattr(error, "resp", None), "status", 0) or 0) or None
        try:
            document = json.loads(getattr(error, "content", b""))
            body = document["error"]
            reasons = [entry.get("reason", "") for entry in body.get("errors", [])]
            reasons += [detail.get("reason", "") for detail in body.get("details", []) if isinstance(detail, dict)]
            return _Refusal(http_status, tuple(r for r in reasons if r), str(body.get("message", "")), document)
        except (ValueError, KeyError, TypeError, AttributeError):
            return _Refusal(http_status, (), str(error), None)
    code = getattr(error, "code", None)
    details = list(getattr(error, "details", None) or [])
    reason = str(getattr(error, "reason", "") or "")
    message = getattr(error, "message", None) or str(error)
    return _Refusal(code if isinstance(code, int) else None, (reason,) if reason else (), str(message), details, tuple(map(str, details)))


def _walk(document: Any) -> Iterator[Mapping[str, Any]]:
    """Every dict inside a decoded JSON document, depth first."""
    if isinstance(document, Mapping):
        yield document
        for value in document.values():
            yield from _walk(value)
    elif isinstance(document, list):
        for value in document:
            yield from _walk(value)


def quota_metric_name(name: str) -> str:
    """GCE's quota metric as ``regions.get`` lists it: "compute.googleapis.com/n2_cpus" -> "N2_CPUS"."""
    return name.rsplit("/", 1)[-1].upper()


def quota_details(message: str, document: Any = None) -> tuple[str | None, str | None, float | None]:
    """(metric, region, limit) of a quota refusal: from GCE's message and its ``quotaInfo``, whichever says it.

    The metric is named as ``regions.get`` lists it (``CPUS``, ``IN_USE_ADDRESSES``).
    """
    metric: str | None = None
    region: str | None = None
    limit: float | None = None
    match = QUOTA_MESSAGE_RE.search(message)
    if match:
        metric, region, limit = match.group("metric"), match.group("region"), float(match.group("limit"))
    for entry in _walk(document):
        info = entry.get("quotaInfo")
        if isinstance(info, Mapping):
            dimensions = info.get("dimensions") or {}
            info_limit = info.get("limit")
            info_metric = info.get("metricName") or info.get("limitName")
            metric = metric or (quota_metric_name(str(info_metric)) if info_metric else None)
            region = region or (dimensions.get("region") if isinstance(dimensions, Mapping) else None)
            if limit is None and isinstance(info_limit, (int, float)):
                limit = float(info_limit)
            break
    return metric, region, limit


def _subject(error: CloudError, message: str) -> CloudError:
    """Note on ``error`` the request field, resource and policy constraint GCE's message names."""
    for attribute, pattern in (("field", FIELD_RE), ("resource", RESOURCE_RE), ("constraint", CONSTRAINT_RE)):
        match = pattern.search(message)
        if match:
            setattr(error, attribute, match.group(attribute))
    account = SERVICE_ACCOUNT_RE.search(message)
    if account and error.resource is None:
        error.resource = f"serviceAccounts/{account.group('email')}"
    return error


def _classify_refusal(refusal: _Refusal, service: str, project: str | None, zone: str | None) -> CloudError:
    return _subject(_class_of_refusal(refusal, service, project, zone), refusal.message)


def _class_of_refusal(refusal: _Refusal, service: str, project: str | None, zone: str | None) -> CloudError:
    name, api, role = SERVICES[service]
    status, reasons, message = refusal.status, set(refusal.reasons), refusal.message
    text = " ".join((*refusal.reasons, *refusal.details, message))
    where = f" in project {project}" if project else ""
    details: _Details = {"status": status, "reason": refusal.reasons[0] if refusal.reasons else "", "message": message, "service": service}
    if any(mark in text for mark in API_DISABLED_MARKS):
        return ApiNotEnabled(f"the {name} API is not enabled{where}; enable it: gcloud services enable {api}", **details)
    if status == 429 or reasons & RATE_LIMIT_REASONS or RATE_QUOTA_RE.search(message):
        return RateLimited(f"{name} is limiting the rate of requests{where}: {_one_line(message)}; wait a little and try again", **details)
    if reasons & QUOTA_REASONS or any(mark in text for mark in QUOTA_REASONS):
        metric, region, limit = quota_details(message, refusal.document)
        return QuotaExceeded(
            f"{name} quota exceeded{where}: {_one_line(message)}; ask for more quota or lower WORKER_NODE_CNT",
            metric=metric, region=region, limit=limit, **details,
        )
    if reasons & STOCKOUT_REASONS:
        return ZoneStockout(f"zone {zone or 'unknown'}: {_one_line(message)}", zone=zone, **details)
    if status == 403 or reasons & PERMISSION_REASONS:
        return PermissionDenied(f"permission denied by {name}{where} ({_one_line(message, 160)}); grant the controller's account {role}", **details)
    if status == 401 or reasons & CREDENTIALS_REASONS:
        return CredentialsRejected(
            f"{name} rejected the credentials ({_one_line(message, 160)}); run `gcloud auth application-default login` "
            "or check CREDENTIAL_FILE in const.py",
            **details,
        )
    refused = f"{name} refused a request: {_one_line(message)}"
    if status == 404:
        if service == "storage":
            return BucketNotFound(f"BUCKET: not found in {name} ({_one_line(message, 160)}); create it or fix BUCKET in const.py", **details)
        return NotFound(refused, **details)
    if reasons & NOT_READY_REASONS:
        return ResourceNotReady(refused, **details)
    if status == 412 and CONSTRAINT_RE.search(message):
        # An organization policy (GCE answers 412 conditionNotMet): no retry or precondition mends it.
        return PermanentRequestError(refused, **details)
    if status == 412:
        return PreconditionFailed(refused, **details)
    if status == 409:
        return Conflict(refused, **details)
    if status is None or status >= 500 or status == 408 or reasons & TRANSIENT_REASONS:
        return TransientError(refused, **details)
    return PermanentRequestError(refused, **details)


def classify(error: BaseException, service: str | None = None, project: str | None = None, zone: str | None = None) -> CloudError:
    """The ``CloudError`` for a Google error.

    Args:
        error: an HttpError, a google.api_core or google-auth exception, or a
            transport error (see ``is_google_error``).
        service: "compute", "pubsub" or "storage"; guessed from the error when None.
        project: named in the user's line when given.
        zone: the zone the request was for (named by a stockout).
    Returns:
        The classified error (not raised); its text is one line.
    """
    service = service or _service_of(error)
    name = SERVICES[service][0]
    types = _google_types()
    if isinstance(error, types["credentials"]):
        return CredentialsRejected(
            f"{name} rejected the credentials ({_one_line(error, 160)}); run `gcloud auth application-default login` "
            "or check CREDENTIAL_FILE in const.py",
            message=str(error), service=service,
        )
    if isinstance(error, types["retry"]):
        cause = getattr(error, "cause", None)
        if cause is not None and is_google_error(cause):
            return classify(cause, service, project, zone)
        return TransientError(f"{name} did not answer in time: {_one_line(error)}", message=str(error), service=service)
    if _is_transport_error(error) and not isinstance(error, types["http"] + types["api_core"]):
        return ServiceUnreachable(
            f"cannot reach {name} ({_one_line(error, 160)}); check the network (locally: `cflow local status`)",
            message=str(error), service=service,
        )
    return _classify_refusal(_refusal_of(error), service, project, zone)


def classify_operation_error(entry: Mapping[str, Any], zone: str | None = None, project: str | None = None) -> CloudError:
    """The ``CloudError`` for one entry of a Compute operation's ``error.errors`` (``{"code", "message", ...}``)."""
    code = str(entry.get("code", ""))
    refusal = _Refusal(None, (code,) if code else (), str(entry.get("message", "") or code), entry)
    error = _classify_refusal(refusal, "compute", project, zone)
    # An operation carries no HTTP status; "unknown" is not "try again": only known transient codes are.
    if type(error) is TransientError and code not in TRANSIENT_REASONS:
        return _subject(PermanentRequestError(str(error), status=None, reason=code, message=error.message, service="compute"), refusal.message)
    return error


def is_transient(error: BaseException) -> bool:
    """True for a Google error worth sending again after a wait (5xx, 429, rate limits, no answer)."""
    if isinstance(error, CloudError):
        return isinstance(error, TransientError)
    return is_google_error(error) and isinstance(classify(error), TransientError)


P = ParamSpec("P")
R = TypeVar("R")


def translated(service: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a seam method so a Google error leaves it as its ``CloudError`` (the Google error as its cause).

    The project named in the user's line is the seam's ``project`` attribute, when it has one.
    """

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except Exception as error:
                if isinstance(error, CloudError) or not is_google_error(error):
                    raise
                project = getattr(args[0], "project", None) if args else None
                raise classify(error, service, project if isinstance(project, str) else None) from error

        return wrapper

    return decorate
