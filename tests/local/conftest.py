"""Fixtures for the Compute emulator's tests: one emulator subprocess per test module, or one per test.

Each of them starts an emulator, so tests using them are marked ``stack``
(see tests/conftest.py).
"""

import pytest

from tests.helpers import compute_client, compute_emulator_process


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """The module's emulator state: VM disks under vms/, images under images/."""
    return tmp_path_factory.mktemp("compute-state")


@pytest.fixture(scope="module")
def compute_emulator(state_dir):
    """The module's Compute emulator subprocess (an EmulatorProcess), with its state in ``state_dir``."""
    with compute_emulator_process("--state-dir", state_dir) as process:
        yield process


@pytest.fixture(scope="module")
def compute(compute_emulator):
    """A googleapiclient compute v1 client pointed at the module's emulator."""
    return compute_client(compute_emulator.base_url)


@pytest.fixture
def start_compute_emulator():
    """``compute_emulator_process`` for a test that needs an emulator with options of its own.

    Use it as ``with start_compute_emulator("--cpu-quota", "8") as emulator:``.
    """
    return compute_emulator_process


@pytest.fixture(scope="module")
def gcloud(compute_emulator, tmp_path_factory):
    """The real gcloud CLI pointed at the module's emulator (``tests.gcloud_support.Gcloud``); skips without gcloud."""
    from tests.gcloud_support import GCLOUD, MISSING_REASON, Gcloud

    if not GCLOUD:
        pytest.skip(MISSING_REASON)
    return Gcloud(compute_emulator.base_url, tmp_path_factory.mktemp("gcloud-config"))
