"""regions.get and regions.list: the emulator's regions, each with its zones and its quotas (``quotas``)."""

from cflow.local.compute import api_errors
from cflow.local.compute.catalog import CATALOG_TIMESTAMP, Catalog, stable_id
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, item_list
from cflow.local.compute.quotas import Quotas
from cflow.zones import REGION_ZONES


class Regions:
    """regions.get/list of any project; ``quotas`` are that project's (limit and usage per metric).

    Args:
        core: the shared state (quota usage is read under its lock).
        quotas: the Quotas.

    Raises ``ApiError`` 404 for an unknown region, 400 for a bad filter.
    """

    def __init__(self, core: ComputeCore, quotas: Quotas) -> None:
        self.core = core
        self.quotas = quotas
        catalog: Catalog = core.catalog
        self.zones_of: dict[str, list[str]] = {}
        for zone in catalog.zone_names():
            region = catalog.region_of(zone)
            assert region is not None
            self.zones_of.setdefault(region, []).append(zone)
        self.names = [region for region in REGION_ZONES if region in self.zones_of]

    def _json(self, project: str, region: str) -> Json:
        base_url = self.core.base_url
        return {
            "kind": "compute#region",
            "id": str(stable_id("region/" + region)),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": region,
            "description": region,
            "status": "UP",
            "zones": [f"{base_url}projects/{project}/zones/{zone}" for zone in self.zones_of[region]],
            "quotas": self.quotas.region_quotas(project, region),
            "selfLink": f"{base_url}projects/{project}/regions/{region}",
            "supportsPzs": False,
        }

    def get(self, project: str, region: str) -> Json:
        """regions.get."""
        if region not in self.zones_of:
            raise api_errors.not_found(f"projects/{project}/regions/{region}")
        with self.core.lock:
            return self._json(project, region)

    def list_regions(self, project: str, filter_text: str | None = None) -> Json:
        """regions.list: every region the filter keeps."""
        predicate = compile_filter(filter_text)
        with self.core.lock:
            regions = [self._json(project, region) for region in self.names]
        return item_list(self.core.base_url, "compute#regionList", project, "regions", [region for region in regions if predicate(region)])
