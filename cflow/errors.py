"""Errors a user can act on, and the cloud's refusals as CFlow's own classes.

Anything raised as a ``CflowError`` reaches the user as one line on stderr
(what is wrong and how to fix it) and the process exits with ``exit_status``;
a traceback is shown only with ``--debug``.

Every refusal of a Google API is turned, inside ``cflow/gcp/`` and nowhere
else (``cflow.gcp.errors.classify``), into one class of the ``CloudError``
tree below, so the rest of the code reacts to the class and never to a
message's wording:

    CloudError                  anything a cloud service refused
      CloudSetupError           the project is not set up for the run (exit 2)
        ApiNotEnabled           the service's API is off in the project
        PermissionDenied        the account lacks a role
        CredentialsRejected     no usable credentials
      NotFound                  the resource does not exist
        BucketNotFound          ... and it is the bucket (also a ConfigError)
      Conflict                  the resource exists, or is not in the state asked for
        PreconditionFailed      a create-once or generation condition failed
      QuotaExceeded             a resource quota (metric, region, limit)
      ZoneStockout              the zone has no capacity (zone)
      TransientError            worth trying again after a wait
        RateLimited             the service asks us to slow down
        ResourceNotReady        the VM is still being created or stopped (GCE's 400 resourceNotReady)
        ServiceUnreachable      no answer at all (network, endpoint down)
      PermanentRequestError     the request itself is wrong; retrying will not help

How a run ends when the cloud says no: ``WorkersRefused`` (GCE refuses every
worker for good: exit 2) and ``VmsLeftBehind`` (exit 3).

Each keeps the service's own ``status``, ``reason`` and ``message``, and
what GCE's answer named (``field``, ``resource``, ``constraint``) so a
reaction can say which setting to change; ``str(error)`` is CFlow's one line
for the user.

Exit statuses of ``cflow run`` / ``scheduler.py`` (the README lists them too):

    0    every item done, nothing of the run left in the cloud
    1    some items failed (listed with their logs), or a run stopped midway
         and left resumable (a cancel elsewhere, a step failing again and again)
    2    bad configuration or usage: const.py, a setting the cloud refuses
         (preflight, or GCE refusing to create any worker), a missing bucket
    3    the run did not clean up: VMs of the run are still there at the end;
         each is listed with the gcloud command that deletes it
    4    the run reached MAX_COST_USD: the items running then finished, the
         rest were cancelled (not run, not failed) and nothing is left running
    130  interrupted (Ctrl-C)
"""

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_VMS_LEFT = 3
EXIT_COST_CAP = 4
EXIT_INTERRUPTED = 130


class CflowError(Exception):
    """A failure the user can fix; the message is the whole story, on one line."""

    exit_status = EXIT_USAGE


class ConfigError(CflowError):
    """const.py (or a command-line override) is invalid."""


class StackError(CflowError):
    """The local cloud cannot be started, found or stopped."""

    exit_status = 1


class CloudError(CflowError):
    """A cloud service refused a request.

    Args:
        text: CFlow's one line for the user (``str(error)``).
        status: the HTTP status the service answered (None when there was no answer).
        reason: the service's machine-readable reason (GCE's ``reason`` or operation ``code``), or "".
        message: the service's own human-readable message, or "".
        service: "compute", "pubsub" or "storage" when known.

    Attributes set by ``cflow.gcp.errors.classify`` when GCE's answer names them (else None):
        field: the request field refused, e.g. "resource.networkInterfaces[0].network".
        resource: the resource path named, e.g. "projects/p/global/networks/default".
        constraint: the organization policy constraint, e.g. "constraints/compute.vmExternalIpAccess".
    """

    exit_status = 1
    field: str | None = None
    resource: str | None = None
    constraint: str | None = None

    def __init__(self, text: str, status: int | None = None, reason: str = "", message: str = "", service: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.message = message or text
        self.service = service


class CloudSetupError(CloudError):
    """The cloud project is not set up for the run (API off, role missing, no credentials)."""

    exit_status = EXIT_USAGE


class ApiNotEnabled(CloudSetupError):
    """The service's API is not enabled in the project."""


class PermissionDenied(CloudSetupError):
    """The account lacks the permission (a role grants it)."""


class CredentialsRejected(CloudSetupError):
    """There are no credentials, or the service does not accept them."""


class NotFound(CloudError):
    """The resource asked for does not exist."""


class BucketNotFound(NotFound, ConfigError):
    """The bucket named by BUCKET does not exist: a setting to fix, so exit status 2."""

    exit_status = EXIT_USAGE


class Conflict(CloudError):
    """The resource already exists, or is not in the state the request assumed."""


class PreconditionFailed(Conflict):
    """A request's precondition (create only if absent, a generation) did not hold."""


class QuotaExceeded(CloudError):
    """A resource quota of the project refuses more now.

    Attributes (each None when GCE did not say):
        metric: the quota metric, e.g. "CPUS".
        region: the region the quota is of, e.g. "us-central1".
        limit: the quota's limit.
    """

    def __init__(
        self,
        text: str,
        status: int | None = None,
        reason: str = "",
        message: str = "",
        service: str | None = None,
        *,
        metric: str | None = None,
        region: str | None = None,
        limit: float | None = None,
    ) -> None:
        super().__init__(text, status, reason, message, service)
        self.metric = metric
        self.region = region
        self.limit = limit


class ZoneStockout(CloudError):
    """The zone has no capacity for the VMs asked for; another zone may.

    Attributes:
        zone: the zone that stocked out, when known.
    """

    def __init__(
        self, text: str, status: int | None = None, reason: str = "", message: str = "", service: str | None = None, *, zone: str | None = None
    ) -> None:
        super().__init__(text, status, reason, message, service)
        self.zone = zone


class TransientError(CloudError):
    """A failure worth trying again after a wait (5xx, a timeout, a resource not ready yet)."""


class ResourceNotReady(TransientError):
    """GCE's 400 ``resourceNotReady``: the VM (or disk) is still being created or stopped; ask again shortly."""


class RateLimited(TransientError):
    """The service asks for fewer requests (429, rateLimitExceeded)."""


class ServiceUnreachable(TransientError):
    """The service did not answer at all: refused or reset connection, timeout, unknown host."""


class PermanentRequestError(CloudError):
    """The request itself is refused (a missing network, a bad image, a policy): retrying will not help."""


# ---------------------------------------------------------------- how a run ends when the cloud says no


class WorkersRefused(CflowError):
    """GCE refused to create the run's workers for a reason no retry mends, and none of them is alive.

    The run is cancelled (nothing of it left running) and the line quotes
    GCE's reason and message and names the setting to change.

    Attributes:
        error: GCE's refusal, classified.
        setting: the const.py setting to change, when one is to blame.
    """

    exit_status = EXIT_USAGE

    def __init__(self, text: str, error: CloudError, setting: str | None = None) -> None:
        super().__init__(text)
        self.error = error
        self.setting = setting


class VmsLeftBehind(CflowError):
    """The run ended, but VMs of its own are still there (billing): each is named with its gcloud delete command.

    Attributes:
        commands: one ``gcloud compute instances delete ...`` per VM left.
    """

    exit_status = EXIT_VMS_LEFT

    def __init__(self, text: str, commands: list[str]) -> None:
        super().__init__(text)
        self.commands = commands
