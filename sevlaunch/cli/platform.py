"""`sevlaunch platform {status,id,chain}`: ask a platform service, over mTLS.

    sevlaunch platform chain --endpoint HOST:PORT --tls-dir DIR [--identity client] --out chain.cert

`chain --out` writes PDH‖PEK‖OCA‖CEK‖ASK‖ARK (sevctl's `export --full`), which `sevlaunch verify
--chain` reads. Failures print the gRPC status, the reason and its details (firmware status, link).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sevlaunch.cli._common import add_client_args, call_service
from sevlaunch.rpc.v1 import platform_pb2, platform_pb2_grpc

_STATE_NAMES = {
    platform_pb2.PLATFORM_STATE_UNINIT: "UNINIT",
    platform_pb2.PLATFORM_STATE_INIT: "INIT",
    platform_pb2.PLATFORM_STATE_WORKING: "WORKING",
}


def _run(args: argparse.Namespace) -> int:
    return call_service(args, platform_pb2_grpc.PlatformServiceStub, args.action)


def _status(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    st = stub.GetPlatformStatus(platform_pb2.GetPlatformStatusRequest(), timeout=args.timeout)
    out = {
        "api_major": st.firmware.api_major,
        "api_minor": st.firmware.api_minor,
        "build_id": st.firmware.build_id,
        "state": _STATE_NAMES.get(st.state, "UNSPECIFIED"),
        "owned_externally": st.owned_externally,
        "es_supported": st.es_supported,
        "guest_count": st.guest_count,
        "flags": f"0x{st.flags:08x}",
    }
    _emit(json.dumps(out, indent=2), args.out)
    return 0


def _id(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    reply = stub.GetIdentifier(platform_pb2.GetIdentifierRequest(), timeout=args.timeout)
    _emit(reply.chip_id, args.out)
    return 0


def _chain(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    reply = stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest(), timeout=args.timeout)
    p = reply.platform
    c = p.chain
    full = c.pdh_cert + c.pek_cert + c.oca_cert + c.cek_cert + c.ask_cert + c.ark_cert
    summary = (
        f"chip {p.chip_id[:16]}…  generation {p.generation}  firmware {p.firmware.api_major}."
        f"{p.firmware.api_minor} build {p.firmware.build_id}  CEK from {reply.cek_source}"
    )
    if args.out:
        Path(args.out).write_bytes(full)
        print(f"{summary}\nwrote PDH||PEK||OCA||CEK||ASK||ARK ({len(full)} bytes) to {args.out}")
    else:
        print(summary)
    return 0


def _emit(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "platform",
        help="query and administer a platform service (status, id, chain; sevctl verbs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="platform_command", required=True, metavar="ACTION")
    for name, fn, text in (
        ("status", _status, "firmware version, state, guests"),
        ("id", _id, "the chip id (lower hex)"),
        ("chain", _chain, "the full certificate chain (PDH..ARK)"),
    ):
        a = actions.add_parser(name, help=text)
        add_client_args(a, service="platform", identity="client")
        a.add_argument("--out", help="write the result to this file")
        a.set_defaults(func=_run, action=fn)
    from sevlaunch.cli.platform_admin import register_actions  # rotate, generate, provision, reset; --json

    register_actions(actions)
