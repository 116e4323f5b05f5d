"""zoneOperations.*, regionOperations.* and globalOperations.*: get, wait, delete, list; globalOperations.aggregatedList.

A global operation has zone and region None; a regional one (subnetworks) has a region and zone None.

Operations themselves are made and finished by the core (``ComputeCore.new_operation``).
"""

from collections.abc import Callable

from cflow.local.compute import api_errors
from cflow.local.compute.core import ComputeCore, operations_path
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, aggregated_list, max_results, page_after, page_token
from cflow.local.compute.resources import Operation

OPERATION_WAIT_S = 120


def operation_scope(operation: Operation) -> str:
    """The operation's scope in an aggregated list: ``zones/Z``, ``regions/R`` or ``global``."""
    if operation.zone is not None:
        return f"zones/{operation.zone}"
    if operation.region is not None:
        return f"regions/{operation.region}"
    return "global"


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

    def _select(
        self, in_scope: Callable[[Operation], bool], filter_text: str | None, max_count: str | None, token: str | None
    ) -> tuple[list[tuple[Operation, Json]], str | None]:
        """The operations of a page, oldest first: ([(operation, its JSON)], nextPageToken or None)."""
        predicate = compile_filter(filter_text)
        limit = max_results(max_count)
        after = page_after(token)
        after_sequence = int(after) if after and after.isdigit() else 0
        base_url = self.core.base_url
        selected: list[tuple[Operation, Json]] = []
        with self.core.lock:
            for operation in sorted(self.core.operations.values(), key=lambda operation: operation.sequence):
                if operation.sequence <= after_sequence or not in_scope(operation):
                    continue
                rendered = operation.to_json(base_url)
                if not predicate(rendered):
                    continue
                if len(selected) == limit:
                    return selected, page_token(str(selected[-1][0].sequence))
                selected.append((operation, rendered))
        return selected, None

    def list_operations(
        self,
        project: str,
        zone: str | None,
        filter_text: str | None = None,
        max_count: str | None = None,
        token: str | None = None,
        region: str | None = None,
    ) -> Json:
        """operations.list of a zone, a region or the global ones: oldest first, in pages of ``maxResults``."""
        self._check_scope(zone, region)
        selected, next_token = self._select(
            lambda operation: operation.project == project and operation.zone == zone and operation.region == region, filter_text, max_count, token
        )
        path = operations_path(project, zone, region)
        result: Json = {"kind": "compute#operationList", "id": path, "items": [rendered for _, rendered in selected], "selfLink": self.core.base_url + path}
        if next_token:
            result["nextPageToken"] = next_token
        return result

    def aggregated_list(self, project: str, filter_text: str | None = None, max_count: str | None = None, token: str | None = None) -> Json:
        """globalOperations.aggregatedList: every operation of the project by scope (``global``, ``regions/R``, ``zones/Z``), oldest first."""
        selected, next_token = self._select(lambda operation: operation.project == project, filter_text, max_count, token)
        catalog = self.core.catalog
        regions = sorted(set(catalog.zone_region.values()))
        scopes = ["global"] + [f"regions/{region}" for region in regions] + [f"zones/{zone}" for zone in catalog.zone_names()]
        items = [(operation_scope(operation), rendered) for operation, rendered in selected]
        result = aggregated_list(self.core.base_url, "compute#operationAggregatedList", project, "operations", scopes, items)
        if next_token:
            result["nextPageToken"] = next_token
        return result
