"""The shutdown script's fast path: nothing in flight means no Python, but the worker is stopped."""

import re
import subprocess

import pytest

from cflow import protocol
from cflow.fleet import SHUTDOWN_SCRIPT


def run_script(tmp_path, inflight):
    """Run the script with ``inflight`` (None, "inflight.json" or "settling.json") in the work dir."""
    home = tmp_path / "home"
    work = home / "cflow"
    work.mkdir(parents=True)
    if inflight:
        (work / inflight).write_text('{"item": "000001"}')
    # A stand-in for the image's Python: it records that the Python hook ran.
    venv_bin = tmp_path / "root" / "opt" / "cflow" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake_python = venv_bin / "python3"
    fake_python.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'python-ran'}\n")
    fake_python.chmod(0o755)
    script = tmp_path / "shutdown.sh"
    script.write_text(SHUTDOWN_SCRIPT)
    result = subprocess.run(["bash", str(script)], env={"HOME": str(home), "CFLOW_VM_ROOT": str(tmp_path / "root"),
                                                       "PATH": "/usr/bin:/bin"}, timeout=30)
    return result.returncode, work, tmp_path / "python-ran"


def test_nothing_in_flight_stops_the_worker_without_python(tmp_path):
    status, work, python_ran = run_script(tmp_path, inflight=None)
    assert status == 0
    assert (work / "stopping").exists()
    assert not python_ran.exists()
    assert "nothing in flight" in (work / "shutdown.log").read_text()


@pytest.mark.parametrize("record", ["inflight.json", "settling.json"])
def test_an_item_running_or_being_recorded_goes_to_the_python_hook(tmp_path, record):
    status, work, python_ran = run_script(tmp_path, inflight=record)
    assert status == 0
    assert python_ran.read_text().strip().endswith("package/shutdown-signal.py")
    assert not (work / "stopping").exists()  # the Python hook sets it, first thing


def test_the_script_names_exactly_the_work_dir_files_of_the_protocol():
    # Every path the script uses is "$CFLOW_DIR/NAME" or, inside the locked sh -c, "$1/NAME".
    named = set(re.findall(r'"\$(?:CFLOW_DIR|1)/([^"]+)"', SHUTDOWN_SCRIPT))
    assert named == {
        protocol.INFLIGHT_FILE,
        protocol.SETTLING_FILE,
        protocol.STOPPING_FLAG,
        protocol.HANDBACK_LOCK,
        protocol.SHUTDOWN_LOG,
        f"{protocol.PACKAGE_DIR}/{protocol.SHUTDOWN_ENTRY}",
    }
