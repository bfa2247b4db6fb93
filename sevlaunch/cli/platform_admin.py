"""`sevlaunch platform rotate|generate|provision|reset`: sevctl's administration verbs, over mTLS against
a platform service (identity `platform-admin`).

    sevlaunch platform rotate      [--pdh-out FILE]          # PDH_GEN: a new PDH (RotatePDH)
    sevlaunch platform generate                              # PEK_GEN: a new PEK, OCA and PDH (GeneratePEK)
    sevlaunch platform provision --csr-out pek.csr           # PEK_CSR: the PEK for an owner's OCA to sign
    sevlaunch platform provision --pek pek.signed --oca oca.cert   # PEK_CERT_IMPORT (ImportPEKCertificate)
    sevlaunch platform reset --yes                           # FACTORY_RESET (FactoryReset)

Every session opened with the old PDH becomes unusable after rotate, generate, provision or reset; the
firmware refuses these while guests run (FAILED_PRECONDITION, firmware_status INVALID_PLATFORM_STATE).
Certificates are the 0x824-byte SEV format; `--pek`/`--oca` also take base64 text.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from sevlaunch.cli import UsageError
from sevlaunch.cli._common import add_client_args, call_service, maybe_base64, read_bytes
from sevlaunch.cli.output import add_json_flag, emit, message_dict
from sevlaunch.rpc.v1 import platform_pb2, platform_pb2_grpc

Stub = platform_pb2_grpc.PlatformServiceStub


def _rotate(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.RotatePDH(platform_pb2.RotatePDHRequest(), timeout=args.timeout)
    if args.pdh_out:
        Path(args.pdh_out).write_bytes(reply.pdh_cert)
    data = {
        "action": "rotate",
        "pdh_sha256": hashlib.sha256(reply.pdh_cert).hexdigest(),
        "pdh_bytes": len(reply.pdh_cert),
        "pdh_out": args.pdh_out,
    }
    emit(args, data, f"new PDH (SHA-256 {data['pdh_sha256']})" + (f", written to {args.pdh_out}"
         if args.pdh_out else ""))  # fmt: skip
    return 0


def _generate(stub: Stub, args: argparse.Namespace) -> int:
    stub.GeneratePEK(platform_pb2.GeneratePEKRequest(), timeout=args.timeout)
    emit(args, {"action": "generate"}, "new PEK and PDH, self-signed OCA")
    return 0


def _provision(stub: Stub, args: argparse.Namespace) -> int:
    if args.csr_out is not None:
        if args.pek is not None or args.oca is not None:
            raise UsageError("give --csr-out (step 1) or --pek and --oca (step 2), not both")
        reply = stub.GetPEKCSR(platform_pb2.GetPEKCSRRequest(), timeout=args.timeout)
        Path(args.csr_out).write_bytes(reply.pek_csr)
        data = {
            "action": "csr",
            "csr_out": args.csr_out,
            "csr_bytes": len(reply.pek_csr),
            "csr_sha256": hashlib.sha256(reply.pek_csr).hexdigest(),
        }
        emit(args, data, f"wrote the PEK signing request ({len(reply.pek_csr)} bytes) to {args.csr_out}")
        return 0
    if args.pek is None or args.oca is None:
        raise UsageError("give --csr-out to fetch the PEK CSR, or --pek and --oca to import the signed PEK")
    pek = maybe_base64(read_bytes(args.pek), what="--pek")
    oca = maybe_base64(read_bytes(args.oca), what="--oca")
    stub.ImportPEKCertificate(
        platform_pb2.ImportPEKCertificateRequest(pek_cert=pek, oca_cert=oca), timeout=args.timeout
    )
    emit(
        args,
        {"action": "import", "pek_sha256": hashlib.sha256(pek).hexdigest(),
         "oca_sha256": hashlib.sha256(oca).hexdigest()},
        "imported the OCA-signed PEK; the platform is now owned externally",
    )  # fmt: skip
    return 0


def _reset(stub: Stub, args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError(
            "a factory reset destroys the platform identity (OCA, PEK, PDH); give --yes to confirm"
        )
    stub.FactoryReset(platform_pb2.FactoryResetRequest(confirm=True), timeout=args.timeout)
    emit(args, {"action": "reset"}, "platform reset: new PEK and PDH, self-signed OCA")
    return 0


def _run(args: argparse.Namespace) -> int:
    return call_service(args, platform_pb2_grpc.PlatformServiceStub, args.action)


def register_actions(actions: argparse._SubParsersAction[Any]) -> None:
    """Adds the admin verbs to `sevlaunch platform`'s action list, and `--json` to its read actions."""
    add_json_to_readers(actions)

    def verb(name: str, help_text: str, fn: Any) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=f"{help_text}.\n\n{__doc__}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        add_client_args(a, service="platform", identity="platform-admin")
        add_json_flag(a)
        a.set_defaults(func=_run, action=fn)
        return a

    rotate = verb("rotate", "generate a new PDH (PDH_GEN; sevctl rotate)", _rotate)
    rotate.add_argument("--pdh-out", metavar="FILE", help="write the new PDH certificate to FILE")
    verb("generate", "generate a new PEK and PDH, self-signed OCA (PEK_GEN; sevctl generate)", _generate)
    provision = verb(
        "provision",
        "owner-signed OCA: fetch the PEK CSR, or import the signed PEK and OCA (sevctl provision)",
        _provision,
    )
    provision.add_argument("--csr-out", metavar="FILE", help="step 1: write the PEK CSR (0x824 bytes)")
    provision.add_argument("--pek", metavar="FILE", help="step 2: the PEK signed by the OCA")
    provision.add_argument("--oca", metavar="FILE", help="step 2: the self-signed OCA certificate")
    reset = verb("reset", "factory reset: a new platform identity (FACTORY_RESET; sevctl reset)", _reset)
    reset.add_argument("--yes", action="store_true", help="confirm: the OCA, PEK and PDH are destroyed")


# ------------------------------------------------------ --json for the read actions of platform.py


def _status_json(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.GetPlatformStatus(platform_pb2.GetPlatformStatusRequest(), timeout=args.timeout)
    emit(args, message_dict(reply))
    return 0


def _id_json(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.GetIdentifier(platform_pb2.GetIdentifierRequest(), timeout=args.timeout)
    emit(args, message_dict(reply))
    return 0


def _chain_json(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.GetCertificateChain(platform_pb2.GetCertificateChainRequest(), timeout=args.timeout)
    c = reply.platform.chain
    full = c.pdh_cert + c.pek_cert + c.oca_cert + c.cek_cert + c.ask_cert + c.ark_cert
    if args.out:
        Path(args.out).write_bytes(full)
    emit(args, {**message_dict(reply), "out": args.out, "full_chain_bytes": len(full)})
    return 0


_JSON_READERS = {"status": _status_json, "id": _id_json, "chain": _chain_json}


def add_json_to_readers(actions: argparse._SubParsersAction[Any]) -> None:
    """`--json` on platform.py's read actions: with it, the reply in the one JSON style (docs/CLI.md);
    without it, the action prints as it always did."""
    for name, json_action in _JSON_READERS.items():
        parser = actions.choices.get(name)
        if parser is None or any("--json" in a.option_strings for a in parser._actions):
            continue
        add_json_flag(parser)
        text_action = parser.get_default("action")

        def dispatch(
            stub: Stub, args: argparse.Namespace, _j: Any = json_action, _t: Any = text_action
        ) -> int:
            return int(_j(stub, args) if args.json else _t(stub, args))

        parser.set_defaults(action=dispatch)
