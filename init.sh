#!/bin/bash
# CFlow worker boot script.
#
# Sent as the VM's metadata startup-script (VM_BOOT = "stock") or run from a
# custom image (VM_BOOT = "image", where the Python packages are preinstalled).
# It reads the run's package location from instance metadata, downloads it
# with the VM's own service account (no key file ever reaches a VM), installs
# the Google client packages if the image lacks them, and keeps
# startup-signal.py running: a VM never sits idle with a dead worker.
#
# The packages come from the run's wheelhouse in the run's bucket (instance
# metadata cflow-wheelhouse, made by the controller: cflow/wheelhouse.py),
# fetched with the same token as the package, its sha256 checked against
# cflow-wheelhouse-sha256 before it is opened, and installed into
# /opt/cflow/venv (python3 -m venv --without-pip: no apt-get) by the pip wheel
# it carries, with no index: nothing reaches a package registry, so a VM with
# no external IP boots as well. The versions are the controller's.
#
# Every line it prints goes to ~/cflow/init.log and to its stdout, which GCE's
# script runner copies to the serial console ("startup-script: LINE"), so
# `gcloud compute instances get-serial-port-output` shows why a VM never
# started working.
#
# Each step that can fail for a while (the downloads, the worker) is tried at
# most cflow-init-attempts times (instance metadata; default 20),
# cflow-init-retry-s seconds apart (default 15; a worker that ran for 5
# minutes starts its count again); one that can never succeed (no wheelhouse
# named, the install itself) is not tried again. Then the VM powers itself
# off with the reason on the serial console: a VM that can never work must
# not bill forever.
#
# A VM whose metadata says it has GPUs (cflow-gpu-count) installs the NVIDIA
# driver before the worker starts (cflow/gpu_driver.sh in the package).
#
# CFLOW_INIT_INSTALL_ONLY=1 (`cflow image build`'s build VM): install the
# packages from the wheelhouse, then exit; no package, no worker, and a
# failure exits 1 instead of powering off.
#
# The same script runs on GCE and on the local Compute emulator, which sets
# GCE_METADATA_HOST and the storage endpoint in the VM's environment.
set -u

CFLOW_DIR="${HOME:-/root}/cflow"
# An emulated VM that shares the host's filesystem has its root at CFLOW_VM_ROOT.
VENV="${CFLOW_VM_ROOT:-}/opt/cflow/venv"
METADATA="${GCE_METADATA_HOST:-metadata.google.internal}"
WORKER_HEALTHY_S=300
# A step exits with this status when trying again cannot help.
CANNOT_SUCCEED=3
INSTALL_ONLY="${CFLOW_INIT_INSTALL_ONLY:-}"
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
  [ "$INSTALL_ONLY" = "1" ] && exit 1
  say "powering this VM off, so that a VM that cannot work stops billing"
  poweroff || shutdown -h now
  exit 1
}

# retry WHAT COMMAND...: run COMMAND until it succeeds, at most ATTEMPTS times,
# or until it exits with CANNOT_SUCCEED.
retry() {
  local what=$1 attempt=1 status
  shift
  until "$@"; do
    status=$?
    [ "$status" -eq "$CANNOT_SUCCEED" ] && give_up "$what cannot succeed (the line above says why)"
    read_limits
    if [ "$attempt" -ge "$ATTEMPTS" ]; then
      give_up "$what failed $attempt times"
    fi
    say "$what failed (attempt $attempt of $ATTEMPTS); retrying in ${RETRY_S} s"
    sleep "$RETRY_S"
    attempt=$((attempt + 1))
  done
}

# An image from `cflow image build` has the Google client packages in $VENV;
# an emulated VM that shares the host's filesystem has the host's; a stock
# image gets them from the run's wheelhouse.
PYTHON=python3
NEED_PACKAGES=0
if [ -x "$VENV/bin/python3" ]; then
  PYTHON="$VENV/bin/python3"
elif [ "${CFLOW_EMULATED_VM:-}" != "1" ]; then
  NEED_PACKAGES=1
fi

# fetch WANT_PACKAGE WANT_WHEELHOUSE: download the run's package into
# $CFLOW_DIR/package and its wheelhouse into $CFLOW_DIR/wheelhouse, both at
# once. Standard library only: it runs before the client packages are installed.
fetch() {
  python3 - "$CFLOW_DIR" "$METADATA" "$1" "$2" "$CANNOT_SUCCEED" <<'PY'
import io, json, os, sys, tarfile, urllib.error, urllib.parse, urllib.request
work, metadata, want_package, want_wheelhouse, cannot_succeed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1", int(sys.argv[5])
def md(path):
    request = urllib.request.Request(f"http://{metadata}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=10).read().decode()
def attribute(name):
    try:
        return md(f"instance/attributes/{name}")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
def open_object(url, token):
    bucket, _, name = url[len("gs://"):].partition("/")
    base = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    request = urllib.request.Request(f"{base}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                     headers={"Authorization": f"Bearer {token}"})
    return urllib.request.urlopen(request, timeout=60)
def extract(archive, target):
    try:
        archive.extractall(target, filter="data")
    except TypeError:  # a Python without tarfile filters (before 3.11.4)
        archive.extractall(target)
def fetch_package(url, token):
    try:
        data = open_object(url, token).read()
    except OSError as error:
        sys.exit(f"cflow init: cannot download the package: {error}")
    target = os.path.join(work, "package")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        extract(archive, target)
    print(f"cflow init: package {url} ({len(data)} bytes) in {target}", flush=True)
def fetch_wheelhouse(url, expected, token):
    import hashlib, shutil
    # Streamed to disk and hashed on the way; opened only once its sha256 is the one the run names.
    archive_path, digest, size = os.path.join(work, "wheelhouse.tar"), hashlib.sha256(), 0
    try:
        with open_object(url, token) as response, open(archive_path, "wb") as sink:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
                size += len(block)
    except OSError as error:
        sys.exit(f"cflow init: cannot download the wheelhouse {url}: {error}")
    if digest.hexdigest() != expected:
        os.unlink(archive_path)
        sys.exit(f"cflow init: the wheelhouse {url} has sha256 {digest.hexdigest()}, not {expected} as the run says")
    target = os.path.join(work, "wheelhouse")
    shutil.rmtree(target, ignore_errors=True)  # what a boot cut short left
    with tarfile.open(archive_path) as archive:
        extract(archive, target)
    os.unlink(archive_path)
    print(f"cflow init: wheelhouse {url} ({size} bytes, sha256 checked) in {target}", flush=True)
try:
    package_url = attribute("cflow-package") if want_package else None
    if want_package and not package_url:
        print("cflow init: this VM's metadata names no package (cflow-package); CFlow's workers are created by `cflow run`", flush=True)
        sys.exit(cannot_succeed)
    wheelhouse_url = attribute("cflow-wheelhouse") if want_wheelhouse else None
    wheelhouse_sha256 = attribute("cflow-wheelhouse-sha256") if want_wheelhouse else None
    if want_wheelhouse and not (wheelhouse_url and wheelhouse_sha256):
        print("cflow init: this image has no Python client packages (/opt/cflow/venv) and the run names no wheelhouse "
              "(cflow-wheelhouse); boot the stock image with VM_BOOT = \"stock\", or an image made by `cflow image build`", flush=True)
        sys.exit(cannot_succeed)
    token = json.loads(md("instance/service-accounts/default/token"))["access_token"]
except OSError as error:
    sys.exit(f"cflow init: cannot read this VM's metadata: {error}")
if package_url and wheelhouse_url:
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(fetch_package, package_url, token), pool.submit(fetch_wheelhouse, wheelhouse_url, wheelhouse_sha256, token)]
    for job in jobs:
        job.result()  # a SystemExit of either part ends the step with its message
elif package_url:
    fetch_package(package_url, token)
elif wheelhouse_url:
    fetch_wheelhouse(wheelhouse_url, wheelhouse_sha256, token)
PY
}

# Into $VENV.partial first, renamed when complete: a boot cut short never
# leaves a $VENV that looks ready.
install_packages() {
  local wheelhouse="$CFLOW_DIR/wheelhouse" staging="$VENV.partial"
  rm -rf "$staging"
  if mkdir -p "$(dirname "$VENV")" && python3 -m venv --without-pip "$staging" >"$CFLOW_DIR/pip.log" 2>&1 &&
    "$staging/bin/python3" "$wheelhouse/pip.whl/pip" install --isolated --no-index --no-cache-dir --no-compile \
      --disable-pip-version-check --root-user-action=ignore --quiet \
      --find-links "$wheelhouse/wheels" -r "$wheelhouse/requirements.txt" >>"$CFLOW_DIR/pip.log" 2>&1 &&
    mv "$staging" "$VENV"; then
    rm -rf "$wheelhouse"
    return 0
  fi
  tail -n 5 "$CFLOW_DIR/pip.log" | sed 's/^/cflow init: pip: /'
  return "$CANNOT_SUCCEED"
}

if [ "$INSTALL_ONLY" = "1" ]; then
  if [ "$NEED_PACKAGES" = "1" ]; then
    retry "downloading the wheelhouse" fetch 0 1
    retry "installing the packages from the wheelhouse" install_packages
  fi
  say "$(date -u +%FT%T.%3NZ) packages installed in $VENV"
  exit 0
fi

if [ "$NEED_PACKAGES" = "1" ]; then
  retry "downloading the package and the wheelhouse" fetch 1 1
else
  retry "downloading the package" fetch 1 0
fi
say "$(date -u +%FT%T.%3NZ) package ready"
if [ "$NEED_PACKAGES" = "1" ]; then
  say "installing the Google client packages from the wheelhouse into $VENV (no index)"
  retry "installing the packages from the wheelhouse" install_packages
  PYTHON="$VENV/bin/python3"
  say "$(date -u +%FT%T.%3NZ) packages installed"
elif [ "$PYTHON" != python3 ]; then
  say "using the preinstalled packages in $VENV"
fi
# A VM with GPUs (instance metadata cflow-gpu-count, from VM_GPU_TYPE) needs the
# NVIDIA driver before its first task: the package's cflow/gpu_driver.sh
# installs it as Google documents (the VM reboots on the way, and this script
# runs again after it), or finds it ready on an image that has it.
GPU_COUNT=$(attribute cflow-gpu-count 0)
if [ "$GPU_COUNT" -gt 0 ]; then
  say "this VM has $GPU_COUNT GPU(s): the NVIDIA driver first"
  retry "installing the NVIDIA driver" bash "$CFLOW_DIR/package/cflow/gpu_driver.sh" boot
  say "$(date -u +%FT%T.%3NZ) NVIDIA driver ready"
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
