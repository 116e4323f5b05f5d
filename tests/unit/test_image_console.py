"""cflow image build reads the build VM's serial console as GCE's script runner writes it."""

import pytest

from cflow.image import READY_LINE, ImageBuilder, ImageBuildError

RUNNER = "Nov 30 15:40:01 build-vm google_metadata_script_runner[812]:"


def test_a_script_line_that_mentions_an_exit_status_is_not_the_scripts_end():
    assert ImageBuilder._outcome_of(f"{RUNNER} startup-script: pip: subprocess exit status 1 (retrying)", "build-vm") is None


def test_the_ready_marker_ends_the_wait():
    assert ImageBuilder._outcome_of(f"{RUNNER} startup-script: {READY_LINE}", "build-vm") == "ready"


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (f"{RUNNER} startup-script exit status 0", "0"),
        (f'{RUNNER} Script "startup-script" failed with error: exit status 3', "3"),
    ],
)
def test_the_runners_exit_lines_before_ready_fail_the_build_naming_the_status(line, status):
    with pytest.raises(ImageBuildError, match=f"ended with exit status {status} before it was ready"):
        ImageBuilder._outcome_of(line, "build-vm")


def test_the_build_script_installs_the_workers_packages_at_the_controllers_versions():
    import importlib.metadata

    from cflow.image import build_script
    from cflow.wheelhouse import WheelhouseSpec

    # The build VM installs through init.sh from the workers' wheelhouse, which holds this controller's versions.
    script = build_script("echo init")
    assert 'CFLOW_INIT_INSTALL_ONLY=1 bash "$ROOT/opt/cflow/init.sh"' in script
    assert f"google-cloud-pubsub=={importlib.metadata.version('google-cloud-pubsub')}" in WheelhouseSpec.for_this_controller().pins
