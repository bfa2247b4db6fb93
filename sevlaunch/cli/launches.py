"""`sevlaunch launches ...`: a launcher's launches, and the client-driven two-phase launch.

    sevlaunch launches list [--all] [--json]
    sevlaunch launches show LAUNCH_ID [--json]          # state, the phase that failed, reason, detail
    sevlaunch launches abort LAUNCH_ID                  # a launch not yet RUNNING: destroyed
    sevlaunch launches destroy LAUNCH_ID                # the guest of any launch: destroyed, undefined
    sevlaunch launches prepare --godh godh.b64 --session session.b64 --firmware OVMF.fd [...]
    sevlaunch launches complete LAUNCH_ID --secret-header header.bin --secret-payload payload.bin

The two-phase launch is for an owner that will not let the provider's launcher call it: `sevlaunch
session` makes the GODH and session blob, `prepare` starts the guest paused and prints its launch
measurement, `sevlaunch secret build` packages the secret for that measurement, and `complete` injects
it and resumes the guest. A prepared launch not completed by its `complete_by` time is destroyed.

Each command connects like the others (`--endpoint`, `--tls-dir`, ... or their SEVLAUNCH_* variables,
docs/CLI.md); the launcher's read RPCs and these actions need the identity `client`.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from sevlaunch.cli import UsageError
from sevlaunch.cli._common import add_client_args, call_service, maybe_base64, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.cli.output import add_json_flag, emit, message_dict, table
from sevlaunch.limits import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, U32_MAX
from sevlaunch.rpc.v1 import launcher_pb2, launcher_pb2_grpc

Stub = launcher_pb2_grpc.LauncherServiceStub

DEFAULT_MEMORY_MIB = 1024
# Guest policy bit 2 (AMD SEV API, "Guest policy"): the guest is SEV-ES.
_POLICY_ES = 0x4


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    """The guest options of `launch` and `launches prepare` (the GuestSpec message)."""
    g = parser.add_argument_group("guest")
    g.add_argument("--name", default="guest", help="guest name; the domain name adds the launch id")
    g.add_argument(
        "--firmware",
        "--ovmf",
        required=True,
        metavar="PATH",
        help="OVMF image on the launcher's host, under its --image-dir (sev-snp-measure's --ovmf too)",
    )
    g.add_argument("--kernel", metavar="PATH", help="kernel for direct boot, measured with kernel hashes")
    g.add_argument("--initrd", metavar="PATH", help="initrd for direct boot (with --kernel)")
    g.add_argument(
        "--cmdline",
        "--append",
        metavar="STRING",
        help="kernel command line (with --kernel; sev-snp-measure's --append too)",
    )
    g.add_argument("--sev-es", action="store_true", help="launch an SEV-ES guest (policy bit 2)")
    g.add_argument(
        "--vcpus",
        type=int_in(1, MAX_VCPUS, hex_ok=False),
        default=1,
        metavar="N",
        help=f"number of vCPUs, 1..{MAX_VCPUS} (each SEV-ES vCPU's VMSA is measured)",
    )
    g.add_argument(
        "--vcpu-type",
        metavar="MODEL",
        help="vCPU model pinned for the guest, e.g. EPYC-v4 or EPYC-Milan (default: the launcher's for "
        "SEV-ES, none for SEV); SEV-ES measurements depend on it",
    )
    g.add_argument(
        "--memory",
        type=int_in(MIN_MEMORY_MIB, MAX_MEMORY_MIB, hex_ok=False),
        default=DEFAULT_MEMORY_MIB,
        metavar="MIB",
        help=f"guest memory in MiB, {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}",
    )
    g.add_argument(
        "--policy",
        type=int_in(0, U32_MAX),
        metavar="N",
        help="guest policy, decimal or 0x hex (default 0x3, or 0x7 with --sev-es)",
    )


def guest_spec(args: argparse.Namespace, **extra: Any) -> launcher_pb2.GuestSpec:
    """The GuestSpec of `add_spec_args`; a UsageError when the options contradict each other."""
    if args.kernel is None and (args.initrd or args.cmdline):
        raise UsageError("--initrd and --cmdline need --kernel")
    policy = args.policy if args.policy is not None else (0x7 if args.sev_es else 0x3)
    if bool(policy & _POLICY_ES) != args.sev_es:
        raise UsageError(f"policy {policy:#x} and --sev-es disagree (policy bit 2 is ES)")
    return launcher_pb2.GuestSpec(
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
        **extra,
    )


# ------------------------------------------------------------------------------ the commands


def launch_dict(info: launcher_pb2.LaunchInfo) -> dict[str, Any]:
    """A LaunchInfo in the one JSON style (docs/CLI.md)."""
    return dict(message_dict(info))


def _list(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.ListLaunches(
        launcher_pb2.ListLaunchesRequest(include_finished=args.all), timeout=args.timeout
    )
    launches = [launch_dict(info) for info in reply.launches]
    text = table(
        launches, ("launch_id", "state", "failed_phase", "reason", "guest_name", "workload_id", "created_at")
    )
    emit(args, {"launches": launches}, text if launches else "no launches")
    return 0


def _show(stub: Stub, args: argparse.Namespace) -> int:
    info = stub.GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=args.launch_id), timeout=args.timeout)
    emit(args, launch_dict(info))
    return 0


def _abort(stub: Stub, args: argparse.Namespace) -> int:
    info = stub.AbortLaunch(launcher_pb2.AbortLaunchRequest(launch_id=args.launch_id), timeout=args.timeout)
    data = launch_dict(info)
    emit(args, data, f"launch {args.launch_id} aborted: {data['state']}")
    return 0


def _destroy(stub: Stub, args: argparse.Namespace) -> int:
    info = stub.DestroyGuest(launcher_pb2.DestroyGuestRequest(launch_id=args.launch_id), timeout=args.timeout)
    data = launch_dict(info)
    emit(
        args, data, f"launch {args.launch_id}: guest {data['domain_name'] or '-'} destroyed ({data['state']})"
    )
    return 0


def _prepare(stub: Stub, args: argparse.Namespace) -> int:
    spec = guest_spec(args)  # usage errors first, before any file is read
    godh = maybe_base64(read_bytes(args.godh), what="--godh")
    session = maybe_base64(read_bytes(args.session), what="--session")
    reply = stub.PrepareLaunch(
        launcher_pb2.PrepareLaunchRequest(spec=spec, godh_cert=godh, session=session),
        timeout=args.timeout,
    )
    data = dict(message_dict(reply))
    blob = base64.b64encode(reply.measurement).decode("ascii")
    if args.measurement_out:
        Path(args.measurement_out).write_text(blob + "\n")
    text = "\n".join(
        (
            f"launch_id:    {reply.launch_id}",
            f"domain_name:  {reply.domain_name}",
            f"firmware:     API {reply.api_major}.{reply.api_minor} build {reply.build_id}",
            f"policy:       {reply.policy:#x}",
            f"complete_by:  {data['complete_by']}",
            f"measurement:  {blob}",
            "(base64 measure||mnonce: verify it, then `sevlaunch secret build --launch-measure-blob ...`"
            f" and `sevlaunch launches complete {reply.launch_id} ...`)",
        )
    )
    emit(args, data, text)
    return 0


def _complete(stub: Stub, args: argparse.Namespace) -> int:
    header = maybe_base64(read_bytes(args.secret_header), what="--secret-header")
    payload = maybe_base64(read_bytes(args.secret_payload), what="--secret-payload")
    info = stub.CompleteLaunch(
        launcher_pb2.CompleteLaunchRequest(
            launch_id=args.launch_id, secret_header=header, secret_payload=payload
        ),
        timeout=args.timeout,
    )
    data = launch_dict(info)
    emit(args, data, f"launch {args.launch_id}: {data['state']} ({data['domain_name']})")
    return 0 if info.state == launcher_pb2.PHASE_RUNNING else 1


def _run(args: argparse.Namespace) -> int:
    return call_service(args, launcher_pb2_grpc.LauncherServiceStub, args.action)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "launches",
        help="list, inspect, abort and destroy a launcher's launches; the two-phase steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="launches_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, fn: Any, *, launch_id: bool = True) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        if launch_id:
            a.add_argument("launch_id", metavar="LAUNCH_ID", help="the launch id (`launches list`)")
        add_client_args(a, service="launcher", identity="client")
        add_json_flag(a)
        a.set_defaults(func=_run, action=fn)
        return a

    listing = action("list", "launches in progress and running (with --all, also ended ones)", _list,
                     launch_id=False)  # fmt: skip
    listing.add_argument("--all", action="store_true", help="also FAILED and DESTROYED launches")
    action("show", "one launch: its state, the phase that failed and why, its guest", _show)
    action("abort", "destroy a launch that has not reached RUNNING", _abort)
    action("destroy", "destroy and undefine the guest of a launch, in any state", _destroy)

    prepare = action(
        "prepare",
        "two-phase launch, step 1: start the guest paused with a GODH and session; print its measurement",
        _prepare,
        launch_id=False,
    )
    prepare.add_argument(
        "--godh", required=True, metavar="FILE", help="the owner's GODH certificate, binary or base64 "
        "(`sevlaunch session` writes godh.b64)",
    )  # fmt: skip
    prepare.add_argument(
        "--session", required=True, metavar="FILE", help="the launch session blob, binary or base64 "
        "(`sevlaunch session` writes session.b64)",
    )  # fmt: skip
    prepare.add_argument(
        "--measurement-out", metavar="FILE", help="also write the measurement blob (base64) to FILE"
    )
    add_spec_args(prepare)

    complete = action(
        "complete", "two-phase launch, step 2: inject the packaged secret and resume the guest", _complete
    )
    complete.add_argument(
        "--secret-header", required=True, metavar="FILE", help="the 52-byte secret header, binary or "
        "base64 (`sevlaunch secret build --header-out`)",
    )  # fmt: skip
    complete.add_argument(
        "--secret-payload", required=True, metavar="FILE", help="the encrypted secret table, binary or "
        "base64 (`sevlaunch secret build --payload-out`)",
    )  # fmt: skip
