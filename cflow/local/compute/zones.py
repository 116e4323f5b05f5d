"""zones.*, machineTypes.* and diskTypes.* (get, list, aggregatedList): the catalog's, read-only."""

from cflow.local.compute.catalog import DISK_TYPES, Catalog
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, aggregated_list, item_list


class Zones:
    """zones.get/list, machineTypes and diskTypes get/list/aggregatedList of any project.

    Args:
        base_url: ``http://H:P/compute/v1/``.
        catalog: the zones and machine types.

    Every method raises ``ApiError`` (404 for an unknown zone or machine type,
    400 for a bad filter).
    """

    def __init__(self, base_url: str, catalog: Catalog) -> None:
        self.base_url = base_url
        self.catalog = catalog

    def list_zones(self, project: str, filter_text: str | None = None) -> Json:
        """zones.list: every zone the filter keeps."""
        predicate = compile_filter(filter_text)
        zones = (self.catalog.zone_json(project, name) for name in self.catalog.zone_names())
        return item_list(self.base_url, "compute#zoneList", project, "zones", [zone for zone in zones if predicate(zone)])

    def get_zone(self, project: str, zone: str) -> Json:
        """zones.get."""
        return self.catalog.zone_json(project, zone)

    def list_machine_types(self, project: str, zone: str, filter_text: str | None = None) -> Json:
        """machineTypes.list of a zone: every machine type the filter keeps."""
        self.catalog.zone_json(project, zone)
        predicate = compile_filter(filter_text)
        types = (self.catalog.machine_type_json(project, zone, name) for name in sorted(self.catalog.machine_types))
        return item_list(self.base_url, "compute#machineTypeList", project, f"zones/{zone}/machineTypes", [item for item in types if predicate(item)])

    def aggregated_machine_types(self, project: str, filter_text: str | None = None) -> Json:
        """machineTypes.aggregatedList: every zone's machine types the filter keeps."""
        predicate = compile_filter(filter_text)
        items = []
        for zone in self.catalog.zone_names():
            for name in sorted(self.catalog.machine_types):
                machine_type = self.catalog.machine_type_json(project, zone, name)
                if predicate(machine_type):
                    items.append((f"zones/{zone}", machine_type))
        scopes = [f"zones/{zone}" for zone in self.catalog.zone_names()]
        return aggregated_list(self.base_url, "compute#machineTypeAggregatedList", project, "machineTypes", scopes, items)

    def get_machine_type(self, project: str, zone: str, name: str) -> Json:
        """machineTypes.get."""
        return self.catalog.machine_type_json(project, zone, name)

    def list_disk_types(self, project: str, zone: str, filter_text: str | None = None) -> Json:
        """diskTypes.list of a zone: every disk type the filter keeps."""
        self.catalog.zone_json(project, zone)
        predicate = compile_filter(filter_text)
        types = (self.catalog.disk_type_json(project, zone, name) for name in sorted(DISK_TYPES))
        return item_list(self.base_url, "compute#diskTypeList", project, f"zones/{zone}/diskTypes", [item for item in types if predicate(item)])

    def aggregated_disk_types(self, project: str, filter_text: str | None = None) -> Json:
        """diskTypes.aggregatedList: every zone's disk types the filter keeps."""
        predicate = compile_filter(filter_text)
        items = []
        for zone in self.catalog.zone_names():
            for name in sorted(DISK_TYPES):
                disk_type = self.catalog.disk_type_json(project, zone, name)
                if predicate(disk_type):
                    items.append((f"zones/{zone}", disk_type))
        scopes = [f"zones/{zone}" for zone in self.catalog.zone_names()]
        return aggregated_list(self.base_url, "compute#diskTypeAggregatedList", project, "diskTypes", scopes, items)

    def get_disk_type(self, project: str, zone: str, name: str) -> Json:
        """diskTypes.get."""
        return self.catalog.disk_type_json(project, zone, name)
