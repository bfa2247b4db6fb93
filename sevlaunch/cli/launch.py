"""`sevlaunch launch`: an orchestrated attested launch through a launcher, printing progress events as
they arrive. Exit status 0 only when the guest reached RUNNING; 1 when the launch failed (closed) or
was refused; 2 for a usage error.

With `--json` each event is one JSON object on its own line (JSON Lines, docs/CLI.md): `launch_id`,
`phase`, `duration_ms`, `failed_phase`, `reason`, `detail`, `domain_name`, `at`.
"""

from __future__ import annotations

import argparse
from typing import Any

from sevlaunch.cli._common import add_client_args, call_service, env_option
from sevlaunch.cli.launches import add_spec_args, guest_spec
from sevlaunch.cli.output import JSON_HELP, dumps, message_dict
from sevlaunch.rpc.v1 import launcher_pb2, launcher_pb2_grpc


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "launch",
        help="launch an attested SEV/SEV-ES guest through a launcher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_client_args(
        p,
        service="launcher",
        identity="client",
        endpoint_option="--launcher",
        server_identity_aliases=("--launcher-identity",),
        timeout=600.0,
    )
    owner = p.add_argument_group("owner")
    env_option(
        owner,
        "--owner",
        "SEVLAUNCH_OWNER_ENDPOINT",
        required=True,
        metavar="HOST:PORT",
        help="owner_svc endpoint the launcher calls (as the launcher reaches it)",
    )
    owner.add_argument("--workload", required=True, metavar="ID", help="workload id at the owner")
    owner.add_argument(
        "--without-secret",
        action="store_true",
        help="the guest may run without a secret, if the owner agrees (ReleaseSecret no_secret)",
    )
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP + "; one object per event")
    p.set_defaults(func=_run)


def _phase(value: int) -> str:
    return launcher_pb2.Phase.Name(value).removeprefix("PHASE_")  # type: ignore[arg-type]


def _run(args: argparse.Namespace) -> int:
    request = launcher_pb2.LaunchRequest(
        spec=guest_spec(args, launch_without_secret=args.without_secret),
        owner=launcher_pb2.OwnerRef(endpoint=args.owner, workload_id=args.workload),
    )
    return call_service(
        args, launcher_pb2_grpc.LauncherServiceStub, lambda stub, a: _launch(stub, a, request)
    )


def _launch(
    stub: launcher_pb2_grpc.LauncherServiceStub, args: argparse.Namespace, request: launcher_pb2.LaunchRequest
) -> int:
    last = None
    for event in stub.Launch(request, timeout=args.timeout):
        last = event
        if args.json:
            print(dumps(message_dict(event)), flush=True)
        elif event.phase == launcher_pb2.PHASE_FAILED:
            print(
                f"FAILED in {_phase(event.failed_phase)}: {event.reason}"
                + (f" ({event.detail})" if event.detail else "")
                + f" [launch {event.launch_id}; `sevlaunch launches show {event.launch_id}`]",
                flush=True,
            )
        else:
            took = event.duration.ToMilliseconds()
            print(f"{_phase(event.phase):<16} {took:>7} ms  {event.domain_name}", flush=True)
    return 0 if last is not None and last.phase == launcher_pb2.PHASE_RUNNING else 1
