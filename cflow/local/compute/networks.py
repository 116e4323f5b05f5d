"""networks.* and subnetworks.*, and the networks a VM's interfaces name.

Every project has the ``default`` network (auto mode, one subnet per region
in GCE's auto ranges, ``AUTO_SUBNET_RANGES``) unless the emulator runs with
``--no-default-network``; it appears the first time the project's networks
are looked at, and can be deleted like any other.

Served, with GCE's answers:

- ``networks.insert`` (a global operation): auto mode gets a subnet in every
  region, custom mode none; legacy networks (``IPv4Range``, or no
  ``autoCreateSubnetworks``) are not emulated (400); a taken name is 409;
  ``get``, ``list`` (filter); ``delete`` (a global operation) of a network
  still used by a VM, or with subnets of its own (custom ones), ends with
  ``RESOURCE_IN_USE_BY_ANOTHER_RESOURCE`` in the operation, "The network
  resource '...' is already being used by '...'"; an auto network's own
  subnets go with it;
- ``subnetworks.insert`` (a regional operation): ``network`` and
  ``ipCidrRange`` required, the range a valid /8../29 IPv4 CIDR that
  overlaps no other subnet of the network ("Invalid IPCidrRange: R conflicts
  with existing subnetwork 'S' in region 'G'."); ``get``, ``list``,
  ``aggregatedList``; ``delete`` (400 resourceInUseByAnotherResource while a
  VM uses it, 400 invalidResourceUsage for an auto subnet of an auto
  network); ``setPrivateIpGoogleAccess``.

A VM's interfaces (``Networks.resolve``), as instances.insert checks them:
a network that does not exist is 400 "The referenced network resource
cannot be found."; a subnetwork of the VM's region that does not exist, 400
"The referenced subnetwork resource cannot be found."; a subnetwork of
another region, 404 notFound (GCE does not find it from the VM's region);
a custom-mode network without a subnetwork, 400 "Subnetwork should be
specified for custom subnetmode network"; a subnetwork of another network,
400 badRequest 'Subnetwork "..." is not valid for Network "...".'. Each VM
gets the lowest free address of its subnet (``Networks.assign``); its
ephemeral external IP, when it has an access config, is derived from it.
"""

import dataclasses
import ipaddress
from typing import Any

from cflow.local.compute import api_errors, validation
from cflow.local.compute.accelerators import no_results_warning
from cflow.local.compute.catalog import stable_id
from cflow.local.compute.core import ComputeCore
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.paging import Json, item_list
from cflow.local.compute.resources import fingerprint
from cflow.local.compute.validation import InterfaceRequest, NetworkRef
from cflow.zones import REGION_ZONES

DEFAULT_NETWORK = "default"
DEFAULT_MTU = 1460
MTU_RANGE = (1300, 8896)
SUBNET_PREFIX_RANGE = (8, 29)
# GCE's auto mode ranges (10.128.0.0/9), per region.
AUTO_SUBNET_RANGES = {
    "us-central1": "10.128.0.0/20",
    "europe-west1": "10.132.0.0/20",
    "us-west1": "10.138.0.0/20",
    "asia-east1": "10.140.0.0/20",
    "us-east1": "10.142.0.0/20",
    "europe-west4": "10.164.0.0/20",
}
ROUTING_MODES = ("REGIONAL", "GLOBAL")

NetworkKey = tuple[str, str]  # (project, name)
SubnetworkKey = tuple[str, str, str]  # (project, region, name)


@dataclasses.dataclass(slots=True, eq=False)
class Network:
    """One VPC network. ``auto`` networks have a subnet in every region, made with them."""

    id: int
    name: str
    project: str
    description: str
    auto: bool
    routing_mode: str
    mtu: int
    creation_ts: str

    @property
    def path(self) -> str:
        """``projects/P/global/networks/N``."""
        return f"projects/{self.project}/global/networks/{self.name}"


@dataclasses.dataclass(slots=True, eq=False)
class Subnetwork:
    """One subnet of a network in a region. ``auto`` marks the subnets an auto network made."""

    id: int
    name: str
    project: str
    region: str
    network: str
    ip_range: ipaddress.IPv4Network
    description: str
    private_ip_google_access: bool
    auto: bool
    creation_ts: str

    @property
    def key(self) -> SubnetworkKey:
        """(project, region, name)."""
        return (self.project, self.region, self.name)

    @property
    def path(self) -> str:
        """``projects/P/regions/R/subnetworks/S``."""
        return f"projects/{self.project}/regions/{self.region}/subnetworks/{self.name}"

    def hosts(self) -> tuple[int, int]:
        """The first and last address a VM can get, as integers (GCE keeps the first two and the last two)."""
        return int(self.ip_range.network_address) + 2, int(self.ip_range.broadcast_address) - 2


class Networks:
    """The networks and subnetworks of every project. Call the ``resolve``/``assign`` helpers holding ``core.lock``.

    Args:
        core: the shared state (VMs are found in ``core.instances``).
        default_network: give every project the ``default`` auto network.

    Every API method raises ``ApiError`` as the module docstring lists.
    """

    def __init__(self, core: ComputeCore, default_network: bool = True) -> None:
        self.core = core
        self.default_network = default_network
        self.regions = [region for region in REGION_ZONES if region in set(core.catalog.zone_region.values())]
        self._networks: dict[NetworkKey, Network] = {}
        self._subnetworks: dict[SubnetworkKey, Subnetwork] = {}
        self._projects_seen: set[str] = set()

    # Tables (hold the lock).

    def _ensure_project(self, project: str) -> None:
        """The first look at a project's networks makes its ``default`` network (unless disabled)."""
        if project in self._projects_seen:
            return
        self._projects_seen.add(project)
        if not self.default_network:
            return
        now = self.core.now()
        network = Network(stable_id(f"network/{project}/{DEFAULT_NETWORK}"), DEFAULT_NETWORK, project,
                          "Default network for the project", True, "REGIONAL", DEFAULT_MTU, now)  # fmt: skip
        self._add_network(network, stable=True)

    def _add_network(self, network: Network, stable: bool = False) -> None:
        self._networks[(network.project, network.name)] = network
        if not network.auto:
            return
        for region in self.regions:
            subnet_id = stable_id(f"subnetwork/{network.project}/{region}/{network.name}") if stable else self.core.new_id()
            subnet = Subnetwork(subnet_id, network.name, network.project, region, network.name, ipaddress.IPv4Network(AUTO_SUBNET_RANGES[region]),
                                "", False, True, network.creation_ts)  # fmt: skip
            self._subnetworks[subnet.key] = subnet

    def _network(self, project: str, name: str) -> Network:
        self._ensure_project(project)
        network = self._networks.get((project, name))
        if network is None:
            raise api_errors.not_found(f"projects/{project}/global/networks/{name}")
        return network

    def _subnetwork(self, project: str, region: str, name: str) -> Subnetwork:
        self._ensure_project(project)
        subnet = self._subnetworks.get((project, region, name))
        if subnet is None:
            raise api_errors.not_found(f"projects/{project}/regions/{region}/subnetworks/{name}")
        return subnet

    def _check_region(self, region: str) -> None:
        if region not in self.regions:
            raise api_errors.invalid_field("region", region, "Unknown region.")

    def _users(self, project: str, network: str, subnet: Subnetwork | None = None) -> list[str]:
        """The paths of the VMs on ``network`` (on ``subnet`` only, if given)."""
        users = []
        for instance in self.core.instances.values():
            for interface in instance.network_interfaces:
                if interface.get("networkProject", instance.project) != project or interface["network"] != network:
                    continue
                if subnet is None or (instance.region == subnet.region and interface["subnetwork"] == subnet.name):
                    users.append(f"projects/{instance.project}/zones/{instance.zone}/instances/{instance.name}")
                    break
        return sorted(users)

    # JSON.

    def _network_json(self, network: Network) -> Json:
        base_url = self.core.base_url
        subnets = [subnet for subnet in self._subnetworks.values() if subnet.project == network.project and subnet.network == network.name]
        resource: Json = {
            "kind": "compute#network",
            "id": str(network.id),
            "creationTimestamp": network.creation_ts,
            "name": network.name,
            "selfLink": base_url + network.path,
            "selfLinkWithId": f"{base_url}projects/{network.project}/global/networks/{network.id}",
            "autoCreateSubnetworks": network.auto,
            "routingConfig": {"routingMode": network.routing_mode},
            "mtu": network.mtu,
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL",
        }
        if subnets:
            resource["subnetworks"] = [base_url + subnet.path for subnet in sorted(subnets, key=lambda subnet: subnet.key)]
        if network.description:
            resource["description"] = network.description
        return resource

    def _subnetwork_json(self, subnet: Subnetwork) -> Json:
        base_url = self.core.base_url
        resource: Json = {
            "kind": "compute#subnetwork",
            "id": str(subnet.id),
            "creationTimestamp": subnet.creation_ts,
            "name": subnet.name,
            "network": f"{base_url}projects/{subnet.project}/global/networks/{subnet.network}",
            "ipCidrRange": str(subnet.ip_range),
            "gatewayAddress": str(subnet.ip_range.network_address + 1),
            "region": f"{base_url}projects/{subnet.project}/regions/{subnet.region}",
            "selfLink": base_url + subnet.path,
            "privateIpGoogleAccess": subnet.private_ip_google_access,
            "fingerprint": fingerprint([subnet.id, subnet.private_ip_google_access]),
            "purpose": "PRIVATE",
            "stackType": "IPV4_ONLY",
        }
        if subnet.description:
            resource["description"] = subnet.description
        return resource

    # networks.*

    def insert_network(self, project: str, body: Json | None) -> Json:
        """networks.insert: a global operation, DONE at once."""
        body = _expect_object(body)
        validation.check_name(body.get("name"))
        if body.get("IPv4Range") or body.get("autoCreateSubnetworks") is None:
            raise api_errors.bad_request("The Compute emulator does not create legacy networks; set autoCreateSubnetworks to true or false.")
        auto = body["autoCreateSubnetworks"]
        if not isinstance(auto, bool):
            raise api_errors.invalid_field("resource.autoCreateSubnetworks", auto, "Expected a boolean.")
        routing = body.get("routingConfig") or {}
        routing_mode = (routing.get("routingMode") or "REGIONAL") if isinstance(routing, dict) else None
        if not isinstance(routing_mode, str) or routing_mode not in ROUTING_MODES:
            raise api_errors.invalid_field("resource.routingConfig.routingMode", routing_mode, "Must be REGIONAL or GLOBAL.")
        mtu = validation.parse_int64(body.get("mtu", DEFAULT_MTU), "resource.mtu")
        if not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
            raise api_errors.invalid_field("resource.mtu", mtu, f"The MTU must be between {MTU_RANGE[0]} and {MTU_RANGE[1]}.")
        description = _description(body)
        core = self.core
        with core.lock:
            core.refuse_if_closing()
            self._ensure_project(project)
            if (project, body["name"]) in self._networks:
                raise api_errors.already_exists(f"projects/{project}/global/networks/{body['name']}")
            network = Network(core.new_id(), body["name"], project, description, auto, routing_mode, mtu, core.now())
            self._add_network(network)
            operation = core.new_operation(project, None, "insert", core.base_url + network.path, network.id)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def get_network(self, project: str, name: str) -> Json:
        """networks.get."""
        with self.core.lock:
            return self._network_json(self._network(project, name))

    def list_networks(self, project: str, filter_text: str | None = None) -> Json:
        """networks.list, by name."""
        predicate = compile_filter(filter_text)
        with self.core.lock:
            self._ensure_project(project)
            rendered = [self._network_json(network) for (owner, _), network in sorted(self._networks.items()) if owner == project]
        return item_list(self.core.base_url, "compute#networkList", project, "global/networks", [item for item in rendered if predicate(item)])

    def delete_network(self, project: str, name: str) -> Json:
        """networks.delete: a global operation; a network in use ends it with RESOURCE_IN_USE_BY_ANOTHER_RESOURCE."""
        core = self.core
        with core.lock:
            network = self._network(project, name)
            operation = core.new_operation(project, None, "delete", core.base_url + network.path, network.id)
            own_subnets = [subnet for subnet in self._subnetworks.values() if subnet.project == project and subnet.network == name]
            users = self._users(project, name) + sorted(subnet.path for subnet in own_subnets if not (subnet.auto and network.auto))
            if users:
                message = api_errors.in_use_message("network", network.path, users[0])
                core.finish_operation(operation, [{"code": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "message": message}], 400, "BAD REQUEST")
            else:
                for subnet in own_subnets:
                    del self._subnetworks[subnet.key]
                del self._networks[(project, name)]
                core.finish_operation(operation)
            return operation.to_json(core.base_url)

    # subnetworks.*

    def insert_subnetwork(self, project: str, region: str, body: Json | None) -> Json:
        """subnetworks.insert: a regional operation, DONE at once."""
        self._check_region(region)
        body = _expect_object(body)
        validation.check_name(body.get("name"))
        if not body.get("network"):
            raise api_errors.required("resource.network")
        network_ref = validation.network_reference(body["network"], project, "resource.network")
        ip_range = _cidr(body.get("ipCidrRange"))
        private_access = body.get("privateIpGoogleAccess", False)
        if not isinstance(private_access, bool):
            raise api_errors.invalid_field("resource.privateIpGoogleAccess", private_access, "Expected a boolean.")
        description = _description(body)
        core = self.core
        with core.lock:
            core.refuse_if_closing()
            self._ensure_project(project)
            self._ensure_project(network_ref.project)
            network = self._networks.get((network_ref.project, network_ref.name))
            if network is None or network_ref.project != project:
                raise api_errors.invalid_field("resource.network", network_ref.sent, "The referenced network resource cannot be found.")
            if (project, region, body["name"]) in self._subnetworks:
                raise api_errors.already_exists(f"projects/{project}/regions/{region}/subnetworks/{body['name']}")
            for other in sorted(self._subnetworks.values(), key=lambda subnet: subnet.key):
                if other.project == project and other.network == network.name and other.ip_range.overlaps(ip_range):
                    detail = f"Invalid IPCidrRange: {ip_range} conflicts with existing subnetwork '{other.name}' in region '{other.region}'."
                    raise api_errors.invalid_field("resource.ipCidrRange", str(ip_range), detail)
            subnet = Subnetwork(core.new_id(), body["name"], project, region, network.name, ip_range, description, private_access, False, core.now())
            self._subnetworks[subnet.key] = subnet
            operation = core.new_operation(project, None, "insert", core.base_url + subnet.path, subnet.id, region=region)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def get_subnetwork(self, project: str, region: str, name: str) -> Json:
        """subnetworks.get."""
        self._check_region(region)
        with self.core.lock:
            return self._subnetwork_json(self._subnetwork(project, region, name))

    def list_subnetworks(self, project: str, region: str, filter_text: str | None = None) -> Json:
        """subnetworks.list of a region, by name."""
        self._check_region(region)
        predicate = compile_filter(filter_text)
        with self.core.lock:
            self._ensure_project(project)
            rendered = [self._subnetwork_json(subnet) for key, subnet in sorted(self._subnetworks.items()) if key[:2] == (project, region)]
        items = [item for item in rendered if predicate(item)]
        return item_list(self.core.base_url, "compute#subnetworkList", project, f"regions/{region}/subnetworks", items)

    def aggregated_subnetworks(self, project: str, filter_text: str | None = None) -> Json:
        """subnetworks.aggregatedList: every region's subnets (a NO_RESULTS_ON_PAGE warning for a region without any)."""
        predicate = compile_filter(filter_text)
        with self.core.lock:
            self._ensure_project(project)
            by_region: dict[str, list[Json]] = {}
            for (owner, region, _), subnet in sorted(self._subnetworks.items()):
                rendered = self._subnetwork_json(subnet)
                if owner == project and predicate(rendered):
                    by_region.setdefault(region, []).append(rendered)
        items: dict[str, Any] = {}
        for region in self.regions:
            scope = f"regions/{region}"
            items[scope] = {"subnetworks": by_region[region]} if region in by_region else {"warning": no_results_warning(scope)}
        path = f"projects/{project}/aggregated/subnetworks"
        return {"kind": "compute#subnetworkAggregatedList", "id": path, "items": items, "selfLink": self.core.base_url + path}

    def delete_subnetwork(self, project: str, region: str, name: str) -> Json:
        """subnetworks.delete: a regional operation, DONE at once; refused while a VM uses the subnet."""
        self._check_region(region)
        core = self.core
        with core.lock:
            subnet = self._subnetwork(project, region, name)
            network = self._networks.get((project, subnet.network))
            if subnet.auto and network is not None and network.auto:
                raise api_errors.invalid_resource_usage("Cannot delete auto subnetwork from an auto subnet mode network.")
            users = self._users(project, subnet.network, subnet)
            if users:
                raise api_errors.resource_in_use_by("subnetwork", subnet.path, users[0])
            del self._subnetworks[subnet.key]
            operation = core.new_operation(project, None, "delete", core.base_url + subnet.path, subnet.id, region=region)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    def set_private_ip_google_access(self, project: str, region: str, name: str, body: Json | None) -> Json:
        """subnetworks.setPrivateIpGoogleAccess: a regional operation, DONE at once."""
        self._check_region(region)
        body = _expect_object(body, "subnetworksSetPrivateIpGoogleAccessRequest")
        enabled = body.get("privateIpGoogleAccess")
        if not isinstance(enabled, bool):
            raise api_errors.required("subnetworksSetPrivateIpGoogleAccessRequest.privateIpGoogleAccess")
        core = self.core
        with core.lock:
            subnet = self._subnetwork(project, region, name)
            subnet.private_ip_google_access = enabled
            operation = core.new_operation(project, None, "setPrivateIpGoogleAccess", core.base_url + subnet.path, subnet.id, region=region)
            core.finish_operation(operation)
            return operation.to_json(core.base_url)

    # A VM's interfaces (hold the lock).

    def resolve(self, project: str, region: str, requests: list[InterfaceRequest], field: str) -> list[dict[str, Any]]:
        """Checks what a VM's interfaces name; returns them as the instance keeps them (no address yet).

        Raises:
            ApiError: 400 or 404 as the module docstring lists.
        """
        interfaces = []
        for index, request in enumerate(requests):
            entry_field = f"{field}[{index}]"
            subnet = self._resolve_subnet(project, region, request, entry_field)
            if request.network_ip is not None:
                first, last = subnet.hosts()
                if not first <= int(ipaddress.IPv4Address(request.network_ip)) <= last:
                    detail = f"Requested internal IP is outside the subnetwork CIDR range of '{subnet.path}'."
                    raise api_errors.invalid_field(f"{entry_field}.networkIP", request.network_ip, detail)
            interface: dict[str, Any] = {
                "name": f"nic{index}",
                "network": subnet.network,
                "subnetwork": subnet.name,
                "networkProject": subnet.project,
                "accessConfigs": [dict(config) for config in request.access_configs],
            }
            if request.network_ip is not None:
                interface["networkIP"] = request.network_ip
            interfaces.append(interface)
        return interfaces

    def _resolve_subnet(self, project: str, region: str, request: InterfaceRequest, field: str) -> Subnetwork:
        network_ref = request.network
        if request.subnetwork is not None:
            wanted = request.subnetwork
            if wanted.region != region:
                raise api_errors.not_found(wanted.path)
            self._ensure_project(wanted.project)
            subnet = self._subnetworks.get((wanted.project, wanted.region, wanted.name))
            if subnet is None:
                raise api_errors.invalid_field(f"{field}.subnetwork", wanted.sent, "The referenced subnetwork resource cannot be found.")
            if network_ref is not None:
                network = self._find_network(network_ref, field)
                if (network.project, network.name) != (subnet.project, subnet.network):
                    raise api_errors.bad_request(f'Subnetwork "{subnet.path}" is not valid for Network "{network.name}".')
            return subnet
        network = self._find_network(network_ref or NetworkRef(project, DEFAULT_NETWORK, f"global/networks/{DEFAULT_NETWORK}"), field)
        if not network.auto:
            raise api_errors.invalid_field(field, "", "Subnetwork should be specified for custom subnetmode network")
        auto_subnet = self._subnetworks.get((network.project, region, network.name))
        if auto_subnet is None:
            raise api_errors.invalid_field(f"{field}.subnetwork", "", "The referenced subnetwork resource cannot be found.")
        return auto_subnet

    def _find_network(self, reference: NetworkRef, field: str) -> Network:
        self._ensure_project(reference.project)
        network = self._networks.get((reference.project, reference.name))
        if network is None:
            raise api_errors.invalid_field(f"{field}.network", reference.sent, "The referenced network resource cannot be found.")
        return network

    def assign(
        self, region: str, interfaces: list[dict[str, Any]], count: int, field: str = "resource.networkInterfaces"
    ) -> tuple[list[list[dict[str, Any]]], str | None]:
        """Gives ``count`` VMs their addresses: the lowest free one of each interface's subnet.

        Returns the interfaces of each VM (networkIP, and natIP for an
        ephemeral external IP), and the path of a subnet that ran out (then
        fewer than ``count`` VMs are returned). An address asked for that is
        taken is 400.
        """
        per_vm: list[list[dict[str, Any]]] = [[] for _ in range(count)]
        exhausted = None
        for index, interface in enumerate(interfaces):
            subnet = self._subnetworks[(interface["networkProject"], region, interface["subnetwork"])]
            used = self._used_addresses(subnet)
            if "networkIP" in interface:
                if interface["networkIP"] in used:
                    detail = f"IP address '{interface['networkIP']}' is already being used by another resource."
                    raise api_errors.invalid_field(f"{field}[{index}].networkIP", interface["networkIP"], detail)
                addresses = [interface["networkIP"]] * min(count, 1)
            else:
                addresses = self._free_addresses(subnet, used, count)
            if len(addresses) < len(per_vm):
                exhausted = exhausted or subnet.path
                per_vm = per_vm[: len(addresses)]
            for vm_interfaces, address in zip(per_vm, addresses, strict=False):
                given = dict(interface, networkIP=address, accessConfigs=[dict(config) for config in interface["accessConfigs"]])
                given["natIP"] = "34.{}.{}.{}".format(*address.split(".")[1:])
                vm_interfaces.append(given)
        return per_vm, exhausted

    def _used_addresses(self, subnet: Subnetwork) -> set[str]:
        used = set()
        for instance in self.core.instances.values():
            if instance.region != subnet.region:
                continue
            for interface in instance.network_interfaces:
                if (interface.get("networkProject", instance.project), interface["subnetwork"]) == (subnet.project, subnet.name):
                    used.add(interface["networkIP"])
        return used

    @staticmethod
    def _free_addresses(subnet: Subnetwork, used: set[str], count: int) -> list[str]:
        first, last = subnet.hosts()
        free: list[str] = []
        candidate = first
        while len(free) < count and candidate <= last:
            address = str(ipaddress.IPv4Address(candidate))
            if address not in used:
                free.append(address)
            candidate += 1
        return free


def ip_space_exhausted_error(subnet_path: str) -> dict[str, str]:
    """The operation error of a VM its subnet has no address left for."""
    return {"code": "IP_SPACE_EXHAUSTED", "message": f"IP space of '{subnet_path}' is exhausted."}


def _expect_object(body: Json | None, field: str = "resource") -> Json:
    if not isinstance(body, dict):
        raise api_errors.invalid_field(field, "", "Expected an object.")
    return body


def _description(body: Json) -> str:
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise api_errors.invalid_field("resource.description", "", "Expected a string.")
    return description


def _cidr(value: Any) -> ipaddress.IPv4Network:
    if not value:
        raise api_errors.required("resource.ipCidrRange")
    try:
        ip_range = ipaddress.IPv4Network(value, strict=True)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError):
        raise api_errors.invalid_field("resource.ipCidrRange", value, f"Invalid IPCidrRange: {value}.") from None
    if not SUBNET_PREFIX_RANGE[0] <= ip_range.prefixlen <= SUBNET_PREFIX_RANGE[1]:
        raise api_errors.invalid_field("resource.ipCidrRange", value, f"Invalid IPCidrRange: {value}.")
    return ip_range
