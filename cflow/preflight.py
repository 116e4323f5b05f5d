"""The preflight: before anything is created or uploaded, can the project run these workers, and how many?

It only reads (``cflow run`` runs it before the upload, ``--dry-run`` instead
of creating anything):

- the zones exist;
- the boot image resolves (VM_STOCK_IMAGE, or VM_IMAGE_NAME);
- VM_NETWORK exists, and VM_SUBNETWORK exists in the zones' region and
  belongs to it (without VM_SUBNETWORK, the network has its own subnetwork
  in each region of the zones: a custom-mode network needs VM_SUBNETWORK);
- the workers' service account exists, where IAM lets the controller read it;
- with GPUs (VM_GPU_TYPE), each zone offers the type (``acceleratorTypes.get``):
  a zone that does not is skipped for creation, with a warning saying so
  (``PreflightResult.zones`` are the zones left), and none left is an
  error; the type attaches to VM_TYPE (``cflow.gpus.machine_type_problem``);
- the machine type is offered, and the regional quotas of ``regions.get``
  hold at least one worker: vCPUs (``CPUS``, a machine family's own metric
  such as ``N2_CPUS``, or ``PREEMPTIBLE_CPUS`` for Spot when the region has
  preemptible quota: see ``cpu_metric``), ``IN_USE_ADDRESSES`` with
  VM_EXTERNAL_IP, ``INSTANCES``, and the GPU metrics of any
  ``guestAccelerators`` in the body (``NVIDIA_T4_GPUS``, or
  ``PREEMPTIBLE_NVIDIA_T4_GPUS`` for Spot when granted:
  ``cflow.gpus.gpu_quota_metric``) with the project's ``GPUS_ALL_REGIONS``.

A setting the cloud cannot honour is a ``PreflightFailed`` (exit 2): one line
naming the setting, what is wrong and how to fix it. Fewer workers than
wanted fitting the quota is a warning, and the run goes on with that many
(``PreflightResult.max_workers``). What the controller may not read is noted
in ``PreflightResult.unchecked`` and left to GCE to refuse at creation
(``cflow.creation`` reacts to that).
"""

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cflow import gpus
from cflow.errors import ConfigError, NotFound, PermissionDenied
from cflow.zones import region_of

if TYPE_CHECKING:
    from cflow.config import Config
    from cflow.gcp.compute import Quota, Vm

log = logging.getLogger(__name__)

QUOTAS_PAGE = "https://console.cloud.google.com/iam-admin/quotas"
PROJECT_GPU_METRIC = gpus.PROJECT_GPU_METRIC


class PreflightFailed(ConfigError):
    """A setting the project cannot honour (a missing network, an image, no quota for one worker): exit 2."""


class ComputeReads(Protocol):
    """What the preflight reads of Compute Engine (``cflow.gcp.compute.Compute``). Each raises ``CloudError``."""

    project: str

    def zone_exists(self, zone: str) -> bool: ...

    def find_image(self, image_url: str) -> dict[str, Any] | None: ...

    def machine_type(self, zone: str, name: str) -> dict[str, Any] | None: ...

    def accelerator_type(self, zone: str, name: str) -> dict[str, Any] | None: ...

    def network(self, name: str, project: str | None = None) -> dict[str, Any] | None: ...

    def subnetwork(self, region: str, name: str, project: str | None = None) -> dict[str, Any] | None: ...

    def region_quotas(self, region: str) -> "dict[str, Quota] | None": ...

    def project_quotas(self) -> "dict[str, Quota]": ...

    def default_service_account(self) -> str | None: ...


class AccountReads(Protocol):
    """Whether a service account exists (``cflow.gcp.iam.ServiceAccounts``): None when that cannot be told."""

    def exists(self, email: str) -> bool | None: ...


@dataclasses.dataclass
class PreflightResult:
    """What the preflight found.

    Attributes:
        max_workers: how many workers the quotas hold at most (None: no limit seen).
        zones: the zones to create workers in, in order: VM_ZONE and
            VM_FALLBACK_ZONES less those that do not offer VM_GPU_TYPE.
        checked: one short line per check that passed, for the dry run.
        warnings: lines the user must see (fewer workers fit than wanted).
        unchecked: what could not be read, one short line each.
    """

    max_workers: int | None = None
    zones: tuple[str, ...] = ()
    checked: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    unchecked: list[str] = dataclasses.field(default_factory=list)


def cpu_metric(machine_type: str, spot: bool, quotas: "Mapping[str, Quota]") -> str:
    """The quota metric a worker's vCPUs count in.

    Spot and preemptible VMs count in ``PREEMPTIBLE_CPUS`` once the region
    has preemptible quota (limit above 0); without it they count in the
    standard metric, as GCE documents. The standard metric is the machine
    family's own when the region lists one (``N2_CPUS``), else ``CPUS``.
    """
    if spot and "PREEMPTIBLE_CPUS" in quotas and quotas["PREEMPTIBLE_CPUS"].limit > 0:
        return "PREEMPTIBLE_CPUS"
    family_metric = f"{machine_type.split('-', 1)[0].upper()}_CPUS"
    return family_metric if family_metric in quotas else "CPUS"


def gpu_metric(accelerator_type: str, spot: bool) -> str:
    """The quota metric of a GPU type: "nvidia-tesla-t4" -> "NVIDIA_T4_GPUS" ("PREEMPTIBLE_NVIDIA_T4_GPUS" for Spot).

    Which of the two a Spot worker counts in depends on the region's grant: ``cflow.gpus.gpu_quota_metric``.
    """
    return gpus.quota_metric_name(accelerator_type, preemptible=spot)


def _quota_fix(metric: str, project: str) -> str:
    more = f"ask for more at {QUOTAS_PAGE}?project={project}"
    if metric == "IN_USE_ADDRESSES":
        return f"{more}, or set VM_EXTERNAL_IP = False"
    if metric.endswith("CPUS"):
        return f"{more}, or lower WORKER_NODE_CNT or pick a smaller VM_TYPE"
    if metric.endswith("GPUS") or metric == PROJECT_GPU_METRIC:
        return f"{more}, or lower WORKER_NODE_CNT or VM_GPU_COUNT, or pick another VM_GPU_TYPE"
    return f"{more}, or lower WORKER_NODE_CNT"


@dataclasses.dataclass(frozen=True)
class _Binding:
    """The quota that holds the fewest workers in a region."""

    metric: str
    region: str
    limit: float
    usage: float
    per_worker: float
    fit: int


class Preflight:
    """Checks a run's settings against the project before anything is created.

    Args:
        config: the run's settings.
        compute: Compute Engine reads (``cflow.gcp.compute.Compute``).
        accounts: IAM reads (``cflow.gcp.iam.ServiceAccounts``); None where there is no IAM (the local cloud).
    """

    def __init__(self, config: "Config", compute: ComputeReads, accounts: AccountReads | None = None) -> None:
        self.config = config
        self.compute = compute
        self.accounts = accounts
        self.project = compute.project

    def check(self, properties: Mapping[str, Any], wanted: int, own_vms: "Sequence[Vm]" = ()) -> PreflightResult:
        """Run every check.

        Args:
            properties: the workers' instance body (``cflow.fleet.worker_instance_properties``).
            wanted: how many workers the run wants at most (``min(WORKER_NODE_CNT, items)``).
            own_vms: the run's VMs already there (a resumed run): they already count in the quotas' usage.
        Returns:
            A ``PreflightResult``.
        Raises:
            PreflightFailed: a setting the project cannot honour; one line naming it.
            ConfigError: a zone does not exist.
            CloudError: Compute Engine could not be read (other than a permission the controller lacks).
        """
        result = PreflightResult(zones=tuple(self.config.zones))
        self._check_zones(result)
        self._guarded(result, "GPU types", lambda: self._check_gpu_zones(properties, result))
        self._guarded(result, "image", lambda: self._check_image(properties, result))
        self._guarded(result, "network", lambda: self._check_network(result))
        self._guarded(result, "service account", lambda: self._check_service_account(properties, result))
        self._guarded(result, "quotas", lambda: self._check_quotas(properties, wanted, own_vms, result))
        return result

    @staticmethod
    def _guarded(result: PreflightResult, what: str, check: Callable[[], None]) -> None:
        """Run a check; what the controller may not read, or the service does not serve, is left to GCE (noted as unchecked)."""
        try:
            check()
        except PermissionDenied as error:
            result.unchecked.append(f"{what}: not readable with these credentials ({error.message})")
        except NotFound as error:
            # A 404 naming no resource: this read is not served here, which proves nothing either way.
            result.unchecked.append(f"{what}: Compute Engine does not answer this read here ({error.message})")

    # -- zones and image ---------------------------------------------------

    def _check_zones(self, result: PreflightResult) -> None:
        for zone in self.config.zones:
            if not self.compute.zone_exists(zone):
                raise ConfigError(
                    f"{self.config.config_path.name}: VM_ZONE/VM_FALLBACK_ZONES: zone {zone} does not exist in project {self.project}; "
                    "pick one from `gcloud compute zones list`"
                )
        result.checked.append(f"zones: {', '.join(self.config.zones)}")

    def _check_image(self, properties: Mapping[str, Any], result: PreflightResult) -> None:
        image = properties["disks"][0]["initializeParams"]["sourceImage"]
        if self.compute.find_image(image) is not None:
            result.checked.append(f"image: {image}")
            return
        if self.config.vm_boot == "image":
            raise PreflightFailed(
                f"VM_IMAGE_NAME: image {image} does not exist; build one with `cflow image build` "
                "or set VM_BOOT = \"stock\" in const.py"
            )
        raise PreflightFailed(
            f"VM_STOCK_IMAGE: image {image} does not exist; set VM_STOCK_IMAGE to a public image "
            "such as 'projects/debian-cloud/global/images/family/debian-12' (`gcloud compute images list`)"
        )

    # -- GPUs --------------------------------------------------------------

    def _check_gpu_zones(self, properties: Mapping[str, Any], result: PreflightResult) -> None:
        """Keep the zones that offer every GPU type of the body; say which are skipped; none left is an error."""
        if self.config.vm_gpu_type is not None:
            problem = gpus.machine_type_problem(self.config.vm_gpu_type, self.config.vm_type)
            if problem:
                raise PreflightFailed(f"VM_TYPE: {problem}; set VM_TYPE to an N1 machine type such as 'n1-standard-4', "
                                      "or pick another VM_GPU_TYPE")
        wanted = [gpus.type_name(str(accelerator["acceleratorType"])) for accelerator in properties.get("guestAccelerators") or []]
        if not wanted:
            return
        offered: list[str] = []
        skipped: list[str] = []
        for zone in result.zones:
            missing = [name for name in wanted if self.compute.accelerator_type(zone, name) is None]
            (skipped if missing else offered).append(zone)
            if missing:
                result.warnings.append(
                    f"VM_GPU_TYPE: zone {zone} does not offer {', '.join(missing)}; no workers are created there "
                    f"(`gcloud compute accelerator-types list --filter=name={missing[0]}` lists the zones that do)"
                )
        types = ", ".join(wanted)
        if not offered:
            raise PreflightFailed(
                f"VM_GPU_TYPE: no zone of the run ({', '.join(skipped)}) offers {types}; set VM_ZONE and VM_FALLBACK_ZONES to zones "
                f"that do (`gcloud compute accelerator-types list --filter=name={wanted[0]}`), or pick another VM_GPU_TYPE"
            )
        result.zones = tuple(offered)
        result.checked.append(f"GPUs: {types} offered in {', '.join(offered)}")

    # -- network -----------------------------------------------------------

    def _check_network(self, result: PreflightResult) -> None:
        setting = self.config.vm_network
        network_project, network_name = _owner_and_name(setting, self.project)
        network = self.compute.network(network_name, network_project)
        if network is None:
            raise PreflightFailed(
                f"VM_NETWORK: network '{network_name}' does not exist in project {network_project}; create it "
                f"(gcloud compute networks create {network_name} --subnet-mode=auto) or set VM_NETWORK in const.py"
            )
        regions = sorted({region_of(zone) for zone in self.config.zones})
        if self.config.vm_subnetwork is not None:
            self._check_subnetwork(network, network_name, regions[0], result)
            return
        auto = bool(network.get("autoCreateSubnetworks"))
        if "subnetworks" not in network and "IPv4Range" in network:
            result.checked.append(f"network: {network_name} (legacy)")
            return
        in_region = {region: [url for url in network.get("subnetworks", []) if f"/regions/{region}/" in url] for region in regions}
        missing = [region for region, urls in in_region.items() if not urls]
        if not auto:
            raise PreflightFailed(
                f"VM_SUBNETWORK: network '{network_name}' is a custom-mode network, so the workers need a subnetwork named; "
                f"set VM_SUBNETWORK to one of its subnetworks in {regions[0]} (`gcloud compute networks subnets list "
                f"--network {network_name} --regions {regions[0]}`)"
            )
        if missing:
            raise PreflightFailed(
                f"VM_NETWORK: network '{network_name}' has no subnetwork in {', '.join(missing)}; add one "
                f"(gcloud compute networks subnets create ...) or pick zones in a region where it has one"
            )
        result.checked.append(f"network: {network_name}, its own subnetwork in {', '.join(regions)}")

    def _check_subnetwork(self, network: Mapping[str, Any], network_name: str, zones_region: str, result: PreflightResult) -> None:
        setting = self.config.vm_subnetwork
        assert setting is not None
        project, name = _owner_and_name(setting, self.project)
        region = setting.split("/regions/", 1)[1].split("/", 1)[0] if "/regions/" in setting else zones_region
        subnetwork = self.compute.subnetwork(region, name, project)
        if subnetwork is None:
            raise PreflightFailed(
                f"VM_SUBNETWORK: subnetwork '{name}' does not exist in region {region} of project {project}; set VM_SUBNETWORK "
                f"to one of `gcloud compute networks subnets list --network {network_name} --regions {region}`, or None"
            )
        belongs_to = str(subnetwork.get("network", "")).rsplit("/", 1)[-1]
        if belongs_to and belongs_to != network_name:
            raise PreflightFailed(
                f"VM_SUBNETWORK: subnetwork '{name}' belongs to network '{belongs_to}', not to VM_NETWORK '{network_name}'; "
                "set VM_NETWORK to its network, or VM_SUBNETWORK to a subnetwork of VM_NETWORK"
            )
        access = "with" if subnetwork.get("privateIpGoogleAccess") else "without"
        result.checked.append(f"network: {network_name}, subnetwork {name} in {region} ({access} Private Google Access)")
        if not self.config.vm_external_ip and not subnetwork.get("privateIpGoogleAccess"):
            result.warnings.append(
                f"VM_EXTERNAL_IP is False and subnetwork '{name}' has no Private Google Access: the workers reach Pub/Sub and "
                f"Cloud Storage only through Cloud NAT (gcloud compute networks subnets update {name} --region {region} "
                "--enable-private-ip-google-access turns it on)"
            )

    # -- service account ---------------------------------------------------

    def _check_service_account(self, properties: Mapping[str, Any], result: PreflightResult) -> None:
        if self.accounts is None:
            return
        email = properties["serviceAccounts"][0]["email"]
        if email == "default":
            email = self.compute.default_service_account()
            if email is None:
                raise PreflightFailed(
                    f"VM_COMPUTE_SERVICE_ACCOUNT: project {self.project} has no default Compute Engine service account; "
                    "set VM_COMPUTE_SERVICE_ACCOUNT to an account's email"
                )
        exists = self.accounts.exists(email)
        if exists is None:
            result.unchecked.append(f"service account {email}: IAM cannot be read here")
        elif not exists:
            raise PreflightFailed(
                f"VM_COMPUTE_SERVICE_ACCOUNT: service account {email} does not exist; create it "
                "(gcloud iam service-accounts create NAME) or set VM_COMPUTE_SERVICE_ACCOUNT in const.py"
            )
        else:
            result.checked.append(f"service account: {email}")

    # -- quotas ------------------------------------------------------------

    def _needs(self, properties: Mapping[str, Any], quotas: "Mapping[str, Quota]", cpus: float) -> dict[str, float]:
        """What one worker takes of each regional quota."""
        scheduling = properties.get("scheduling", {})
        spot = scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))
        needs: dict[str, float] = {cpu_metric(self.config.vm_type, spot, quotas): cpus, "INSTANCES": 1}
        if any(interface.get("accessConfigs") for interface in properties.get("networkInterfaces", [])):
            needs["IN_USE_ADDRESSES"] = 1
        for accelerator in properties.get("guestAccelerators", []) or []:
            metric = gpus.gpu_quota_metric(str(accelerator["acceleratorType"]), spot, quotas)
            needs[metric] = needs.get(metric, 0) + float(accelerator.get("acceleratorCount", 1))
        return needs

    @staticmethod
    def _binding(needs: Mapping[str, float], quotas: "Mapping[str, Quota]", region: str, own: int) -> _Binding | None:
        """The quota that holds the fewest workers (the run's own ``own`` VMs count as fitting); None: no limit listed."""
        tightest: _Binding | None = None
        for metric, per_worker in needs.items():
            quota = quotas.get(metric)
            if quota is None or per_worker <= 0:
                continue  # a metric GCE does not list has no limit to respect
            fit = math.floor(quota.free / per_worker + 1e-9) + own
            if tightest is None or fit < tightest.fit:
                tightest = _Binding(metric, region, quota.limit, quota.usage, per_worker, fit)
        return tightest

    def _check_quotas(self, properties: Mapping[str, Any], wanted: int, own_vms: "Sequence[Vm]", result: PreflightResult) -> None:
        zone = (result.zones or self.config.zones)[0]
        machine = self.compute.machine_type(zone, self.config.vm_type)
        if machine is None:
            raise PreflightFailed(
                f"VM_TYPE: machine type {self.config.vm_type} is not offered in zone {zone}; pick one from "
                f"`gcloud compute machine-types list --zones {zone}`"
            )
        cpus = float(machine.get("guestCpus", 1))
        regions = list(dict.fromkeys(region_of(zone) for zone in result.zones or self.config.zones))
        live_own = [vm for vm in own_vms if vm.status in ("PROVISIONING", "STAGING", "RUNNING")]
        bindings: list[_Binding] = []
        unlimited = False
        for region in regions:
            quotas = self.compute.region_quotas(region)
            if quotas is None:
                result.unchecked.append(f"quotas of {region}: regions.get does not know the region")
                unlimited = True
                continue
            own = sum(1 for vm in live_own if region_of(vm.zone) == region)
            binding = self._binding(self._needs(properties, quotas, cpus), quotas, region, own)
            if binding is None:
                unlimited = True
            else:
                bindings.append(binding)
        fit = None if unlimited else sum(binding.fit for binding in bindings)
        project_binding = self._project_gpus(properties, len(live_own))
        if project_binding is not None:
            bindings.append(project_binding)
            fit = project_binding.fit if fit is None else min(fit, project_binding.fit)
        if fit is None:
            result.checked.append("quotas: no limit listed that a worker counts in")
            return
        tightest = min(bindings, key=lambda binding: binding.fit)
        where = "the project" if tightest.region == "*" else tightest.region
        said = (f"{tightest.metric} in {where}: limit {tightest.limit:g}, {tightest.usage:g} in use, "
                f"{tightest.per_worker:g} per worker")
        if fit <= 0:
            raise PreflightFailed(
                f"quota: no worker fits ({said}); {_quota_fix(tightest.metric, self.project)}"
            )
        result.max_workers = fit
        if fit < wanted:
            result.warnings.append(
                f"quota: {fit} of {wanted} workers fit ({said}); the run goes on with {fit}; "
                f"{_quota_fix(tightest.metric, self.project)}"
            )
        result.checked.append(f"quotas: {fit} worker(s) fit ({said})")

    def _project_gpus(self, properties: Mapping[str, Any], own: int) -> _Binding | None:
        """The project-wide GPU quota, when the workers ask for GPUs."""
        gpus = sum(float(accelerator.get("acceleratorCount", 1)) for accelerator in properties.get("guestAccelerators", []) or [])
        if not gpus:
            return None
        return self._binding({PROJECT_GPU_METRIC: gpus}, self.compute.project_quotas(), "*", own)


def _owner_and_name(setting: str, project: str) -> tuple[str, str]:
    """(project, name) of a setting that is a name in ``project`` or a ``projects/P/.../NAME`` path."""
    if setting.startswith("projects/"):
        return setting.split("/")[1], setting.rsplit("/", 1)[-1]
    return project, setting
