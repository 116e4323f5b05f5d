#!/bin/bash
# CFlow worker boot script.
#
# Sent as the VM's metadata startup-script (VM_BOOT = "stock") or run from a
# custom image (VM_BOOT = "image", where the Python packages are preinstalled).
# It reads the run's package location from instance metadata, downloads it
# with the VM's own service account (no key file ever reaches a VM), installs
# the Google client packages if the image lacks them (pinned to the versions
# the controller runs: the package's constraints.txt), and keeps
# startup-signal.py running: a VM never sits idle with a dead worker.
#
# Every line it prints goes to ~/cflow/init.log and to its stdout, which GCE's
# script runner copies to the serial console ("startup-script: LINE"), so
# `gcloud compute instances get-serial-port-output` shows why a VM never
# started working.
#
# Each step that can fail (package download, apt-get, venv, pip, the worker)
# is tried at most cflow-init-attempts times (instance metadata; default 20),
# cflow-init-retry-s seconds apart (default 15; a worker that ran for 5
# minutes starts its count again). Then the VM powers itself off with the
# reason on the serial console: a VM that can never work must not bill forever.
#
# The same script runs on GCE and on the local Compute emulator, which sets
# GCE_METADATA_HOST and the storage endpoint in the VM's environment.
set -u

CFLOW_DIR="${HOME:-/root}/cflow"
# An emulated VM that shares the host's filesystem has its root at CFLOW_VM_ROOT.
VENV="${CFLOW_VM_ROOT:-}/opt/cflow/venv"
METADATA="${GCE_METADATA_HOST:-metadata.google.internal}"
WORKER_PACKAGES="google-cloud-pubsub google-cloud-storage google-auth"
WORKER_HEALTHY_S=300
mkdir -p "$CFLOW_DIR"
# tee -p: if the console's reader goes away, init.log still gets every line.
exec > >(tee -p -a "$CFLOW_DIR/init.log") 2>&1

say() { echo "cflow init: $*"; }
# Millisecond time stamps: bench/bench_boot.py reads where boot time goes from them.
say "$(date -u +%FT%T.%3NZ) starting"

# attribute NAME DEFAULT: a whole number from instance metadata, else DEFAULT.
attribute() {
  local value
  value=$(curl -sf --noproxy '*' --max-time 5 -H 'Metadata-Flavor: Google' \
    "http://$METADATA/computeMetadata/v1/instance/attributes/$1" 2>/dev/null) || value=""
  case "$value" in
    '' | *[!0-9]*) echo "$2" ;;
    *) echo "$value" ;;
  esac
}
# Read at the first failure: a boot where nothing fails asks nothing more.
ATTEMPTS="" RETRY_S=""
read_limits() {
  [ -n "$ATTEMPTS" ] && return
  ATTEMPTS=$(attribute cflow-init-attempts 20)
  RETRY_S=$(attribute cflow-init-retry-s 15)
  [ "$ATTEMPTS" -ge 1 ] || ATTEMPTS=1
}

give_up() {
  say "giving up: $*"
  say "powering this VM off, so that a VM that cannot work stops billing"
  poweroff || shutdown -h now
  exit 1
}

# retry WHAT COMMAND...: run COMMAND until it succeeds, at most ATTEMPTS times.
retry() {
  local what=$1 attempt=1
  shift
  until "$@"; do
    read_limits
    if [ "$attempt" -ge "$ATTEMPTS" ]; then
      give_up "$what failed $attempt times"
    fi
    say "$what failed (attempt $attempt of $ATTEMPTS); retrying in ${RETRY_S} s"
    sleep "$RETRY_S"
    attempt=$((attempt + 1))
  done
}

# Standard library only: it runs before the client packages are installed.
fetch_package() {
  python3 - "$CFLOW_DIR" "$METADATA" <<'PY'
import io, json, os, sys, tarfile, urllib.parse, urllib.request
work, metadata = sys.argv[1], sys.argv[2]
def md(path):
    request = urllib.request.Request(f"http://{metadata}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=10).read().decode()
try:
    bucket, _, name = md("instance/attributes/cflow-package")[len("gs://"):].partition("/")
    token = json.loads(md("instance/service-accounts/default/token"))["access_token"]
    base = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    url = f"{base}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    data = urllib.request.urlopen(request, timeout=60).read()
except OSError as error:
    sys.exit(f"cflow init: cannot download the package: {error}")
target = os.path.join(work, "package")
with tarfile.open(fileobj=io.BytesIO(data)) as archive:
    try:
        archive.extractall(target, filter="data")
    except TypeError:  # a Python without tarfile filters (before 3.11.4)
        archive.extractall(target)
print(f"cflow init: package gs://{bucket}/{name} ({len(data)} bytes) in {target}")
PY
}

retry "downloading the package" fetch_package
say "$(date -u +%FT%T.%3NZ) package ready"

# An image from `cflow image build` has the Google client packages in $VENV;
# a stock image needs them installed; an emulated VM that shares the host's
# filesystem has the host's.
PYTHON=python3
if [ -x "$VENV/bin/python3" ]; then
  say "using the preinstalled packages in $VENV"
  PYTHON="$VENV/bin/python3"
elif [ "${CFLOW_EMULATED_VM:-}" != "1" ]; then
  say "installing python3-venv and $WORKER_PACKAGES"
  export DEBIAN_FRONTEND=noninteractive
  retry "apt-get update" apt-get -q -o DPkg::Lock::Timeout=60 update
  retry "apt-get install python3-venv" apt-get install -y -q -o DPkg::Lock::Timeout=60 python3-venv
  retry "creating $VENV" python3 -m venv --clear "$VENV"
  # shellcheck disable=SC2086 # the package names are words
  retry "pip install" "$VENV/bin/pip" install -q --disable-pip-version-check \
    -c "$CFLOW_DIR/package/constraints.txt" $WORKER_PACKAGES
  PYTHON="$VENV/bin/python3"
fi
say "$(date -u +%FT%T.%3NZ) starting the worker"

# Restart the worker if it dies; it exits 0 only when it powered the VM off.
failures=0
while true; do
  started=$(date +%s)
  "$PYTHON" "$CFLOW_DIR/package/startup-signal.py" >>"$CFLOW_DIR/worker.log" 2>&1 && break
  status=$?
  tail -n 5 "$CFLOW_DIR/worker.log" | sed 's/^/cflow init: worker.log: /'
  read_limits
  if [ $(($(date +%s) - started)) -ge "$WORKER_HEALTHY_S" ]; then failures=0; fi
  failures=$((failures + 1))
  if [ "$failures" -ge "$ATTEMPTS" ]; then
    give_up "the worker exited with status $status, $failures times in a row (see $CFLOW_DIR/worker.log)"
  fi
  say "worker exited with status $status; restarting ($failures of $ATTEMPTS)"
  if [ "$failures" -gt 1 ]; then sleep "$RETRY_S"; else sleep 1; fi
done
