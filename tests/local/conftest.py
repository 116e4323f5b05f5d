"""Fixtures for the Compute emulator's tests: one emulator subprocess per test module."""

import pytest

from cflow.local.compute.testing import compute_client, compute_emulator_process


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """The module's emulator state: VM disks under vms/, images under images/."""
    return tmp_path_factory.mktemp("compute-state")


@pytest.fixture(scope="module")
def emulator(state_dir):
    with compute_emulator_process("--state-dir", state_dir) as process:
        yield process


@pytest.fixture(scope="module")
def compute(emulator):
    """A googleapiclient compute v1 client pointed at the module's emulator."""
    return compute_client(emulator.base_url)
