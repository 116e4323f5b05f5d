"""``requestId``: a repeated call with the same id gets the first call's operation back, and nothing is done twice.

Every Compute method that changes something takes an optional ``requestId``
query parameter (the discovery document: "Specify a unique request ID so
that if you must retry your request, the server will know to ignore the
request if it has already been completed ... The request ID must be a valid
UUID with the exception that zero UUID is not supported"). A client whose
``instances.insert`` timed out sends it again with the same id and gets the
same operation, instead of a 409 or a second set of VMs.

``RequestIds.call`` does that for any route: the first call with an id runs
and its operation is remembered (per project); a later call with the same id
gets that operation as it is now, without running; a call made while the
first is still being answered waits for it. A call that was refused (an
``ApiError``) is not remembered, so sending it again runs it again. Ids are
kept for ``RETENTION_S`` (60 minutes, the least Google's APIs promise; GCE
does not document its own figure) after the first call.
"""

import re
import threading
from collections.abc import Callable

from cflow.local.compute import api_errors
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.paging import Answer

RETENTION_S = 3600
UUID_RULE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
ZERO_UUID = "00000000-0000-0000-0000-000000000000"

_OperationRef = tuple[str | None, str]  # (zone or None, operation name)


def check_request_id(request_id: str) -> None:
    """Raises ApiError 400 invalid unless ``request_id`` is a UUID other than the zero UUID."""
    if not UUID_RULE.fullmatch(request_id) or request_id == ZERO_UUID:
        raise api_errors.invalid_field(
            "requestId", request_id, f"The request ID must be a valid UUID with the exception that zero UUID is not supported ({ZERO_UUID})."
        )


class RequestIds:
    """The request ids seen in the last ``retention_s``, each with the operation its call answered.

    Args:
        core: the shared state (operations are read from its table, under its lock).
        retention_s: how long an id is remembered after its first call.
    """

    def __init__(self, core: ComputeCore, retention_s: float = RETENTION_S) -> None:
        self.core = core
        self.retention_s = retention_s
        self._lock = threading.Condition()
        self._done: dict[tuple[str, str], tuple[float, _OperationRef, Answer]] = {}
        self._in_flight: set[tuple[str, str]] = set()

    def call(self, project: str, request_id: str, answer: Callable[[], Answer]) -> Answer:
        """``answer()`` once per (project, request id); later calls get its operation as it is now.

        Raises:
            ApiError: 400 for a malformed id; whatever ``answer`` raises (the id is then forgotten).
        """
        check_request_id(request_id)
        key = (project, request_id)
        with self._lock:
            self._forget_old()
            while key in self._in_flight:
                self._lock.wait()
            remembered = self._done.get(key)
            if remembered is None:
                self._in_flight.add(key)
        if remembered is not None:
            _, reference, first_answer = remembered
            return self._current(project, reference, first_answer)
        try:
            result = answer()
        except BaseException:
            with self._lock:
                self._in_flight.discard(key)
                self._lock.notify_all()
            raise
        with self._lock:
            self._in_flight.discard(key)
            operation = _operation_of(result)
            if operation is not None:
                self._done[key] = (self.core.wall_clock(), operation, result)
            self._lock.notify_all()
        return result

    def _current(self, project: str, reference: _OperationRef, first_answer: Answer) -> Answer:
        zone, name = reference
        with self.core.lock:
            operation = self.core.operations.get((project, zone, name))
            # An operation the table has since forgotten is answered as it was first.
            return operation.to_json(self.core.base_url) if operation is not None else first_answer

    def _forget_old(self) -> None:
        horizon = self.core.wall_clock() - self.retention_s
        # Ids are kept in the order they were first answered: the old ones are at the front.
        while self._done:
            key, (first_s, _, _) = next(iter(self._done.items()))
            if first_s >= horizon:
                break
            del self._done[key]


def _operation_of(result: Answer) -> _OperationRef | None:
    """(zone or None, name) of an answer that is an operation; None for anything else."""
    if not isinstance(result, dict) or result.get("kind") != "compute#operation":
        return None
    zone_url = result.get("zone")
    return (zone_url.rsplit("/", 1)[-1] if isinstance(zone_url, str) else None, str(result["name"]))
