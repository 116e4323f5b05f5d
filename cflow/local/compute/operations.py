"""zoneOperations.*, regionOperations.* and globalOperations.*: get, wait, delete, list.

A global operation has zone and region None; a regional one (subnetworks) has a region and zone None.

Operations themselves are made and finished by the core (``ComputeCore.new_operation``).
"""

from cflow.local.compute import api_errors
from cflow.local.compute.core import ComputeCore, operations_path
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, max_results, page_after, page_token

OPERATION_WAIT_S = 120


class Operations:
    """The operations API over the core's operations table.

    Every method raises ``ApiError``: 404 for an unknown operation, 400 for an
    unknown zone, a bad filter or a bad page token.
    """

    def __init__(self, core: ComputeCore) -> None:
        self.core = core

    def _check_scope(self, zone: str | None, region: str | None = None) -> None:
        if zone is not None:
            self.core.check_zone(zone)
        if region is not None and region not in self.core.catalog.zone_region.values():
            raise api_errors.invalid_field("region", region, "Unknown region.")

    def get(self, project: str, zone: str | None, name: str, region: str | None = None) -> Json:
        """operations.get."""
        self._check_scope(zone, region)
        with self.core.lock:
            return self.core.operation(project, zone, name, region).to_json(self.core.base_url)

    def wait(self, project: str, zone: str | None, name: str, timeout_s: float = OPERATION_WAIT_S, region: str | None = None) -> Json:
        """operations.wait: blocks until the operation is DONE or ``timeout_s`` passes; returns it either way."""
        self._check_scope(zone, region)
        core = self.core
        with core.lock:
            operation = core.operation(project, zone, name, region)
            core.changed.wait_for(lambda: operation.status == "DONE" or core.closing, timeout_s)
            return operation.to_json(core.base_url)

    def delete(self, project: str, zone: str | None, name: str, region: str | None = None) -> None:
        """operations.delete: forgets the operation (204)."""
        self._check_scope(zone, region)
        with self.core.lock:
            self.core.operation(project, zone, name, region)
            del self.core.operations[(project, zone, name)]

    def list_operations(
        self,
        project: str,
        zone: str | None,
        filter_text: str | None = None,
        max_count: str | None = None,
        token: str | None = None,
        region: str | None = None,
    ) -> Json:
        """operations.list: oldest first, in pages of ``maxResults``."""
        self._check_scope(zone, region)
        predicate = compile_filter(filter_text)
        limit = max_results(max_count)
        after = page_after(token)
        after_sequence = int(after) if after and after.isdigit() else 0
        base_url = self.core.base_url
        with self.core.lock:
            items: list[tuple[int, Json]] = []
            more = False
            for operation in sorted(self.core.operations.values(), key=lambda operation: operation.sequence):
                if operation.project != project or operation.zone != zone or operation.region != region or operation.sequence <= after_sequence:
                    continue
                rendered = operation.to_json(base_url)
                if not predicate(rendered):
                    continue
                if len(items) == limit:
                    more = True
                    break
                items.append((operation.sequence, rendered))
        path = operations_path(project, zone, region)
        result: Json = {"kind": "compute#operationList", "id": path, "items": [rendered for _, rendered in items], "selfLink": base_url + path}
        if more:
            result["nextPageToken"] = page_token(str(items[-1][0]))
        return result
