"""``cflow local up|down|env|status``: the cloud in a box as one command.

``eval "$(cflow local up)"`` starts the stack (or reuses the running one) and
sets the variables that point CFlow and the Google clients at it; only the
``export`` lines go to stdout, progress goes to stderr. The Compute emulator
answers only requests with the token in ``CFLOW_COMPUTE_TOKEN_FILE`` unless
``--no-auth``.
"""

import argparse
import logging
from typing import TYPE_CHECKING

from cflow.errors import StackError
from cflow.local import DEFAULT_STACK_DIR

if TYPE_CHECKING:
    from cflow.local.launchers import ComputeOptions

logger = logging.getLogger(__name__)


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``cflow local`` and its subcommands on ``subparsers``."""
    from cflow.local.compute.rootfs import RECIPES

    local = subparsers.add_parser(
        "local",
        help="start, inspect or stop the local cloud (Pub/Sub, Cloud Storage, Compute emulators)",
        description="The cloud in a box: local Pub/Sub, Cloud Storage and Compute Engine on loopback ports.",
    )
    actions = local.add_subparsers(dest="local_command", metavar="ACTION", required=True)

    up = actions.add_parser(
        "up",
        help="start the local stack (or reuse the running one) and print its export lines",
        description='Start the local stack in the background and print shell export lines: eval "$(cflow local up)".',
    )
    _add_dir_argument(up)
    faults = up.add_argument_group("Compute emulator options (default: the emulator's own)")
    faults.add_argument("--preempt-mean-s", type=float, metavar="S", help="mean seconds until a Spot VM is preempted")
    faults.add_argument(
        "--zone-capacity", action="append", default=[], metavar="ZONE=N",
        help="most VMs a zone can hold; repeat for several zones",
    )
    faults.add_argument("--cpu-quota", type=int, metavar="N", help="short for --quota CPUS=N")
    faults.add_argument(
        "--quota", action="append", default=[], metavar="[REGION:]METRIC=N",
        help="limit a quota (CPUS, PREEMPTIBLE_CPUS, INSTANCES, IN_USE_ADDRESSES, GPUS_ALL_REGIONS, NVIDIA_T4_GPUS...); "
        "repeatable; without REGION, in every region; unset metrics are generous",
    )
    faults.add_argument(
        "--deny-external-ip", action="store_true",
        help="organization policy constraints/compute.vmExternalIpAccess: VMs with an external IP are refused",
    )
    faults.add_argument("--no-default-network", action="store_true", help="projects start without the 'default' network")
    faults.add_argument("--slow-vms", type=float, metavar="FRACTION", help="fraction of VMs that get only 1/--slow-factor of the time")
    faults.add_argument("--slow-factor", type=float, metavar="X", help="how much slower a slow VM is (the emulator's default: 5)")
    faults.add_argument("--error-rate", type=float, metavar="R", help="fraction of API calls that fail transiently")
    faults.add_argument("--boot-delay", type=float, metavar="S", help="seconds a VM takes to boot")
    faults.add_argument("--shutdown-grace", type=float, metavar="S", help="seconds a VM's shutdown script may run")
    faults.add_argument("--seed", type=int, metavar="N", help="random seed for the faults")
    faults.add_argument(
        "--rate-limit-per-minute", type=int, metavar="N",
        help="GCE's rate quota: N API requests a minute per project and group; more is 403 rateLimitExceeded",
    )
    faults.add_argument(
        "--resource-not-ready", action=argparse.BooleanOptionalAction, default=None,
        help="refuse delete or stop of a booting or stopping VM with 400 resourceNotReady, as GCE does (the emulator's "
        "default); --no-resource-not-ready accepts them",
    )
    faults.add_argument(
        "--vm-root", choices=sorted(RECIPES), metavar="NAME",
        help="run VMs on a real root: debian-12, a minimal Debian 12 built once with debootstrap (cached in ~/.cache/cflow/); needs root",
    )
    faults.add_argument(
        "--no-auth", action="store_true",
        help="let the Compute emulator answer anyone who reaches its port (default: only requests with the "
        "token in the stack's compute-token file, CFLOW_COMPUTE_TOKEN_FILE)",
    )  # fmt: skip
    up.set_defaults(func=run_up)

    down = actions.add_parser("down", help="stop the local stack and everything it started")
    _add_dir_argument(down)
    down.set_defaults(func=run_down)

    env = actions.add_parser("env", help="print the export lines of the running local stack")
    _add_dir_argument(env)
    env.set_defaults(func=run_env)

    status = actions.add_parser("status", help="show each service, its pid, endpoint, whether it is alive, and VMs")
    _add_dir_argument(status)
    status.set_defaults(func=run_status)


def _add_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=DEFAULT_STACK_DIR, metavar="D",
        help=f"the stack's directory: state, logs, data (default: {DEFAULT_STACK_DIR})",
    )


def _dir_flag(args: argparse.Namespace) -> str:
    return "" if args.dir == DEFAULT_STACK_DIR else f" --dir {args.dir}"


def _compute_options(args: argparse.Namespace) -> "ComputeOptions | None":
    from cflow.local.launchers import ComputeOptions

    options = ComputeOptions(
        preempt_mean_s=args.preempt_mean_s,
        zone_capacity=tuple(args.zone_capacity),
        cpu_quota=args.cpu_quota,
        quota=tuple(args.quota),
        deny_external_ip=args.deny_external_ip,
        no_default_network=args.no_default_network,
        error_rate=args.error_rate,
        boot_delay=args.boot_delay,
        shutdown_grace=args.shutdown_grace,
        seed=args.seed,
        rate_limit_per_minute=args.rate_limit_per_minute,
        resource_not_ready=args.resource_not_ready,
        slow_vms=args.slow_vms,
        slow_factor=args.slow_factor,
        vm_root=args.vm_root,
        auth=not args.no_auth,
    )
    for item in options.zone_capacity:
        zone, _, count = item.partition("=")
        if not zone or not count.isdigit():
            raise StackError(f"--zone-capacity {item!r} is not ZONE=N; write it like us-central1-a=10")
    from cflow.local.compute.quotas import parse_quota_setting

    for item in options.quota:
        try:
            parse_quota_setting(item)
        except ValueError as error:
            raise StackError(f"--quota {error}") from None
    # No option given means "whatever the running stack has".
    return None if options == ComputeOptions() else options


def run_up(args: argparse.Namespace) -> int:
    """``cflow local up``: print the export lines of the running (or started) stack."""
    from cflow.local.stack import LocalStack, export_lines

    info, started = LocalStack(args.dir).up_reporting_start(_compute_options(args))
    for line in export_lines(info):
        print(line)
    if started:
        logger.info("stop it with `cflow local down%s`", _dir_flag(args))
    return 0


def run_env(args: argparse.Namespace) -> int:
    """``cflow local env``: print the export lines of the running stack."""
    from cflow.local.stack import LocalStack, export_lines

    info = LocalStack(args.dir).info()
    if info is None:
        raise StackError(
            f'no local stack is running in {args.dir}; start one with `eval "$(cflow local up{_dir_flag(args)})"`'
        )
    for line in export_lines(info):
        print(line)
    return 0


def run_down(args: argparse.Namespace) -> int:
    """``cflow local down``: stop the stack, VMs first."""
    from cflow.local.stack import LocalStack

    stopped = LocalStack(args.dir).down()
    if stopped:
        logger.info("local stack in %s stopped", args.dir)
    else:
        logger.info("no local stack was running in %s", args.dir)
    return 0


def run_status(args: argparse.Namespace) -> int:
    """``cflow local status``: each service and the VMs by state; 1 unless all are alive."""
    from cflow.local.stack import LocalStack

    stack = LocalStack(args.dir)
    statuses, vm_counts = stack.status()
    if not statuses:
        print(f"no local stack in {stack.dir}; start one with `cflow local up{_dir_flag(args)}`")
        return 1
    print(f"local stack in {stack.dir}")
    width = max(len(status.name) for status in statuses)
    for status in statuses:
        state = "alive" if status.alive else f"DEAD (see {status.log})"
        print(f"  {status.name:<{width}}  pid {status.pid:<7}  {status.endpoint:<40}  {state}")
    if vm_counts is not None:
        summary = ", ".join(f"{count} {state}" for state, count in sorted(vm_counts.items())) or "none"
        print(f"  VMs: {summary}")
    return 0 if all(status.alive for status in statuses) else 1
