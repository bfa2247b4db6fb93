"""`sevlaunch platform {status,id,chain,snp-status,vcek,cert-table}`: ask a platform service, over mTLS.

    sevlaunch platform chain --endpoint HOST:PORT --tls-dir DIR [--identity client] --out chain.cert
    sevlaunch platform vcek --endpoint HOST:PORT --tls-dir DIR --out DIR [--kind vcek|vlek]
    sevlaunch platform cert-table --endpoint HOST:PORT --tls-dir DIR [--out F | --install [F]]

`chain --out` writes PDH‖PEK‖OCA‖CEK‖ASK‖ARK (sevctl's `export --full`), which `sevlaunch verify
--chain` reads. `vcek --out DIR` writes snpguest's layout (`vcek.pem` or `vlek.pem`, `ask.pem` or
`asvk.pem`, `ark.pem`), which `--vcek-dir` of an offline platform reads. `cert-table` exports the
certificate table guests get with extended reports, or installs one (`--install` without a file: the
current chain's; needs the platform-admin identity). Failures print the gRPC status, the reason and its
details (firmware status, link).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import add_client_args, call_service
from sevlaunch.cli.output import add_json_flag, dumps, emit, message_dict
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


_PRODUCT_NAMES = {
    platform_pb2.SNP_PRODUCT_MILAN: "milan",
    platform_pb2.SNP_PRODUCT_GENOA: "genoa",
    platform_pb2.SNP_PRODUCT_TURIN: "turin",
}


def _tcb(tcb: platform_pb2.SnpTcb) -> dict[str, Any]:
    out: dict[str, Any] = {"bootloader": tcb.bootloader, "tee": tcb.tee, "snp": tcb.snp}
    out["microcode"] = tcb.microcode
    if tcb.HasField("fmc"):
        out["fmc"] = tcb.fmc
    out["raw"] = f"0x{tcb.raw:016x}"
    return out


def snp_status_text(st: platform_pb2.GetSnpStatusResponse) -> str:
    """SNP_PLATFORM_STATUS for people; `--json` prints the message itself (docs/CLI.md)."""

    def tcb(t: platform_pb2.SnpTcb) -> str:
        return " ".join(f"{k}={v}" for k, v in _tcb(t).items() if k != "raw") + f" ({t.raw:#018x})"

    committed = tcb(st.committed_tcb) if st.HasField("committed_tcb") else "- (not reported by the backend)"
    return "\n".join(
        (
            f"product:        {_PRODUCT_NAMES.get(st.product, 'unspecified')}",
            f"snp firmware:   {st.api_major}.{st.api_minor} build {st.build_id}",
            f"initialized:    {'yes' if st.initialized else 'no'}",
            f"current tcb:    {tcb(st.current_tcb)}",
            f"committed tcb:  {committed}",
            f"reported tcb:   {tcb(st.reported_tcb)}",
            f"mask chip id:   {st.mask_chip_id}   mask chip key: {st.mask_chip_key}   "
            f"vlek loaded: {st.vlek_loaded}",
            f"snp guests:     {st.guest_count}",
            f"hwid:           {st.hwid}",
        )
    )


def _snp_status(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    st = stub.GetSnpStatus(platform_pb2.GetSnpStatusRequest(), timeout=args.timeout)
    if args.out:
        Path(args.out).write_text(dumps(message_dict(st)) + "\n")
    emit(args, message_dict(st), snp_status_text(st))
    return 0


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _vcek(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    kind = {"auto": platform_pb2.VEK_KIND_AUTO, "vcek": platform_pb2.VEK_KIND_VCEK}.get(
        args.kind, platform_pb2.VEK_KIND_VLEK
    )
    reply = stub.GetVekChain(platform_pb2.GetVekChainRequest(kind=kind), timeout=args.timeout)
    vlek = reply.kind == platform_pb2.VEK_KIND_VLEK
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ("vlek", "asvk") if vlek else ("vcek", "ask")
    for name, der in ((names[0], reply.vek_cert), (names[1], reply.ask_cert), ("ark", reply.ark_cert)):
        (out / f"{name}.pem").write_bytes(_pem(der))
    (out / f"{names[0]}.der").write_bytes(reply.vek_cert)
    tcb = " ".join(f"{k}={v}" for k, v in _tcb(reply.tcb).items() if k != "raw")
    print(
        f"{names[0].upper()} of {_PRODUCT_NAMES.get(reply.product, '?')} chip {reply.hwid[:16]}… at {tcb} "
        f"(from {reply.source})\nwrote {names[0]}.pem, {names[0]}.der, {names[1]}.pem, ark.pem to {out}"
    )
    return 0


def _cert_table(stub: platform_pb2_grpc.PlatformServiceStub, args: argparse.Namespace) -> int:
    if args.install is not None:
        table = Path(args.install).read_bytes() if args.install else b""
        reply = stub.InstallSnpCertTable(
            platform_pb2.InstallSnpCertTableRequest(cert_table=table), timeout=args.timeout
        )
        installed = reply.cert_table
        print(f"installed a certificate table of {len(installed)} bytes")
        if args.out:
            Path(args.out).write_bytes(installed)
        return 0
    got = stub.GetSnpCertTable(platform_pb2.GetSnpCertTableRequest(), timeout=args.timeout)
    if not args.out:
        raise CommandError("cert-table needs --out FILE (or --install)")
    Path(args.out).write_bytes(got.cert_table)
    state = "matches" if got.matches_reported_tcb else "does NOT match"
    print(
        f"wrote the certificate table ({len(got.cert_table)} bytes) to {args.out};"
        f" it {state} the reported TCB"
    )
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
    snp = actions.add_parser("snp-status", help="SEV-SNP: firmware version, current/reported/committed TCB")
    add_client_args(snp, service="platform", identity="client")
    snp.add_argument("--out", help="also write the status as JSON (the `--json` form) to this file")
    add_json_flag(snp)
    snp.set_defaults(func=_run, action=_snp_status)
    vcek = actions.add_parser("vcek", help="SEV-SNP: the VCEK (or VLEK) chain of the reported TCB")
    add_client_args(vcek, service="platform", identity="client")
    vcek.add_argument("--out", required=True, help="directory for vcek.pem/der, ask.pem, ark.pem")
    vcek.add_argument("--kind", choices=("auto", "vcek", "vlek"), default="auto")
    vcek.set_defaults(func=_run, action=_vcek)
    table = actions.add_parser("cert-table", help="SEV-SNP: export or install guests' certificate table")
    add_client_args(table, service="platform", identity="client")
    table.add_argument("--out", help="write the (installed) table to this file")
    table.add_argument(
        "--install", nargs="?", const="", metavar="FILE",
        help="install FILE, or without FILE the current chain's table (platform-admin)",
    )  # fmt: skip
    table.set_defaults(func=_run, action=_cert_table)
    from sevlaunch.cli.platform_admin import register_actions  # rotate, generate, provision, reset; --json

    register_actions(actions)
