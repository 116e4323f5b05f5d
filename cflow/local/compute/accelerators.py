"""acceleratorTypes.* (get, list, aggregatedList) and the GPUs an instance asks for (``guestAccelerators``).

The catalog (``GPU_MODELS``) is GCE's: which GPU is offered in which of the
emulator's zones (nvidia-tesla-t4 in us-central1-a but not in us-east1-b, as
on GCE), how many cards one VM may have, and which machine types take it.
T4, V100, P100 and P4 attach to N1 machine types, 1, 2 or 4 cards (V100 also
8), each count up to a vCPU ceiling; L4 and A100 come only with GCE's G2 and
A2 machine types, which the emulator does not offer, so asking for them on
another machine type is refused as GCE refuses it.

``AcceleratorTypes.check`` applies GCE's rules to a VM's accelerators, with
GCE's answers:

- a type the zone does not offer: 404 notFound naming
  ``projects/P/zones/Z/acceleratorTypes/T``;
- a card count GCE does not attach, or more cards than ``maximumCardsPerInstance``:
  400 invalid on ``guestAccelerators[i].acceleratorCount``;
- a machine type with more vCPUs than the cards allow: 400 invalid, "At most
  N vCPUs can be used along with K accelerator cards in an instance.";
- a machine type that cannot take the GPU (E2, shared core, L4/A100 outside
  G2/A2): 400 badRequest, "[TYPE, MACHINE] features are not compatible for
  creating instance.";
- onHostMaintenance MIGRATE (the default of a standard VM): 400 badRequest,
  "Instances with guest accelerators do not support live migration.".

Each GPU model has its quota metric (``NVIDIA_T4_GPUS``...); ``quotas``
counts the cards there.
"""

import dataclasses
from typing import Any

from cflow.local.compute import api_errors
from cflow.local.compute.catalog import CATALOG_TIMESTAMP, Catalog, stable_id
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, item_list
from cflow.local.compute.validation import AcceleratorRequest


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One accelerator type as GCE offers it.

    ``max_vcpus`` maps a card count GCE attaches (to an N1 VM) to the most
    vCPUs a VM with that many cards may have; it is empty for models that
    come only with their own machine types (L4 with G2, A100 with A2).
    """

    name: str
    description: str
    maximum_cards: int
    max_vcpus: dict[int, int]
    quota_metric: str
    zones: frozenset[str]

    @property
    def attaches_to_n1(self) -> bool:
        """True if ``guestAccelerators`` can put this model on an N1 machine type."""
        return bool(self.max_vcpus)


def _zones(text: str) -> frozenset[str]:
    """``"us-central1-abcf us-east1-cd"`` -> the zones."""
    zones: set[str] = set()
    for group in text.split():
        region, _, letters = group.rpartition("-")
        zones.update(f"{region}-{letter}" for letter in letters)
    return frozenset(zones)


GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel(
        "nvidia-tesla-t4", "NVIDIA T4", 4, {1: 48, 2: 48, 4: 96}, "NVIDIA_T4_GPUS",
        _zones("us-central1-abcf us-east1-cd us-west1-ab europe-west1-bcd europe-west4-abc asia-east1-ac"),
    ),
    GpuModel(
        "nvidia-tesla-v100", "NVIDIA V100", 8, {1: 12, 2: 24, 4: 48, 8: 96}, "NVIDIA_V100_GPUS",
        _zones("us-central1-abcf us-east1-c us-west1-ab europe-west4-abc asia-east1-c"),
    ),
    GpuModel(
        "nvidia-tesla-p100", "NVIDIA Tesla P100", 4, {1: 16, 2: 32, 4: 64}, "NVIDIA_P100_GPUS",
        _zones("us-central1-cf us-east1-bc us-west1-ab europe-west1-bd europe-west4-a asia-east1-ac"),
    ),
    GpuModel("nvidia-tesla-p4", "NVIDIA Tesla P4", 4, {1: 24, 2: 48, 4: 96}, "NVIDIA_P4_GPUS", _zones("us-central1-ac europe-west4-bc")),
    GpuModel(
        "nvidia-l4", "NVIDIA L4", 8, {}, "NVIDIA_L4_GPUS",
        _zones("us-central1-abc us-east1-bcd us-west1-abc europe-west1-bc europe-west4-abc asia-east1-abc"),
    ),
    GpuModel(
        "nvidia-tesla-a100", "NVIDIA A100 40GB", 16, {}, "NVIDIA_A100_GPUS",
        _zones("us-central1-abcf us-east1-b us-west1-b europe-west4-ab asia-east1-c"),
    ),
    GpuModel("nvidia-a100-80gb", "NVIDIA A100 80GB", 8, {}, "NVIDIA_A100_80GB_GPUS", _zones("us-central1-ac europe-west4-a")),
)  # fmt: skip
GPU_MODELS_BY_NAME = {model.name: model for model in GPU_MODELS}
LIVE_MIGRATION_REFUSED = "Instances with guest accelerators do not support live migration."


def gpu_metric(type_name: str) -> str:
    """The regional quota metric of a GPU model (``NVIDIA_T4_GPUS``)."""
    return GPU_MODELS_BY_NAME[type_name].quota_metric


class AcceleratorTypes:
    """acceleratorTypes.get/list/aggregatedList of any project, and the accelerator rules of instances.

    Args:
        base_url: ``http://H:P/compute/v1/``.
        catalog: the zones and machine types.

    Every method raises ``ApiError`` as GCE answers (404 for a type the zone
    does not offer, 400 for a bad filter or a VM that breaks a rule above).
    """

    def __init__(self, base_url: str, catalog: Catalog) -> None:
        self.base_url = base_url
        self.catalog = catalog

    def _json(self, project: str, zone: str, model: GpuModel) -> Json:
        return {
            "kind": "compute#acceleratorType",
            "id": str(stable_id(f"acceleratorType/{zone}/{model.name}")),
            "creationTimestamp": CATALOG_TIMESTAMP,
            "name": model.name,
            "description": model.description,
            "zone": zone,
            "selfLink": f"{self.catalog.zone_url(project, zone)}/acceleratorTypes/{model.name}",
            "maximumCardsPerInstance": model.maximum_cards,
        }

    def _offered(self, zone: str) -> list[GpuModel]:
        return sorted((model for model in GPU_MODELS if zone in model.zones), key=lambda model: model.name)

    def get(self, project: str, zone: str, name: str) -> Json:
        """acceleratorTypes.get; 404 for a type the zone does not offer."""
        self.catalog.zone_json(project, zone)
        model = GPU_MODELS_BY_NAME.get(name)
        if model is None or zone not in model.zones:
            raise api_errors.not_found(f"projects/{project}/zones/{zone}/acceleratorTypes/{name}")
        return self._json(project, zone, model)

    def list_types(self, project: str, zone: str, filter_text: str | None = None) -> Json:
        """acceleratorTypes.list of a zone, by name."""
        self.catalog.zone_json(project, zone)
        predicate = compile_filter(filter_text)
        items = [item for item in (self._json(project, zone, model) for model in self._offered(zone)) if predicate(item)]
        return item_list(self.base_url, "compute#acceleratorTypeList", project, f"zones/{zone}/acceleratorTypes", items)

    def aggregated_list(self, project: str, filter_text: str | None = None) -> Json:
        """acceleratorTypes.aggregatedList: every zone's types (a NO_RESULTS_ON_PAGE warning for a zone without any)."""
        predicate = compile_filter(filter_text)
        items: dict[str, Any] = {}
        for zone in self.catalog.zone_names():
            scope = f"zones/{zone}"
            found = [item for item in (self._json(project, zone, model) for model in self._offered(zone)) if predicate(item)]
            items[scope] = {"acceleratorTypes": found} if found else {"warning": no_results_warning(scope)}
        path = f"projects/{project}/aggregated/acceleratorTypes"
        return {"kind": "compute#acceleratorTypeAggregatedList", "id": path, "items": items, "selfLink": self.base_url + path}

    def check(
        self,
        project: str,
        zone: str,
        requests: list[AcceleratorRequest],
        machine_type: str,
        on_host_maintenance: str,
        field: str,
    ) -> list[dict[str, Any]]:
        """Applies GCE's accelerator rules to a VM; returns its ``guestAccelerators`` as the instance keeps them.

        Args:
            requests: the VM's accelerators as sent (``validation.check_guest_accelerators``).
            machine_type: the VM's machine type (a name the catalog knows).
            on_host_maintenance: the VM's scheduling (after defaults).
            field: ``resource.guestAccelerators`` or its bulkInsert path, for messages.
        Returns:
            ``[{"acceleratorType": NAME, "acceleratorCount": N}]``.
        Raises:
            ApiError: 404 notFound, 400 invalid or badRequest as the module docstring lists.
        """
        result = []
        entry = self.catalog.machine_type_entry(machine_type)
        assert entry is not None  # validation took only a machine type the catalog knows (predefined or custom)
        cpus, _, shared, _ = entry
        for index, request in enumerate(requests):
            model = GPU_MODELS_BY_NAME.get(request.type_name)
            if model is None or zone not in model.zones:
                raise api_errors.not_found(f"projects/{project}/zones/{zone}/acceleratorTypes/{request.type_name}")
            count_field = f"{field}[{index}].acceleratorCount"
            if request.count > model.maximum_cards or (model.attaches_to_n1 and request.count not in model.max_vcpus):
                allowed = ", ".join(str(count) for count in sorted(model.max_vcpus)) or str(model.maximum_cards)
                raise api_errors.invalid_field(
                    count_field, request.count, f"The number of {model.name} cards attached to an instance must be one of [{allowed}]."
                )
            if not model.attaches_to_n1 or not machine_type.startswith("n1-") or shared:
                raise api_errors.bad_request(f"[{model.name}, {machine_type}] features are not compatible for creating instance.")
            if cpus > model.max_vcpus[request.count]:
                detail = f"At most {model.max_vcpus[request.count]} vCPUs can be used along with {request.count} accelerator cards in an instance."
                raise api_errors.invalid_field(count_field, request.count, detail)
            result.append({"acceleratorType": model.name, "acceleratorCount": request.count})
        if result and on_host_maintenance != "TERMINATE":
            raise api_errors.bad_request(LIVE_MIGRATION_REFUSED)
        return result


def no_results_warning(scope: str) -> Json:
    """The warning an aggregated list gives a scope without items."""
    return {"code": "NO_RESULTS_ON_PAGE", "message": f"There are no results for scope '{scope}' on this page.", "data": [{"key": "scope", "value": scope}]}
