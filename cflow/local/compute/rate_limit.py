"""``--rate-limit-per-minute N``: GCE's per-project API rate quotas, and the 403 it answers beyond them.

GCE counts requests per project in quota groups, each on its own
(https://cloud.google.com/compute/api-quota): changes ("Queries",
``compute.googleapis.com/default``), ``*.get`` ("Read requests"),
``*.list`` and ``aggregatedList`` ("List requests"), and operation reads
(``*Operations.get`` and ``wait``, "Operation read requests"). It counts
over synchronized one-minute intervals: a group that reaches its limit at
10:00:15 refills at 10:01:00, not 60 s later. Beyond the limit a request is
refused before anything is done, with 403 reason ``rateLimitExceeded``.
``RateLimiter`` gives each group of each project the same limit, ``N``
requests per interval. A batch's parts are requests of their own: each
counts (the batch itself does not); a bulkInsert is one request, however
many VMs it makes.

``RateLimitExceeded`` is that answer, in the shape Google's front end sends
today (a ``google.rpc.ErrorInfo`` with reason ``RATE_LIMIT_EXCEEDED`` in
``details``), e.g. as quoted in hashicorp/terraform-provider-google's
retry tests: "Quota exceeded for quota metric 'Queries' and limit 'Queries
per minute' of service 'compute.googleapis.com' for consumer
'project_number:11111111'." (403, reason ``rateLimitExceeded``, domain
``usageLimits``). The older "per 100 seconds" wording is gone from GCE.
"""

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from cflow.local.compute.api_errors import ApiError
from cflow.local.compute.resources import project_number

logger = logging.getLogger(__name__)

INTERVAL_S = 60
SERVICE = "compute.googleapis.com"
QUOTA_HELP_URL = "https://cloud.google.com/docs/quotas/help/request_increase"


@dataclasses.dataclass(frozen=True)
class QuotaGroup:
    """One of GCE's rate-quota groups: what its refusal names."""

    metric_label: str  # the metric's display name, in the message
    metric: str  # the metric's id, in ErrorInfo.metadata.quota_metric
    limit_name: str  # the limit's id, in ErrorInfo.metadata.quota_limit


QUERIES = QuotaGroup("Queries", f"{SERVICE}/default", "defaultPerMinutePerProject")
READ_REQUESTS = QuotaGroup("Read requests", f"{SERVICE}/read_requests", "ReadRequestsPerMinutePerProject")
LIST_REQUESTS = QuotaGroup("List requests", f"{SERVICE}/list_requests", "ListRequestsPerMinutePerProject")
OPERATION_READS = QuotaGroup("Operation read requests", f"{SERVICE}/operation_read_requests", "OperationReadRequestsPerMinutePerProject")

# The last path segment of a list call (GET of a collection).
_COLLECTIONS = frozenset(
    {
        "zones", "regions", "instances", "disks", "images", "machineTypes", "operations", "networks", "subnetworks",
        "acceleratorTypes", "diskTypes", "snapshots", "addresses", "firewalls", "routes",
    }
)  # fmt: skip


def quota_group(method: str, relative_path: str) -> QuotaGroup:
    """The group a request counts in.

    Args:
        method: the HTTP method.
        relative_path: the path after ``/compute/v1/`` (``projects/P/zones/Z/instances``...).
    """
    segments = relative_path.strip("/").split("/")
    if "operations" in segments[:-1] and (method == "GET" or segments[-1] == "wait"):
        return OPERATION_READS
    if method != "GET":
        return QUERIES
    if "aggregated" in segments or segments[-1] in _COLLECTIONS:
        return LIST_REQUESTS
    return READ_REQUESTS


class RateLimitExceeded(ApiError):
    """403 ``rateLimitExceeded``: a project's group is over its limit for this interval.

    Args:
        project: the project refused.
        group: the group over its limit.
        limit: the group's limit per interval.
    """

    def __init__(self, project: str, group: QuotaGroup, limit: int) -> None:
        number = project_number(project)
        message = (
            f"Quota exceeded for quota metric '{group.metric_label}' and limit '{group.metric_label} per minute' "
            f"of service '{SERVICE}' for consumer 'project_number:{number}'."
        )
        super().__init__(403, "rateLimitExceeded", message, domain="usageLimits")
        self.project_number = number
        self.group = group
        self.limit = limit

    def to_json(self) -> dict[str, Any]:
        """Google's error body, with ``status`` and the ErrorInfo and Help details."""
        body = super().to_json()
        body["error"]["status"] = "PERMISSION_DENIED"
        body["error"]["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "RATE_LIMIT_EXCEEDED",
                "domain": "googleapis.com",
                "metadata": {
                    "service": SERVICE,
                    "consumer": f"projects/{self.project_number}",
                    "quota_metric": self.group.metric,
                    "quota_limit": self.group.limit_name,
                    "quota_limit_value": str(self.limit),
                    "quota_location": "global",
                    "quota_unit": "1/min/{project}",
                },
            },
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Request a higher quota limit.", "url": QUOTA_HELP_URL}]},
        ]
        return body


class RateLimiter:
    """Counts each project's requests per quota group and interval; refuses those beyond ``limit_per_minute``.

    Args:
        limit_per_minute: requests each group of each project may make per interval (at least 1).
        wall_clock: ``time.time``-like; intervals start on the minute, as GCE's do.

    Thread-safe: the API server answers on many threads.
    """

    def __init__(self, limit_per_minute: int, wall_clock: Callable[[], float]) -> None:
        if limit_per_minute < 1:
            raise ValueError(f"limit_per_minute must be at least 1, not {limit_per_minute}")
        self.limit_per_minute = limit_per_minute
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._interval = -1
        self._counts: dict[tuple[str, QuotaGroup], int] = {}

    def admit(self, project: str, method: str, relative_path: str) -> None:
        """Counts one request; raises RateLimitExceeded (and counts nothing) if its group is at its limit."""
        group = quota_group(method, relative_path)
        interval = int(self._wall_clock() // INTERVAL_S)
        with self._lock:
            if interval != self._interval:
                # A new interval: every group of every project refills at once.
                self._interval = interval
                self._counts.clear()
            key = (project, group)
            used = self._counts.get(key, 0)
            if used >= self.limit_per_minute:
                refused = True
            else:
                self._counts[key] = used + 1
                refused = False
        if refused:
            logger.info("rate limit: %s of project %s is at %d requests this minute", group.metric_label, project, self.limit_per_minute)
            raise RateLimitExceeded(project, group, self.limit_per_minute)
