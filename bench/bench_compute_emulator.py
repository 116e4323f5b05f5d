"""Benchmark of the Compute emulator (prints figures; not a test).

    python bench/bench_compute_emulator.py [--vms 200] [--lists 1000]

Targets on 2 cores: 200 VMs from one bulkInsert RUNNING in < 20 s; the
emulator's RSS per idle VM < 2 MB; 1,000 instances.list over 200 VMs < 10 s.
"""

import argparse
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import compute_client, compute_emulator, wait_zone_operation

PROJECT = "bench-project"
ZONE = "us-central1-a"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def running_count(compute):
    response = compute.instances().list(project=PROJECT, zone=ZONE, filter="status = RUNNING").execute()
    return len(response.get("items", []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--lists", type=int, default=1000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cflow-bench-") as state_dir, \
            compute_emulator(state_dir, shutdown_grace=2) as (emulator, process):
        compute = compute_client(emulator.endpoint)
        # Warm up code paths (and their allocations) before the baseline.
        for _ in range(20):
            compute.instances().list(project=PROJECT, zone=ZONE).execute()
        time.sleep(0.5)
        baseline_kib = rss_kib(emulator.pid)

        properties = {
            "machineType": "e2-micro",
            "disks": [{"boot": True, "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
            "metadata": {"items": [{"key": "startup-script", "value": "sleep 1000"}]},
            "labels": {"cflow-run": "bench"},
        }
        started = time.monotonic()
        operation = compute.instances().bulkInsert(
            project=PROJECT, zone=ZONE, body={"count": args.vms, "namePattern": "bench-####", "instanceProperties": properties}
        ).execute()
        wait_zone_operation(compute, PROJECT, ZONE, operation, timeout_s=120)
        while running_count(compute) < args.vms:
            time.sleep(0.05)
        boot_s = time.monotonic() - started

        time.sleep(2)  # idle: startup scripts settled, no request in flight
        loaded_kib = rss_kib(emulator.pid)

        # googleapiclient spends ~10 ms building the resource object on each
        # compute.instances(); build it once, as a busy caller should.
        instances = compute.instances()
        started = time.monotonic()
        for _ in range(args.lists):
            response = instances.list(project=PROJECT, zone=ZONE).execute()
        lists_s = time.monotonic() - started
        assert len(response["items"]) == args.vms

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        shutdown_s = time.monotonic() - started

    per_vm_kib = (loaded_kib - baseline_kib) / args.vms
    print(f"{args.vms} VMs from one bulkInsert RUNNING in {boot_s:.2f} s (target < 20 s)")
    print(f"emulator RSS {baseline_kib / 1024:.1f} MiB idle, {loaded_kib / 1024:.1f} MiB with {args.vms} VMs: "
          f"{per_vm_kib:.0f} KiB per idle VM (target < 2048 KiB)")
    print(f"{args.lists} instances.list calls over {args.vms} VMs in {lists_s:.2f} s "
          f"({1000 * lists_s / args.lists:.1f} ms each; target < 10 s)")
    print(f"SIGTERM to exit with {args.vms} VMs (grace 2 s): {shutdown_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
