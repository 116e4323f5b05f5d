"""Google API refusals turned into one line the user can act on.

The common failures each get their own line: an API that is not enabled, a
permission the account lacks (naming the role that grants it), a missing
bucket, a quota, a missing image, no credentials. Anything else keeps
Google's own message, still on one line.
"""

import json

from cflow.errors import CloudError, CloudSetupError, ConfigError

SERVICES = {
    "compute": ("Compute Engine", "compute.googleapis.com", "roles/compute.instanceAdmin.v1"),
    "pubsub": ("Pub/Sub", "pubsub.googleapis.com", "roles/pubsub.editor"),
    "storage": ("Cloud Storage", "storage.googleapis.com", "roles/storage.objectAdmin"),
}


def _service_of(error):
    from googleapiclient.errors import HttpError

    if isinstance(error, HttpError):
        return "compute"
    response = getattr(error, "response", None)
    url = str(getattr(response, "url", "") or getattr(getattr(response, "request", None), "url", "") or "")
    if "storage" in url or "/b/" in url or "/o/" in url:
        return "storage"
    return "pubsub"


def _status_reason_message(error):
    """(HTTP status, reason, message) of an HttpError or an api_core exception."""
    from googleapiclient.errors import HttpError

    if isinstance(error, HttpError):
        try:
            body = json.loads(error.content)["error"]
            reasons = [entry.get("reason", "") for entry in body.get("errors", [])]
            details = body.get("details", [])
            reasons += [d.get("reason", "") for d in details if isinstance(d, dict)]
            return error.resp.status, " ".join(reasons), body.get("message", "")
        except (ValueError, KeyError, TypeError):
            return error.resp.status, "", str(error)
    status = getattr(error, "code", None)
    reasons = [str(getattr(error, "reason", "") or "")]
    reasons += [str(detail) for detail in (getattr(error, "details", None) or [])]
    return status, " ".join(reasons), getattr(error, "message", str(error))


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def translate(error, project=None):
    """Returns a ``CflowError`` for a Google API error (HttpError or GoogleAPICallError)."""
    service = _service_of(error)
    name, api, role = SERVICES[service]
    status, reason, message = _status_reason_message(error)
    text = f"{reason} {message}"
    where = f" in project {project}" if project else ""
    if "SERVICE_DISABLED" in text or "accessNotConfigured" in text or "has not been used" in text or "is disabled" in text:
        return CloudSetupError(f"the {name} API is not enabled{where}; enable it: gcloud services enable {api}")
    if "QUOTA_EXCEEDED" in text or "quotaExceeded" in text:
        return CloudError(f"{name} quota exceeded{where}: {_one_line(message)}; ask for more quota or lower WORKER_NODE_CNT")
    if status == 403 or "PERMISSION_DENIED" in text or "insufficientPermissions" in text or "forbidden" in reason:
        return CloudSetupError(
            f"permission denied by {name}{where} ({_one_line(message, 160)}); grant the controller's account {role}"
        )
    if status in (401,) or "UNAUTHENTICATED" in text:
        return CloudSetupError(
            f"{name} rejected the credentials ({_one_line(message, 160)}); run `gcloud auth application-default login` "
            "or check CREDENTIAL_FILE in const.py"
        )
    if status == 404 and service == "storage":
        return ConfigError(f"BUCKET: not found in {name} ({_one_line(message, 160)}); create it or fix BUCKET in const.py")
    return CloudError(f"{name} refused a request: {_one_line(message)}")


def google_error_types():
    """The exception types ``translate`` understands (imported lazily: the clients are heavy)."""
    from google.api_core.exceptions import GoogleAPICallError
    from googleapiclient.errors import HttpError

    return (HttpError, GoogleAPICallError)
