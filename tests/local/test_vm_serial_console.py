"""The serial console of an emulated VM shows its scripts' output as GCE's script runner logs it."""

import re

from tests.helpers import instance_body, wait_operation, wait_until

PROJECT = "serial-project"
ZONE = "us-central1-a"
# Mmm dd HH:MM:SS NAME google_metadata_script_runner[PID]: MESSAGE
RUNNER_LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (?P<host>\S+) google_metadata_script_runner\[(?P<pid>\d+)\]: (?P<message>.*)$")


def serial_messages(compute, name):
    contents = compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance=name).execute()["contents"]
    return [match.group("host", "message") for match in map(RUNNER_LINE.match, contents.splitlines()) if match]


def messages_through(compute, name, last):
    """The console's (host, message) pairs once ``last`` is among them, else None."""
    found = serial_messages(compute, name)
    return found if last in [message for _, message in found] else None


def test_startup_and_shutdown_script_lines_reach_the_serial_console_with_the_runners_prefix(compute):
    startup = "echo hello; echo to stderr >&2; printf 'no newline'; exit 3"
    shutdown = "echo bye"
    body = instance_body("serial-1", startup_script=startup, shutdown_script=shutdown)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    finished = "Finished running startup scripts."
    messages = wait_until(lambda: messages_through(compute, "serial-1", finished), what="the startup script's end")
    assert {host for host, _ in messages} == {"serial-1"}
    assert [message for _, message in messages] == [
        "Starting startup scripts (version cflow-emulator).",
        "Found startup-script in metadata.",
        "startup-script: hello",
        "startup-script: to stderr",
        "startup-script: no newline",
        'Script "startup-script" failed with error: exit status 3',
        finished,
    ]

    wait_operation(compute, PROJECT, ZONE, compute.instances().stop(project=PROJECT, zone=ZONE, instance="serial-1").execute())
    shutdown_messages = wait_until(lambda: messages_through(compute, "serial-1", "Finished running shutdown scripts."), what="the shutdown script's end")
    shutdown_messages = shutdown_messages[len(messages):]
    assert [message for _, message in shutdown_messages] == [
        "Starting shutdown scripts (version cflow-emulator).",
        "Found shutdown-script in metadata.",
        "shutdown-script: bye",
        "shutdown-script exit status 0",
        "Finished running shutdown scripts.",
    ]
