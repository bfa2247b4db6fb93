"""`sevlaunch launch`: an orchestrated attested launch through a launcher, printing progress events as
they arrive. Exit status 0 only when the guest reached RUNNING; 1 when the launch failed (closed)."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import parse_int
from sevlaunch.rpc import error_info, secure_channel_sync
from sevlaunch.rpc.v1 import launcher_pb2, launcher_pb2_grpc
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.tlsnames import server_name


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("launch", help="launch an attested SEV/SEV-ES guest through a launcher")
    p.add_argument("--launcher", required=True, metavar="HOST:PORT", help="launcher_svc endpoint")
    p.add_argument(
        "--owner", required=True, metavar="HOST:PORT", help="owner_svc endpoint the launcher calls"
    )
    p.add_argument("--workload", required=True, metavar="ID", help="workload id at the owner")
    p.add_argument("--firmware", required=True, metavar="PATH", help="OVMF image on the launcher's host")
    p.add_argument("--kernel", metavar="PATH", help="kernel for direct boot (measured with kernel hashes)")
    p.add_argument("--initrd", metavar="PATH")
    p.add_argument("--cmdline")
    p.add_argument("--sev-es", action="store_true", help="launch an SEV-ES guest")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument(
        "--vcpu-type",
        metavar="MODEL",
        help="vCPU model pinned for the guest, e.g. EPYC-v4 or EPYC-Milan (default: the launcher's for "
        "SEV-ES, none for SEV); SEV-ES measurements depend on it",
    )
    p.add_argument(
        "--without-secret",
        action="store_true",
        help="the guest may run without a secret, if the owner agrees (ReleaseSecret no_secret)",
    )
    p.add_argument("--memory", type=int, default=1024, metavar="MIB")
    p.add_argument("--policy", type=parse_int, help="guest policy (default 0x3, or 0x7 with --sev-es)")
    p.add_argument("--name", default="guest", help="guest name")
    p.add_argument("--tls-dir", required=True, help="folder with ca.pem and the identity's certificate")
    p.add_argument("--identity", default="client", help="certificate name in the TLS folder")
    p.add_argument(
        "--launcher-identity",
        default="launcher",
        help="the identity the launcher must prove (default launcher.sevlaunch.internal)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole launch")
    p.set_defaults(func=_launch)


def _phase(value: int) -> str:
    return launcher_pb2.Phase.Name(value).removeprefix("PHASE_")  # type: ignore[arg-type]


def _launch(args: argparse.Namespace) -> int:
    if args.kernel is None and (args.initrd or args.cmdline):
        raise CommandError("--initrd and --cmdline need --kernel")
    policy = args.policy if args.policy is not None else (0x7 if args.sev_es else 0x3)
    if bool(policy & PolicyFlags.ES) != args.sev_es:
        raise CommandError(f"policy {policy:#x} and --sev-es disagree (policy bit 2 is ES)")
    spec = launcher_pb2.GuestSpec(
        name=args.name,
        memory_mib=args.memory,
        vcpus=args.vcpus,
        firmware_path=args.firmware,
        kernel_path=args.kernel or "",
        initrd_path=args.initrd or "",
        cmdline=args.cmdline or "",
        mode=launcher_pb2.SEV_MODE_SEV_ES if args.sev_es else launcher_pb2.SEV_MODE_SEV,
        policy=policy,
        vcpu_type=args.vcpu_type or "",
        launch_without_secret=args.without_secret,
    )
    request = launcher_pb2.LaunchRequest(
        spec=spec, owner=launcher_pb2.OwnerRef(endpoint=args.owner, workload_id=args.workload)
    )
    try:
        expected = server_name(args.launcher_identity)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    channel = secure_channel_sync(args.launcher, args.tls_dir, args.identity, server_name=expected)
    with channel:
        stub = launcher_pb2_grpc.LauncherServiceStub(channel)
        last = None
        try:
            for event in stub.Launch(request, timeout=args.timeout):
                last = event
                took = event.duration.ToMilliseconds()
                if event.phase == launcher_pb2.PHASE_FAILED:
                    print(
                        f"FAILED in {_phase(event.failed_phase)}: {event.reason}"
                        + (f" ({event.detail})" if event.detail else "")
                        + f" [launch {event.launch_id}]",
                        flush=True,
                    )
                else:
                    print(f"{_phase(event.phase):<16} {took:>7} ms  {event.domain_name}", flush=True)
        except grpc.RpcError as exc:
            info = error_info(exc)
            raise CommandError(
                f"launch refused: {info.code.name} {info.reason or ''} {info.message}".strip()
            ) from None
    return 0 if last is not None and last.phase == launcher_pb2.PHASE_RUNNING else 1
