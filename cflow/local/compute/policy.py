"""Organization policy: the constraints an organization sets on every project, as GCE enforces them.

One constraint is emulated, ``constraints/compute.vmExternalIpAccess`` with
no VM allowed (``--deny-external-ip``): a VM with an access config (an
external IP) is refused.

- ``instances.insert`` answers at once 412 ``conditionNotMet``:
  "Constraint constraints/compute.vmExternalIpAccess violated for project
  NUMBER. Add instance projects/P/zones/Z/instances/NAME to the constraint to
  use external IP with it." (GCE's words, with the project's number);
- ``instances.bulkInsert`` is accepted, and its operation ends with one
  ``CONDITION_NOT_MET`` error per VM, "Instance 'NAME' creation failed:
  Constraint ...", as GCE reports a constraint met while it creates VMs for
  a request (its upfront validation of a bulk request covers capacity and
  quota only); no VM is created.
"""

from collections.abc import Iterable
from typing import Any

from cflow.local.compute import api_errors
from cflow.local.compute.resources import project_number

EXTERNAL_IP_CONSTRAINT = "constraints/compute.vmExternalIpAccess"
CONDITION_NOT_MET_HTTP = (412, "PRECONDITION FAILED")


def has_external_ip(interfaces: Iterable[dict[str, Any]]) -> bool:
    """True if any interface has an access config."""
    return any(interface.get("accessConfigs") for interface in interfaces)


class OrganizationPolicy:
    """The organization's constraints.

    Args:
        deny_external_ip: ``constraints/compute.vmExternalIpAccess`` allows no VM an external IP.
    """

    def __init__(self, deny_external_ip: bool = False) -> None:
        self.deny_external_ip = deny_external_ip

    def _violation(self, project: str, zone: str, name: str) -> str:
        return api_errors.external_ip_constraint_message(project_number(project), f"projects/{project}/zones/{zone}/instances/{name}")

    def refuse_insert(self, project: str, zone: str, name: str, interfaces: list[dict[str, Any]]) -> None:
        """Raises ApiError 412 conditionNotMet if the policy forbids this VM's external IP."""
        if self.deny_external_ip and has_external_ip(interfaces):
            raise api_errors.condition_not_met(self._violation(project, zone, name))

    def bulk_errors(self, project: str, zone: str, names: list[str], interfaces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``CONDITION_NOT_MET`` operation errors of a bulkInsert of ``names`` ([] if the policy allows them)."""
        if not (self.deny_external_ip and has_external_ip(interfaces)):
            return []
        return [
            {"code": "CONDITION_NOT_MET", "message": f"Instance '{name}' creation failed: {self._violation(project, zone, name)}"} for name in names
        ]
