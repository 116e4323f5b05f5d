"""CFlow: one script over many work items on a fleet of Compute Engine VMs."""

__version__ = "0.1.0"
