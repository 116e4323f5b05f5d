"""Compute emulator: each VM's metadata server, as guests and google-auth read it."""

import glob
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import instance_body, wait_operation, wait_until

PROJECT = "metadata-project"
ZONE = "europe-west1-b"
VM = "meta-1"


@pytest.fixture(scope="module")
def vm(compute, state_dir):
    body = instance_body(VM, zone=ZONE, startup_script="echo $GCE_METADATA_HOST > mds.txt; sleep 1000", metadata={"role": "worker", "run-id": "r42"})
    wait_operation(compute, PROJECT, ZONE, compute.instances().insert(project=PROJECT, zone=ZONE, body=body).execute())
    path = wait_until(lambda: glob.glob(os.path.join(state_dir, "vms", f"{VM}-*", "mds.txt")))[0]
    wait_until(lambda: os.path.getsize(path) > 0)
    with open(path) as handle:
        host = handle.read().strip()
    return {"host": host, "resource": compute.instances().get(project=PROJECT, zone=ZONE, instance=VM).execute()}


def fetch(host, path, flavor=True, timeout_s=10):
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"} if flavor else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def test_requests_without_the_flavor_header_are_refused(vm):
    status, headers, _ = fetch(vm["host"], "instance/name", flavor=False)
    assert status == 403
    status, headers, body = fetch(vm["host"], "instance/name")
    assert (status, body) == (200, VM)
    assert headers["Metadata-Flavor"] == "Google"


def test_instance_identity_matches_the_api(vm):
    host, resource = vm["host"], vm["resource"]
    assert fetch(host, "instance/id")[2] == resource["id"]
    number = fetch(host, "project/numeric-project-id")[2]
    assert number.isdigit()
    assert fetch(host, "project/project-id")[2] == PROJECT
    assert fetch(host, "instance/zone")[2] == f"projects/{number}/zones/{ZONE}"
    assert fetch(host, "instance/machine-type")[2] == f"projects/{number}/machineTypes/e2-small"
    assert fetch(host, "instance/hostname")[2].startswith(f"{VM}.")
    assert fetch(host, "instance/preempted")[2] == "FALSE"
    assert fetch(host, "instance/network-interfaces/0/ip")[2] == resource["networkInterfaces"][0]["networkIP"]


def test_attributes_are_listed_and_read(vm):
    status, _, listing = fetch(vm["host"], "instance/attributes/")
    assert status == 200
    assert set(listing.split()) == {"role", "run-id", "startup-script"}
    assert fetch(vm["host"], "instance/attributes/run-id")[2] == "r42"
    assert fetch(vm["host"], "instance/attributes/missing")[0] == 404
    assert fetch(vm["host"], "instance/no-such-key")[0] == 404


def test_recursive_returns_json_with_camel_case_keys_and_verbatim_attributes(vm):
    status, headers, body = fetch(vm["host"], "instance/?recursive=true")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    tree = json.loads(body)
    assert tree["name"] == VM and tree["id"] == int(vm["resource"]["id"])
    assert tree["attributes"]["run-id"] == "r42"
    assert tree["machineType"].endswith("/e2-small")
    assert tree["scheduling"] == {"automaticRestart": "TRUE", "onHostMaintenance": "MIGRATE", "preemptible": "FALSE", "provisioningModel": "STANDARD"}
    account = json.loads(fetch(vm["host"], "instance/service-accounts/default/?recursive=true")[2])
    assert account["email"].endswith("-compute@developer.gserviceaccount.com") and account["aliases"] == ["default"]


def test_token_is_a_fake_bearer_token(vm):
    status, headers, body = fetch(vm["host"], "instance/service-accounts/default/token")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    token = json.loads(body)
    assert token["token_type"] == "Bearer" and token["access_token"] and 0 < token["expires_in"] <= 3600


def test_wait_for_change_returns_the_new_value_when_metadata_changes(compute, vm):
    results = {}
    status, headers, body = fetch(vm["host"], "instance/attributes/role")
    assert (status, body) == (200, "worker")

    def waiter():
        # last_etag: a change that lands before this request is sent still counts.
        results["answer"] = fetch(vm["host"], f"instance/attributes/role?wait_for_change=true&last_etag={headers['ETag']}&timeout_sec=20", timeout_s=30)

    thread = threading.Thread(target=waiter)
    thread.start()
    current = compute.instances().get(project=PROJECT, zone=ZONE, instance=VM).execute()["metadata"]
    items = [item if item["key"] != "role" else {"key": "role", "value": "leader"} for item in current["items"]]
    request = compute.instances().setMetadata(project=PROJECT, zone=ZONE, instance=VM, body={"fingerprint": current["fingerprint"], "items": items})
    wait_operation(compute, PROJECT, ZONE, request.execute())
    thread.join(10)
    assert results["answer"][0] == 200 and results["answer"][2] == "leader"


def test_wait_for_change_times_out_with_the_unchanged_value(vm):
    started = time.monotonic()
    status, _headers, body = fetch(vm["host"], "instance/preempted?wait_for_change=true&timeout_sec=1")
    assert (status, body) == (200, "FALSE")
    assert 0.9 <= time.monotonic() - started < 5
    # An old etag answers at once with the current value.
    started = time.monotonic()
    status, _, body = fetch(vm["host"], "instance/preempted?wait_for_change=true&last_etag=0000&timeout_sec=10")
    assert (status, body) == (200, "FALSE") and time.monotonic() - started < 1


def test_google_auth_on_the_vm_finds_project_and_token(vm, tmp_path):
    probe = (
        "import google.auth, google.auth.transport.requests as r\n"
        "credentials, project = google.auth.default()\n"
        "credentials.refresh(r.Request())\n"
        "print(project, credentials.token[:4], type(credentials).__module__)\n"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("GOOGLE_", "CLOUDSDK_"))}
    environment.update(GCE_METADATA_HOST=vm["host"], GCE_METADATA_IP=vm["host"], NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    environment["HOME"] = str(tmp_path)  # no gcloud credentials to find there
    result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    project, token_head, module = result.stdout.split()
    assert (project, token_head) == (PROJECT, "ya29")
    assert module.startswith("google.auth.compute_engine")
