"""The serial console: a script's output as GCE's script runner logs it (cflow/local/compute/console.py)."""

import os
import re
import signal

import pytest

from cflow.local.compute.console import SerialConsole, exit_message, runner_prefix
from tests.helpers import wait_until

# 2024-06-14 10:24:31 UTC and 2024-06-04 09:05:07 UTC
JUNE_14 = 1718360671.0
JUNE_4 = 1717491907.0
LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d vm-1 google_metadata_script_runner\[4242\]: ")


def test_the_prefix_is_a_journal_line_of_the_runner_in_utc():
    assert runner_prefix(JUNE_14, "my-vm", 1690) == b"Jun 14 10:24:31 my-vm google_metadata_script_runner[1690]: "
    # syslog pads the day with a space, not a zero
    assert runner_prefix(JUNE_4, "my-vm", 7) == b"Jun  4 09:05:07 my-vm google_metadata_script_runner[7]: "


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (0, "startup-script exit status 0"),
        (3, 'Script "startup-script" failed with error: exit status 3'),
        (-signal.SIGKILL, 'Script "startup-script" failed with error: signal: killed'),
        (-signal.SIGTERM, 'Script "startup-script" failed with error: signal: terminated'),
    ],
)
def test_exit_messages_are_the_runners(status, message):
    assert exit_message("startup-script", status) == message


@pytest.fixture
def console():
    console = SerialConsole(wall_clock=lambda: JUNE_14)
    console.start()
    yield console
    console.stop()


def run_through(console, serial_log, chunks, script_name="startup-script", status=0, finish_first=False):
    """Feed ``chunks`` through a script pipe as a child would, then close it; returns the serial log's lines."""
    write_fd, output = console.open_script(str(serial_log), "vm-1", script_name)
    console.attach(output, 4242)
    if finish_first:
        console.finish(output, status)
    for chunk in chunks:
        os.write(write_fd, chunk)
    os.close(write_fd)
    if not finish_first:
        wait_until(lambda: output.closed, what="end of the script's output")
        console.finish(output, status)
    expected_last = f"Finished running {script_name.removesuffix('-script')} scripts."
    text = wait_until(lambda: expected_last in (content := serial_log.read_text()) and content, what="the runner's last line")
    return text.splitlines()


def test_each_line_is_prefixed_and_the_exit_status_comes_last(console, tmp_path):
    serial_log = tmp_path / "serial-port-1.log"
    lines = run_through(console, serial_log, [b"hello\nto std", b"err\r\n", b"no newline at the end"], status=3)
    assert all(LINE.match(line) for line in lines), lines
    messages = [LINE.sub("", line) for line in lines]
    assert messages == [
        "Starting startup scripts (version cflow-emulator).",
        "Found startup-script in metadata.",
        "startup-script: hello",
        "startup-script: to stderr",
        "startup-script: no newline at the end",
        'Script "startup-script" failed with error: exit status 3',
        "Finished running startup scripts.",
    ]


def test_an_exit_seen_before_the_pipe_closes_waits_for_the_last_line(console, tmp_path):
    # A child of the script still holds the pipe after the script exited: its lines come before the exit status.
    serial_log = tmp_path / "serial-port-1.log"
    messages = [LINE.sub("", line) for line in run_through(console, serial_log, [b"late line\n"], "shutdown-script", 0, finish_first=True)]
    assert messages[-3:] == ["shutdown-script: late line", "shutdown-script exit status 0", "Finished running shutdown scripts."]
    assert messages[0] == "Starting shutdown scripts (version cflow-emulator)."


def test_a_long_line_is_cut_and_nothing_is_lost(console, tmp_path):
    serial_log = tmp_path / "serial-port-1.log"
    lines = run_through(console, serial_log, [b"x" * 150_000 + b"\n"])
    pieces = [LINE.sub("", line).removeprefix("startup-script: ") for line in lines if "startup-script: " in line]
    assert "".join(pieces) == "x" * 150_000
