"""--dry-run: reads (the preflight) but never writes; without a cloud to read it still prints the plan, saying what is unchecked."""

import io

import pytest

from cflow import run
from cflow.config import load_config
from cflow.preflight import PreflightFailed, PreflightResult


@pytest.fixture
def config(tmp_path):
    (tmp_path / "const.py").write_text("TASK_MODULE_CMD = 'echo'\nTASKS = ['a', 'b']\nWORKER_NODE_CNT = 4\nVM_EXTERNAL_IP = False\n")
    (tmp_path / "init.sh").write_text("#!/bin/bash\n")
    return load_config(tmp_path / "const.py")


def test_without_a_cloud_to_read_the_plan_is_printed_with_one_line_saying_what_is_unchecked(config):
    out = io.StringIO()
    assert run.dry_run(config, out, clients="no local stack is running in /x (`cflow local up` starts one)") == 0
    lines = out.getvalue().splitlines()
    unchecked = [line for line in lines if line.startswith("preflight:")]
    assert unchecked == ["preflight:    not checked (no local stack is running in /x (`cflow local up` starts one)); "
                         "network, image, account and quotas are unchecked"]
    assert "network:      global/networks/default, no external IP" in lines
    assert "run time:     at most 24 h per worker (GCE deletes it then)" in lines
    assert lines[-1] == "dry run: nothing was created"


def test_what_the_preflight_found_is_part_of_the_plan(config, monkeypatch):
    result = PreflightResult(max_workers=1, checked=["quotas: 1 worker(s) fit (...)"], warnings=["quota: 1 of 2 workers fit"],
                             unchecked=["service account x: IAM cannot be read here"])
    seen = {}

    def preflight(config, clients, properties, wanted, own_vms=None, compute=None):
        seen.update(wanted=wanted, body=properties)
        return result

    monkeypatch.setattr(run, "preflight_run", preflight)
    out = io.StringIO()
    assert run.dry_run(config, out, clients=object()) == 0
    text = out.getvalue()
    assert seen["wanted"] == 2 and "accessConfigs" not in seen["body"]["networkInterfaces"][0]
    assert "preflight:    quotas: 1 worker(s) fit (...)" in text
    assert "warning:      quota: 1 of 2 workers fit" in text
    assert "not checked:  service account x: IAM cannot be read here" in text


def test_a_setting_the_cloud_cannot_honour_fails_the_dry_run_after_the_plan(config, monkeypatch):
    def preflight(*args, **kwargs):
        raise PreflightFailed("VM_NETWORK: network 'foo' does not exist in project p; create it")

    monkeypatch.setattr(run, "preflight_run", preflight)
    out = io.StringIO()
    with pytest.raises(PreflightFailed):
        run.dry_run(config, out, clients=object())
    assert "preflight:    FAILED: VM_NETWORK: network 'foo' does not exist" in out.getvalue()
    assert out.getvalue().rstrip().endswith("dry run: nothing was created")
