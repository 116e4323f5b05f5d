"""HTTP errors as Compute Engine answers them.

Every refusal the emulator sends is an ``ApiError`` rendered in Google's JSON
error shape::

    {"error": {"code": 404, "message": "...",
               "errors": [{"message": "...", "domain": "global", "reason": "notFound"}]}}

The factory functions below carry GCE's own wording and reasons, so client
code that branches on ``reason`` or status behaves as it would against GCP.
"""

from typing import Any

NAME_REGEX = "(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?|[1-9][0-9]{0,19})"


class ApiError(Exception):
    """One refused API request.

    Args:
        code: HTTP status (400, 403, 404, 409, 412, 429, 503...).
        reason: Google's machine-readable reason (``notFound``, ``invalid``...).
        message: the human-readable message GCE would send.
    """

    def __init__(self, code: int, reason: str, message: str, domain: str = "global") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.domain = domain
        # What some errors carry besides (401: the Authorization header, UNAUTHENTICATED, a challenge).
        self.error_message: str | None = None  # errors[0].message when it differs from the top one
        self.location: str | None = None
        self.location_type: str | None = None
        self.status: str | None = None
        self.details: list[dict[str, Any]] = []
        self.headers: dict[str, str] = {}

    def to_json(self) -> dict[str, Any]:
        """Returns the error body as a JSON-ready dict."""
        entry: dict[str, Any] = {"message": self.error_message or self.message, "domain": self.domain, "reason": self.reason}
        if self.location is not None:
            entry.update(location=self.location, locationType=self.location_type)
        body: dict[str, Any] = {"code": self.code, "message": self.message, "errors": [entry]}
        if self.status is not None:
            body["status"] = self.status
        if self.details:
            body["details"] = [dict(detail) for detail in self.details]
        return {"error": body}


def not_found(resource_path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{resource_path}' was not found")


def already_exists(resource_path: str) -> ApiError:
    return ApiError(409, "alreadyExists", f"The resource '{resource_path}' already exists")


def invalid_field(field: str, value: object, detail: str) -> ApiError:
    return ApiError(400, "invalid", f"Invalid value for field '{field}': '{value}'. {detail}")


def invalid_name(field: str, value: object) -> ApiError:
    return invalid_field(field, value, f"Must be a match of regex '{NAME_REGEX}'")


def required(field: str) -> ApiError:
    return ApiError(400, "required", f"Required field '{field}' not specified")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "badRequest", message)


def parse_error(detail: str) -> ApiError:
    return ApiError(400, "parseError", f"Invalid JSON payload received. {detail}")


def resource_not_ready(resource_path: str) -> ApiError:
    return ApiError(400, "resourceNotReady", f"The resource '{resource_path}' is not ready")


def resource_in_use(resource_path: str, user_path: str) -> ApiError:
    return ApiError(400, "resourceInUseByAnotherResource", f"The disk resource '{resource_path}' is already being used by '{user_path}'")


def invalid_resource_usage(detail: str) -> ApiError:
    return ApiError(400, "invalidResourceUsage", f"Invalid resource usage: '{detail}'.")


def permission_denied(permission: str, resource_path: str) -> ApiError:
    return ApiError(403, "forbidden", f"Required '{permission}' permission for '{resource_path}'")


def condition_not_met(message: str) -> ApiError:
    return ApiError(412, "conditionNotMet", message)


def quota_message(metric: str, limit: float, region: str | None) -> str:
    """GCE's wording of a quota refusal: a regional metric names its region, a project-wide one says "globally"."""
    where = f"in region {region}" if region is not None else "globally"
    return f"Quota '{metric}' exceeded.  Limit: {float(limit)} {where}."


def quota_exceeded(metric: str, limit: float, region: str | None) -> ApiError:
    return ApiError(403, "quotaExceeded", quota_message(metric, limit, region), domain="usageLimits")


def resource_in_use_by(kind: str, resource_path: str, user_path: str) -> ApiError:
    return ApiError(400, "resourceInUseByAnotherResource", in_use_message(kind, resource_path, user_path))


def in_use_message(kind: str, resource_path: str, user_path: str) -> str:
    """``The network resource '...' is already being used by '...'`` (kind: network, subnetwork...)."""
    return f"The {kind} resource '{resource_path}' is already being used by '{user_path}'"


def external_ip_constraint_message(project_number: int, instance_path: str) -> str:
    """What GCE says when ``constraints/compute.vmExternalIpAccess`` refuses a VM an external IP."""
    return (
        f"Constraint constraints/compute.vmExternalIpAccess violated for project {project_number}. "
        f"Add instance {instance_path} to the constraint to use external IP with it."
    )


def rate_limit_exceeded(project: str) -> ApiError:
    return ApiError(
        429,
        "rateLimitExceeded",
        "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
        f"'compute.googleapis.com' for consumer 'project:{project}'.",
    )


def backend_error() -> ApiError:
    return ApiError(503, "backendError", "The service is currently unavailable.")


def unknown_url(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The requested URL {path} was not found on this server.")


AUTH_HELP = "Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
AUTH_REALM = 'Bearer realm="https://accounts.google.com/"'


def _unauthenticated(reason: str, message: str, entry_message: str, challenge: str) -> ApiError:
    error = ApiError(401, reason, message)
    error.error_message = entry_message
    error.location, error.location_type = "Authorization", "header"
    error.status = "UNAUTHENTICATED"
    error.headers["WWW-Authenticate"] = challenge
    return error


def credentials_missing() -> ApiError:
    """401 for a request without credentials, as Google's front end answers it."""
    error = _unauthenticated("required", f"Request is missing required authentication credential. {AUTH_HELP}", "Login Required.", AUTH_REALM)
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING", "domain": "googleapis.com"}
    error.details.append({**info, "metadata": {"service": "compute.googleapis.com"}})
    return error


def credentials_invalid() -> ApiError:
    """401 for a request whose bearer token is not a valid one."""
    return _unauthenticated(
        "authError", f"Request had invalid authentication credentials. {AUTH_HELP}", "Invalid Credentials", AUTH_REALM + ', error="invalid_token"'
    )
