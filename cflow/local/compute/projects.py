"""projects.*: get (``gcloud compute project-info describe``) and setCommonInstanceMetadata.

A project exists as soon as anything names it (the emulator serves any
project). Its ``commonInstanceMetadata`` is what every VM of the project
sees under ``project/attributes/`` on its metadata server; its ``quotas``
are GCE's project-wide (global) quotas: the ones ``--quota`` sets
(``quotas.PROJECT_METRICS``, GPUS_ALL_REGIONS) as ``quotas.Quotas`` counts
them, the others with a new project's limits and their usage counted where
the emulator has the resource (images, networks, subnetworks, vCPUs), else 0.
"""

from collections.abc import Callable

from cflow.local.compute import api_errors, validation
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.networks import Networks
from cflow.local.compute.paging import Json
from cflow.local.compute.quotas import Quotas
from cflow.local.compute.resources import default_service_account, fingerprint, fingerprints_match, project_number

PROJECT_CREATION_TIMESTAMP = "2016-01-01T00:00:00.000-08:00"

# GCE's project-wide quotas and a new project's limits (what ``project-info describe`` shows).
PROJECT_QUOTA_LIMITS: dict[str, float] = {
    "SNAPSHOTS": 5000,
    "NETWORKS": 15,
    "FIREWALLS": 200,
    "IMAGES": 2000,
    "STATIC_ADDRESSES": 8,
    "ROUTES": 250,
    "FORWARDING_RULES": 15,
    "TARGET_POOLS": 50,
    "HEALTH_CHECKS": 75,
    "IN_USE_ADDRESSES": 8,
    "TARGET_INSTANCES": 50,
    "TARGET_HTTP_PROXIES": 10,
    "URL_MAPS": 10,
    "BACKEND_SERVICES": 9,
    "INSTANCE_TEMPLATES": 100,
    "TARGET_VPN_GATEWAYS": 5,
    "VPN_TUNNELS": 10,
    "BACKEND_BUCKETS": 3,
    "ROUTERS": 10,
    "TARGET_SSL_PROXIES": 10,
    "TARGET_HTTPS_PROXIES": 10,
    "SSL_CERTIFICATES": 10,
    "SUBNETWORKS": 100,
    "TARGET_TCP_PROXIES": 10,
    "CPUS_ALL_REGIONS": 32,
    "SECURITY_POLICIES": 10,
    "SECURITY_POLICY_RULES": 200,
    "GLOBAL_INTERNAL_ADDRESSES": 5000,
    "GPUS_ALL_REGIONS": 0,
}

UsageCounter = Callable[[str], float]  # project -> usage of one metric (called without the core's lock)


class Projects:
    """projects.get and projects.setCommonInstanceMetadata of any project.

    Args:
        core: the shared state (``core.project_metadata``; instances, to tell their guests).
        quotas: the emulator's quotas: the project-wide metrics ``--quota`` sets, with their usage.
        quota_limits: metric -> limit shown in ``quotas[]`` for the others (default ``PROJECT_QUOTA_LIMITS``).
        usage_counters: metric -> how to count a project's usage of it (metrics without one show 0).

    API methods raise ``ApiError``: 412 conditionNotMet for a stale metadata
    fingerprint, 400 for a bad metadata body.
    """

    def __init__(
        self,
        core: ComputeCore,
        quotas: Quotas | None = None,
        quota_limits: dict[str, float] | None = None,
        usage_counters: dict[str, UsageCounter] | None = None,
    ) -> None:
        self.core = core
        self.quotas = quotas
        self.quota_limits = dict(PROJECT_QUOTA_LIMITS if quota_limits is None else quota_limits)
        self.usage_counters = dict(usage_counters or {})

    def get(self, project: str) -> Json:
        """projects.get."""
        core = self.core
        # Counters take the locks they need (networks answer through their own API).
        usage = {metric: float(count(project)) for metric, count in self.usage_counters.items()}
        limits = dict(self.quota_limits)
        with core.lock:
            for entry in self.quotas.project_quotas(project) if self.quotas is not None else []:
                limits[entry["metric"]], usage[entry["metric"]] = float(entry["limit"]), float(entry["usage"])
            quotas = [{"metric": metric, "limit": limit, "usage": usage.get(metric, 0.0)} for metric, limit in limits.items()]
            metadata = core.project_metadata_of(project)
            common: Json = {"kind": "compute#metadata", "fingerprint": metadata.fingerprint}
            if metadata.items:
                common["items"] = [dict(item) for item in metadata.items]
        return {
            "kind": "compute#project",
            "id": str(project_number(project)),
            "creationTimestamp": PROJECT_CREATION_TIMESTAMP,
            "name": project,
            "commonInstanceMetadata": common,
            "quotas": quotas,
            "selfLink": f"{core.base_url}projects/{project}",
            "defaultServiceAccount": default_service_account(project),
            "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS",
            "defaultNetworkTier": "PREMIUM",
            "vmDnsSetting": "ZONAL_ONLY",
        }

    def set_common_instance_metadata(self, project: str, body: Json | None) -> Json:
        """projects.setCommonInstanceMetadata: a global operation; every VM of the project sees the new attributes.

        Raises:
            ApiError: 412 conditionNotMet when ``fingerprint`` is not the current one.
        """
        core = self.core
        body = body if body is not None else {}
        items = validation.check_metadata_items(body, "metadata")
        with core.lock:
            metadata = core.project_metadata_of(project)
            if not fingerprints_match(body.get("fingerprint"), metadata.fingerprint):
                raise api_errors.condition_not_met("Supplied fingerprint does not match current metadata fingerprint.")
            operation = core.new_operation(
                project, None, "compute.projects.setCommonInstanceMetadata", f"{core.base_url}projects/{project}", project_number(project)
            )
            metadata.version += 1
            metadata.items = items
            metadata.fingerprint = fingerprint([items, metadata.version])
            for instance in core.instances.values():
                if instance.project == project:
                    instance.metadata_version += 1
            core.finish_operation(operation)
            core.metadata_changed.notify_all()
            return operation.to_json(core.base_url)


def project_usage_counters(core: ComputeCore, networks: Networks | None = None) -> dict[str, UsageCounter]:
    """How the emulator counts the project-wide usage it can see: images, networks, subnetworks, vCPUs of live VMs."""

    def images(project: str) -> float:
        return len(core.catalog.images_of(project))

    def cpus_all_regions(project: str) -> float:
        with core.lock:
            return sum(instance.cpus for instance in core.instances.values() if instance.project == project and instance.status != "TERMINATED")

    counters: dict[str, UsageCounter] = {"IMAGES": images, "CPUS_ALL_REGIONS": cpus_all_regions}
    if networks is not None:
        counters["NETWORKS"] = lambda project: len(networks.list_networks(project)["items"])
        counters["SUBNETWORKS"] = lambda project: sum(
            len(scoped.get("subnetworks", [])) for scoped in networks.aggregated_subnetworks(project)["items"].values()
        )
    return counters
