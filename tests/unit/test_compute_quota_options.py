"""Quota, policy and network options of the Compute emulator: parsing, limits, and the local stack's options."""

import argparse

import pytest

from cflow.errors import StackError
from cflow.local.compute.emulator import EmulatorOptionError, EmulatorOptions
from cflow.local.compute.quotas import GENEROUS_LIMIT, QuotaLimits, QuotaSetting, parse_quota_setting
from cflow.local.launchers import ComputeOptions
from cflow.local.stack_cli import _compute_options
from cflow.zones import KNOWN_ZONES


def test_quota_settings_read_metric_and_optional_region():
    assert parse_quota_setting("CPUS=24") == QuotaSetting("CPUS", 24.0, None)
    assert parse_quota_setting("us-east1:nvidia_t4_gpus=2") == QuotaSetting("NVIDIA_T4_GPUS", 2.0, "us-east1")
    assert parse_quota_setting("GPUS_ALL_REGIONS=0") == QuotaSetting("GPUS_ALL_REGIONS", 0.0, None)
    for bad, complaint in (
        ("CPUS", "is not METRIC=N"),
        ("CPUS=-1", "is not METRIC=N"),
        ("=4", "is not METRIC=N"),
        ("N2_CPUS=8", "unknown quota metric N2_CPUS"),
        ("us-east1:GPUS_ALL_REGIONS=1", "project-wide"),
    ):
        with pytest.raises(ValueError, match=complaint):
            parse_quota_setting(bad)


def test_limits_a_regional_setting_wins_unset_metrics_are_generous_and_preemptible_ones_not_granted():
    limits = QuotaLimits([QuotaSetting("CPUS", 8.0), QuotaSetting("CPUS", 2.0, "us-west1"), QuotaSetting("CPUS", 16.0)])
    assert limits.limit("CPUS", "us-central1") == 16.0
    assert limits.limit("CPUS", "us-west1") == 2.0
    assert limits.limit("INSTANCES", "us-west1") == GENEROUS_LIMIT
    assert limits.limit("GPUS_ALL_REGIONS", None) == GENEROUS_LIMIT
    assert limits.limit("PREEMPTIBLE_CPUS", "us-west1") == 0.0
    assert limits.limit("PREEMPTIBLE_NVIDIA_T4_GPUS", "us-west1") == 0.0


def test_cpu_quota_is_cpus_everywhere_and_quota_settings_win_over_it():
    options = EmulatorOptions(cpu_quota=8, quotas=[QuotaSetting("CPUS", 4.0, "us-east1")])
    limits = options.quota_limits()
    assert (limits.limit("CPUS", "us-central1"), limits.limit("CPUS", "us-east1")) == (8.0, 4.0)
    with pytest.raises(EmulatorOptionError, match="unknown region 'mars-north1'"):
        EmulatorOptions(quotas=[QuotaSetting("CPUS", 1.0, "mars-north1")]).validate(set(KNOWN_ZONES))


def test_the_local_stack_passes_quota_policy_and_network_options_to_the_emulator():
    options = ComputeOptions(quota=("CPUS=8", "us-east1:NVIDIA_T4_GPUS=1"), deny_external_ip=True, no_default_network=True, cpu_quota=16)
    argv = options.to_argv()
    assert argv == [
        "--cpu-quota", "16", "--quota", "CPUS=8", "--quota", "us-east1:NVIDIA_T4_GPUS=1", "--deny-external-ip", "--no-default-network",
    ]  # fmt: skip
    assert ComputeOptions.from_json(options.to_json()) == options
    assert "--deny-external-ip" not in ComputeOptions().to_argv()
    # A record written before these options existed still reads.
    assert ComputeOptions.from_json({"zone_capacity": ["us-central1-a=1"]}) == ComputeOptions(zone_capacity=("us-central1-a=1",))


def _up_arguments(**overrides):
    values: dict[str, object] = dict(preempt_mean_s=None, zone_capacity=[], cpu_quota=None, quota=[], deny_external_ip=False, no_default_network=False,
                  error_rate=None, boot_delay=None, shutdown_grace=None, seed=None, rate_limit_per_minute=None,
                  resource_not_ready=None, slow_vms=None, slow_factor=None,
                  vm_root=None, no_auth=False)  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_cflow_local_up_checks_quota_options_before_starting_anything():
    assert _compute_options(_up_arguments()) is None
    options = _compute_options(_up_arguments(quota=["CPUS=4"], deny_external_ip=True))
    assert options == ComputeOptions(quota=("CPUS=4",), deny_external_ip=True)
    with pytest.raises(StackError, match="unknown quota metric WIDGETS"):
        _compute_options(_up_arguments(quota=["WIDGETS=3"]))


def test_the_commands_document_the_options(capsys):
    from cflow.cli import main

    for command in (["emulator", "compute", "--help"], ["local", "up", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        text = " ".join(capsys.readouterr().out.split())
        for option in ("--quota", "--cpu-quota", "--deny-external-ip", "--no-default-network"):
            assert option in text, (command, option)
        assert "PREEMPTIBLE_CPUS" in text and "vmExternalIpAccess" in text
