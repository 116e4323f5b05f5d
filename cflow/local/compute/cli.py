"""``cflow emulator compute``: run the Compute Engine emulator in the foreground.

``emulator`` is a group: other emulators can add their own sub-subcommands
with ``emulator_subparsers(subparsers)``.
"""

import argparse
import signal
import sys
import threading
import weakref
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from cflow.local.compute.quotas import QuotaSetting

EMULATOR_GROUP = "emulator"

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# The ``emulator`` group parser -> its sub-subparsers (argparse keeps no public link between them).
_GROUP_SUBPARSERS: "weakref.WeakKeyDictionary[argparse.ArgumentParser, SubParsers]" = weakref.WeakKeyDictionary()


def emulator_subparsers(subparsers: SubParsers) -> SubParsers:
    """Returns the sub-subparsers of the ``emulator`` group, creating the group once."""
    existing = subparsers.choices.get(EMULATOR_GROUP)
    if existing is not None:
        return _GROUP_SUBPARSERS[existing]
    group = subparsers.add_parser(EMULATOR_GROUP, help="run a local emulator of a Google Cloud service")
    group_subparsers = group.add_subparsers(dest="emulator", metavar="SERVICE")

    def print_help(args: argparse.Namespace) -> int:
        group.print_help()
        return 2

    group.set_defaults(func=print_help)
    _GROUP_SUBPARSERS[group] = group_subparsers
    return group_subparsers


def _zone_capacity(text: str) -> tuple[str, int]:
    zone, separator, count = text.partition("=")
    if not separator or not zone or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ZONE=N (e.g. us-central1-a=10)")
    return zone, int(count)


def _quota(text: str) -> "QuotaSetting":
    from cflow.local.compute.quotas import parse_quota_setting

    try:
        return parse_quota_setting(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers: SubParsers) -> argparse.ArgumentParser:
    """Registers ``cflow emulator compute``."""
    from cflow.local import LOCAL_PROJECT
    from cflow.local.compute.rootfs import RECIPES

    parser = emulator_subparsers(subparsers).add_parser(
        "compute",
        help="serve Compute Engine v1 locally; each VM is a local process group",
        description="Serve Compute Engine v1 at http://HOST:PORT/compute/v1/ until SIGTERM/SIGINT. "
        "Prints 'compute emulator listening on URL' once requests are accepted.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = pick a free one; see the printed URL)")
    parser.add_argument("--project", default=LOCAL_PROJECT, help=f"the default project (default {LOCAL_PROJECT}; any project is served)")
    parser.add_argument("--state-dir", help="VM disks live in DIR/vms/NAME-ID/ (default: a temporary dir deleted at exit)")
    parser.add_argument("--pubsub-emulator-host", help="HOST:PORT given to every VM as PUBSUB_EMULATOR_HOST")
    parser.add_argument("--storage-emulator-host", help="http://HOST:PORT given to every VM as STORAGE_EMULATOR_HOST")
    parser.add_argument("--shutdown-grace", type=float, metavar="S", help="grace period of shutdown scripts (default 30 s Spot, 90 s standard)")
    parser.add_argument("--preempt-mean-s", type=float, metavar="S", help="preempt each Spot VM after a random lifetime with this mean")
    parser.add_argument(
        "--zone-capacity", type=_zone_capacity, action="append", default=[], metavar="ZONE=N", help="at most N live VMs in ZONE (repeatable); more stock out"
    )
    parser.add_argument(
        "--quota", type=_quota, action="append", default=[], metavar="[REGION:]METRIC=N",
        help="limit a quota as regions.get reports it (repeatable; without REGION, in every region): CPUS, PREEMPTIBLE_CPUS, "
        "INSTANCES, IN_USE_ADDRESSES, GPUS_ALL_REGIONS, NVIDIA_T4_GPUS, PREEMPTIBLE_NVIDIA_T4_GPUS... Unset metrics are generous; "
        "Spot VMs count in CPUS unless PREEMPTIBLE_CPUS is above 0 or set here (even to 0). Beyond a limit: 403 quotaExceeded",
    )
    parser.add_argument("--cpu-quota", type=int, metavar="N", help="short for --quota CPUS=N")
    parser.add_argument(
        "--deny-external-ip", action="store_true",
        help="organization policy constraints/compute.vmExternalIpAccess: refuse every VM with an access config (412 conditionNotMet)",
    )
    parser.add_argument("--no-default-network", action="store_true", help="projects start without the 'default' auto-mode network")
    parser.add_argument("--slow-vms", type=float, default=0.0, metavar="FRACTION",
                        help="this fraction of VMs (chosen with --seed) gets only 1/--slow-factor of the time: paused part of every second")
    parser.add_argument("--slow-factor", type=float, default=5.0, metavar="X", help="how much slower a slow VM is (default 5)")
    parser.add_argument("--error-rate", type=float, default=0.0, metavar="R", help="fraction of API requests answered 429 or 503")
    parser.add_argument("--boot-delay", type=float, default=0.0, metavar="S", help="seconds in PROVISIONING+STAGING before RUNNING")
    parser.add_argument("--seed", type=int, help="random seed for faults and ids")
    parser.add_argument(
        "--rate-limit-per-minute", type=int, metavar="N",
        help="GCE's per-project rate quota: N requests a minute in each group (changes, gets, lists, operation reads); "
        "more is 403 rateLimitExceeded (default: no limit)",
    )
    parser.add_argument(
        "--resource-not-ready", action=argparse.BooleanOptionalAction, default=True,
        help="delete or stop of a VM that is still booting or already stopping is 400 resourceNotReady, as on GCE "
        "(default); --no-resource-not-ready accepts them",
    )
    parser.add_argument(
        "--vm-root", choices=sorted(RECIPES), metavar="NAME",
        help="run every VM's scripts on a real root (debian-12: a minimal Debian 12 like the GCE image, built once with debootstrap "
        "and cached under ~/.cache/cflow/), each VM on its own overlay in its own mount namespace; needs root. "
        "Default: VMs share the host's filesystem",
    )  # fmt: skip
    parser.add_argument(
        "--auth-token-file",
        metavar="F",
        help="answer only requests with 'Authorization: Bearer <the token in F>' (others: 401, as GCE); VMs' metadata servers stay open",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the emulator until SIGTERM or SIGINT; returns 0 after every VM is down."""
    from cflow.local.compute.emulator import ComputeEmulator, EmulatorOptions

    options = EmulatorOptions(
        host=args.host,
        port=args.port,
        project=args.project,
        state_dir=args.state_dir,
        pubsub_emulator_host=args.pubsub_emulator_host,
        storage_emulator_host=args.storage_emulator_host,
        shutdown_grace_s=args.shutdown_grace,
        preempt_mean_s=args.preempt_mean_s,
        zone_capacity=dict(args.zone_capacity),
        cpu_quota=args.cpu_quota,
        quotas=list(args.quota),
        deny_external_ip=args.deny_external_ip,
        default_network=not args.no_default_network,
        error_rate=args.error_rate,
        boot_delay_s=args.boot_delay,
        seed=args.seed,
        rate_limit_per_minute=args.rate_limit_per_minute,
        resource_not_ready=args.resource_not_ready,
        slow_vms=args.slow_vms,
        slow_factor=args.slow_factor,
        vm_root=args.vm_root,
        auth_token_file=args.auth_token_file,
    )
    stop_requested = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop_requested.set()) for number in (signal.SIGTERM, signal.SIGINT)}
    emulator = ComputeEmulator(options)
    try:
        base_url = emulator.start()
        print(f"compute emulator listening on {base_url}", flush=True)
        while not stop_requested.wait(0.5):
            pass
        print("compute emulator stopping: powering off every VM", file=sys.stderr, flush=True)
    finally:
        emulator.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0
