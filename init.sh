#!/bin/bash
# CFlow worker boot script.
#
# Sent as the VM's metadata startup-script (VM_BOOT = "stock") or run from a
# custom image (VM_BOOT = "image", where the Python packages are preinstalled).
# It reads the run's package location from instance metadata, downloads it
# with the VM's own service account (no key file ever reaches a VM), and keeps
# startup-signal.py running: a VM never sits idle with a dead worker.
#
# The same script runs on GCE and on the local Compute emulator, which sets
# GCE_METADATA_HOST and the storage endpoint in the VM's environment.
set -u

CFLOW_DIR="${HOME:-/root}/cflow"
# An emulated VM shares the host's filesystem; CFLOW_VM_ROOT is its root there.
VENV="${CFLOW_VM_ROOT:-}/opt/cflow/venv"
METADATA="${GCE_METADATA_HOST:-metadata.google.internal}"
mkdir -p "$CFLOW_DIR"
exec >>"$CFLOW_DIR/init.log" 2>&1
# Millisecond time stamps: bench/bench_boot.py reads where boot time goes from them.
echo "cflow init: $(date -u +%FT%T.%3NZ) starting"

# An image from `cflow image build` has the Google client packages in $VENV;
# a stock image needs them installed; an emulated VM has the host's.
PYTHON=python3
if [ -x "$VENV/bin/python3" ]; then
  echo "cflow init: using the preinstalled packages in $VENV"
  PYTHON="$VENV/bin/python3"
elif [ "${CFLOW_EMULATED_VM:-}" != "1" ]; then
  echo "cflow init: installing packages"
  until apt-get update -q && apt-get install -y -q python3-venv; do sleep 10; done
  python3 -m venv "$VENV"
  until "$VENV/bin/pip" install -q google-cloud-pubsub google-cloud-storage google-auth; do sleep 10; done
  PYTHON="$VENV/bin/python3"
fi

fetch_package() {
  "$PYTHON" - "$CFLOW_DIR" "$METADATA" <<'PY'
import io, json, os, sys, tarfile, urllib.parse, urllib.request
work, metadata = sys.argv[1], sys.argv[2]
def md(path):
    request = urllib.request.Request(f"http://{metadata}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=10).read().decode()
bucket, _, name = md("instance/attributes/cflow-package")[len("gs://"):].partition("/")
token = json.loads(md("instance/service-accounts/default/token"))["access_token"]
base = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
url = f"{base}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
data = urllib.request.urlopen(request, timeout=60).read()
target = os.path.join(work, "package")
with tarfile.open(fileobj=io.BytesIO(data)) as archive:
    try:
        archive.extractall(target, filter="data")
    except TypeError:  # a Python without tarfile filters (before 3.11.4)
        archive.extractall(target)
print(f"cflow init: package gs://{bucket}/{name} ({len(data)} bytes) in {target}")
PY
}

until fetch_package; do
  echo "cflow init: package download failed; retrying"
  sleep 5
done
echo "cflow init: $(date -u +%FT%T.%3NZ) package ready; starting the worker"

# Restart the worker if it dies; it exits 0 only when it powered the VM off.
while true; do
  "$PYTHON" "$CFLOW_DIR/package/startup-signal.py" >>"$CFLOW_DIR/worker.log" 2>&1 && break
  echo "cflow init: worker exited with status $?; restarting"
  sleep 1
done
