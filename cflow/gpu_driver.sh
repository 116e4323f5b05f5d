#!/bin/bash
# CFlow: the NVIDIA driver for workers with GPUs (VM_GPU_TYPE).
#
# Installed the way Google documents for Debian 12 on Compute Engine
# ("Install GPU drivers", cloud.google.com/compute/docs/gpus/install-drivers-gpu):
# Google's installation script, cuda_installer.pyz from
# GoogleCloudPlatform/compute-gpu-installation, run as root with
# `install_driver --installation-mode=repo --installation-branch=prod`, which
# installs the kernel's linux-headers and DKMS, adds NVIDIA's Debian 12
# repository and installs the driver from it. The installer reboots the VM
# on the way (once or twice); the VM's startup script runs this script again
# after each reboot, and the installer carries on where it stopped.
#
# Usage: gpu_driver.sh boot|image
#   boot   a worker with GPUs, run by init.sh before the worker starts (instance
#          metadata cflow-gpu-count above 0). Ready once `nvidia-smi -L` lists
#          the GPUs: at once on an image made by `cflow image build --gpu`.
#   image  `cflow image build --gpu`, on a build VM without a GPU. Ready once the
#          driver is installed (nvidia-smi is there); workers booted from the
#          image skip the install.
#
# Exit status: 0 ready; 1 not ready yet (init.sh tries again); 2 wrong usage.
#
# An emulated VM (the local Compute emulator: CFLOW_EMULATED_VM=1, or a real
# root without /sys/bus/pci, which the emulator's VMs never have) has no GPU,
# and the install must not download gigabytes there: the script records that
# it ran and what it would run in ${CFLOW_VM_ROOT:-}/opt/cflow/gpu-driver.log
# (one line per run) and exits 0.
set -u

MODE="${1:-}"
INSTALLER_URL="https://storage.googleapis.com/compute-gpu-installation-us/installer/latest/cuda_installer.pyz"
INSTALLER_DIR="/opt/google/cuda-installer"
INSTALLER_ARGS=(install_driver --installation-mode=repo --installation-branch=prod)
ROOT="${CFLOW_VM_ROOT:-}"
RECORD="$ROOT/opt/cflow/gpu-driver.log"
# How long to wait for the reboot the installer asked for before calling this try failed.
REBOOT_WAIT_S=600

say() { echo "cflow gpu: $*"; }

case "$MODE" in
  boot) ;;
  image) INSTALLER_ARGS+=(--ignore-no-gpu) ;;  # the build VM has no GPU; the packages install all the same
  *) echo "usage: $0 boot|image" >&2; exit 2 ;;
esac

record() {
  mkdir -p "$(dirname "$RECORD")"
  echo "$(date -u +%FT%TZ) mode=$MODE $*" >>"$RECORD"
}

# GPUs the VM shows, without pciutils (the stock image may lack lspci): NVIDIA's PCI vendor id is 0x10de.
nvidia_devices() {
  grep -lx 0x10de /sys/bus/pci/devices/*/vendor 2>/dev/null | wc -l
}

ready() {
  if [ "$MODE" = image ]; then
    command -v nvidia-smi >/dev/null
  else
    nvidia-smi -L 2>/dev/null | grep -q '^GPU '
  fi
}

if [ "${CFLOW_EMULATED_VM:-}" = "1" ] || [ ! -d /sys/bus/pci/devices ]; then
  say "emulated VM with no GPU: recording what a real VM runs instead of installing"
  record "emulated: no NVIDIA GPU here; would run: curl -fsSL $INSTALLER_URL -o $INSTALLER_DIR/cuda_installer.pyz" \
    "&& python3 $INSTALLER_DIR/cuda_installer.pyz ${INSTALLER_ARGS[*]}"
  say "recorded in $RECORD"
  exit 0
fi

if ready; then
  say "NVIDIA driver ready ($(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') GPU(s) listed)"
  record "ready"
  exit 0
fi
say "$(nvidia_devices) NVIDIA device(s) on this VM; installing the driver with Google's installer (${INSTALLER_ARGS[*]})"
mkdir -p "$INSTALLER_DIR" && cd "$INSTALLER_DIR" || exit 1
if [ ! -s cuda_installer.pyz ]; then
  curl -fsSL --retry 3 "$INSTALLER_URL" -o cuda_installer.pyz.partial && mv cuda_installer.pyz.partial cuda_installer.pyz || {
    say "cannot download $INSTALLER_URL (the VM needs the internet, e.g. an external IP or Cloud NAT, for the driver)"
    exit 1
  }
fi
record "installing: python3 $INSTALLER_DIR/cuda_installer.pyz ${INSTALLER_ARGS[*]}"
python3 cuda_installer.pyz "${INSTALLER_ARGS[@]}"
status=$?
if ready; then
  say "NVIDIA driver ready"
  record "ready"
  exit 0
fi
# The installer reboots the VM when it needs to, and this script runs again after it; a
# reboot that does not come means the installer failed (its logs are in $INSTALLER_DIR).
say "the installer exited with status $status and the driver is not ready yet; waiting for the reboot it asked for (logs: $INSTALLER_DIR)"
sleep "$REBOOT_WAIT_S"
say "no reboot came: the install failed this time (logs: $INSTALLER_DIR)"
exit 1
