"""``--auth-token-file``: the Compute emulator answers only requests carrying its token, as GCE refuses
requests without valid credentials; each VM's metadata server stays open to its guest."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest

from cflow.gcp.clients import build_local_compute
from tests.helpers import instance_body, wait_operation, wait_until

PROJECT = "auth-project"
ZONE = "us-central1-b"
TOKEN = "auth-test-token-0123456789"

GUEST_ASKS_ITS_NAME = """#!/bin/bash
python3 - <<'PY'
import os, urllib.request
url = "http://%s/computeMetadata/v1/instance/name" % os.environ["GCE_METADATA_HOST"]
answer = urllib.request.urlopen(urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}), timeout=5)
print("metadata-name=" + answer.read().decode(), flush=True)
PY
"""


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def guarded(start_compute_emulator, token_file):
    """An emulator started with ``--auth-token-file``."""
    with start_compute_emulator("--auth-token-file", token_file) as emulator:
        yield emulator


def http(method, url, headers=None, body=None):
    """(status, headers, JSON body) of one request, errors included."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.headers, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def vm_names(compute):
    return [item["name"] for item in compute.instances().list(project=PROJECT, zone=ZONE).execute().get("items", [])]


def test_a_request_without_the_token_is_refused_as_gce_refuses_it_and_does_nothing(guarded, token_file):
    url = f"{guarded.base_url}projects/{PROJECT}/zones/{ZONE}/instances"
    body = json.dumps(instance_body("intruder-1", zone=ZONE, startup_script="touch /tmp/should-never-run")).encode()
    status, headers, answer = http("POST", url, {"Content-Type": "application/json"}, body)
    assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="https://accounts.google.com/"'
    error = answer["error"]
    assert error["code"] == 401 and error["status"] == "UNAUTHENTICATED"
    assert error["message"].startswith("Request is missing required authentication credential. Expected OAuth 2 access token")
    assert error["errors"] == [{"message": "Login Required.", "domain": "global", "reason": "required", "location": "Authorization", "locationType": "header"}]

    for wrong in ("Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Basic " + TOKEN):
        status, headers, answer = http("POST", url, {"Content-Type": "application/json", "Authorization": wrong}, body)
        assert status == 401 and answer["error"]["errors"][0]["reason"] == "authError", wrong
        assert headers["WWW-Authenticate"] == 'Bearer realm="https://accounts.google.com/", error="invalid_token"'

    batch = b"--b\r\nContent-Type: application/http\r\nContent-ID: <1>\r\n\r\nGET /compute/v1/projects/p/zones HTTP/1.1\r\n\r\n--b--\r\n"
    status, _, answer = http("POST", guarded.batch_uri, {"Content-Type": "multipart/mixed; boundary=b"}, batch)
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"

    assert vm_names(build_local_compute(guarded.base_url, token_file)) == []  # nothing was created


def test_with_the_token_everything_works_and_guests_reach_their_metadata_server(guarded, token_file):
    compute = build_local_compute(guarded.base_url, token_file)
    body = instance_body("allowed-1", zone=ZONE, startup_script=GUEST_ASKS_ITS_NAME)
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    assert vm_names(compute) == ["allowed-1"]

    def serial():
        return compute.instances().getSerialPortOutput(project=PROJECT, zone=ZONE, instance="allowed-1").execute()["contents"]

    # The guest has no token: its metadata server is not behind it, as on GCE.
    assert "metadata-name=allowed-1" in wait_until(lambda: "metadata-name=" in serial() and serial(), 30, "the guest's metadata answer")

    answers = {}
    batch = BatchHttpRequest(callback=lambda request_id, response, error: answers.__setitem__(request_id, (response, error)), batch_uri=guarded.batch_uri)
    batch.add(compute.zones().get(project=PROJECT, zone=ZONE), request_id="zone")
    batch.add(compute.instances().get(project=PROJECT, zone=ZONE, instance="allowed-1"), request_id="vm")
    batch.execute(http=compute._http)
    assert answers["zone"][0]["name"] == ZONE and answers["vm"][0]["status"] == "RUNNING"

    wrong_file = token_file.parent / "wrong-token"
    wrong_file.write_text("a-guess\n")
    with pytest.raises(HttpError) as guessed:
        build_local_compute(guarded.base_url, wrong_file).instances().list(project=PROJECT, zone=ZONE).execute()
    assert guessed.value.resp.status == 401 and guessed.value.error_details[0]["reason"] == "authError"
    wait_operation(compute, PROJECT, ZONE, compute.instances().delete(project=PROJECT, zone=ZONE, instance="allowed-1").execute())


@pytest.mark.stack
def test_an_unusable_token_file_stops_the_emulator_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    for path in (empty, tmp_path / "missing"):
        result = subprocess.run(
            [sys.executable, "-m", "cflow", "emulator", "compute", "--port", "0", "--auth-token-file", str(path)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 2 and "listening" not in result.stdout
        assert len(result.stderr.strip().splitlines()) == 1 and "--auth-token-file" in result.stderr, result.stderr
