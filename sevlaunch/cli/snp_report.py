"""`sevlaunch snp verify-report | show-report | vcek-url`: SEV-SNP attestation reports, offline.

    sevlaunch snp verify-report --report R --cert VCEK_OR_VLEK [--chain ASK_ARK.pem]
                                [--product milan|genoa|turin] [--at YYYY-MM-DD] [--policy FILE]
                                [--crl FILE]... [--trust-root ARK_ASK.pem]... [--json]
    sevlaunch snp show-report --report R [--product P] [--json]
    sevlaunch snp vcek-url --report R [--product P] [--kds-url URL]

verify-report exits 0 when the report is verified (and appraised, with --policy), 1 when it is refused
(the failed check is printed), 2 on a usage error (unreadable file, bad --at, bad policy document).
Trust comes from AMD's roots pinned in the package; --trust-root adds a root (e.g. an emulated AMD's)
only for this run. Without --policy the report is verified but not appraised, and the output says so.
The product is --product, else the report's CPUID (v3+), else the certificate issuer's name (which only
selects the pinned root to check against).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sevlaunch.cli import CommandError, UsageError
from sevlaunch.cli._common import read_bytes
from sevlaunch.sev.errors import SevError

if TYPE_CHECKING:
    from cryptography import x509

    from sevlaunch.snp.report import AttestationReport
    from sevlaunch.snp.tcb import Product

EXIT_REFUSED = 1
PRODUCTS = ("milan", "genoa", "turin")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = sub.add_parser(
        "verify-report",
        help="verify an attestation report: VCEK/VLEK chain to AMD's pinned roots, signature, TCB, policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--report", required=True, metavar="FILE", help="the raw report (1184 bytes)")
    verify.add_argument("--cert", required=True, metavar="FILE", help="the VCEK or VLEK, DER or PEM")
    verify.add_argument("--chain", metavar="FILE", help="ASK (or ASVK) + ARK, PEM (default: the pinned ones)")
    verify.add_argument("--product", choices=PRODUCTS)
    verify.add_argument(
        "--at", metavar="DATE", help="check validity at YYYY-MM-DD[THH:MM:SS] UTC (default now)"
    )
    verify.add_argument("--policy", metavar="FILE", help="appraisal policy, JSON")
    verify.add_argument("--crl", metavar="FILE", action="append", default=[], help="an AMD CRL (repeatable)")
    verify.add_argument(
        "--trust-root",
        metavar="FILE",
        action="append",
        default=[],
        help="an extra trusted root, ARK + ASK/ASVK PEM, e.g. an emulator's (repeatable)",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run_verify)

    show = sub.add_parser("show-report", help="print the fields of an attestation report")
    show.add_argument("--report", required=True, metavar="FILE")
    show.add_argument("--product", choices=PRODUCTS, help="decodes TCBs of a v2 report")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    url = sub.add_parser("vcek-url", help="the AMD KDS URL of the VCEK that signs a report")
    url.add_argument("--report", required=True, metavar="FILE")
    url.add_argument("--product", choices=PRODUCTS, help="needed for a v2 report")
    url.add_argument("--kds-url", default=None, metavar="URL", help="KDS base URL (default AMD's)")
    url.set_defaults(func=run_vcek_url)


def _parse_at(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--at {value!r} is not YYYY-MM-DD[THH:MM:SS]") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _load_policy(path: str | None) -> Any:
    from sevlaunch.snp.appraisal import AppraisalPolicy

    if path is None:
        return None
    try:
        document = json.loads(read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"--policy {path}: not JSON ({exc})") from None
    try:
        return AppraisalPolicy.from_json(document)
    except SevError as exc:
        raise CommandError(f"--policy {path}: {exc}") from None


class _Refused(Exception):
    def __init__(self, check: str, error: SevError) -> None:
        self.check = check
        self.error = error
        super().__init__(f"{check}: {error}")


def run_verify(args: argparse.Namespace) -> int:
    from sevlaunch.snp.appraisal import appraise, verify_report
    from sevlaunch.snp.certs import (
        load_certificate,
        load_certificates,
        load_crl,
        root_from_pem,
        verify_vek_chain,
    )
    from sevlaunch.snp.report import AttestationReport

    at = _parse_at(args.at)
    policy = _load_policy(args.policy)
    report_raw, cert_raw = read_bytes(args.report), read_bytes(args.cert)
    chain_raw = read_bytes(args.chain) if args.chain else None
    crl_raw = [read_bytes(p) for p in args.crl]
    root_raw = [(p, read_bytes(p)) for p in args.trust_root]

    lines: list[str] = []
    result: dict[str, Any] = {"verified": False, "appraised": False, "at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    step = "report"
    try:
        report = AttestationReport.from_bytes(report_raw)
        lines.append(
            f"report: v{report.version}, signed by {report.signing_key.name}, vmpl {report.vmpl}, "
            f"policy {report.policy:#x}"
        )
        step = "certificate"
        vek = load_certificate(cert_raw, what="--cert")
        chain = load_certificates(chain_raw, what="--chain") if chain_raw is not None else []
        crls = [load_crl(data, what="--crl") for data in crl_raw]
        step = "product"
        product = _product(args.product, report, vek)
        report.product(product)
        result["product"] = product.value
        lines.append(f"product: {product.value}")
        step = "chain"
        extra = [root_from_pem(data, product, name=path) for path, data in root_raw]
        verified = verify_vek_chain(vek, product, at=at, chain=chain, extra_roots=extra, crls=crls)
        result["root"] = verified.root
        result["signing_key"] = verified.kind.value
        crl_note = f", {len(crls)} CRL(s) checked" if crls else ""
        lines.append(
            f"chain: {verified.root} -> {verified.kind.value.upper()} ok (at {result['at']}{crl_note})"
        )
        step = "report_signature"
        verify_report(report, verified, product=product)
        lines.append(f"report signature ({verified.kind.value.upper()}, ECDSA P-384): ok")
        lines.append(f"reported_tcb = {verified.kind.value.upper()} TCB ({verified.tcb}): ok")
        if verified.kind.value == "vcek":
            lines.append("chip_id = VCEK hwID: ok")
        result["verified"] = True
        result["report"] = report.as_json(product)
        if policy is not None:
            step = "appraisal"
            appraise(report, policy, product=product)
            result["appraised"] = True
            lines.append(f"appraisal ({args.policy}): ok")
        else:
            lines.append("appraisal: not done (no --policy)")
    except SevError as exc:
        return _refused(args, lines, result, _Refused(step, exc))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
        print("report verified" + (" and appraised" if result["appraised"] else ""))
    return 0


def _refused(args: argparse.Namespace, lines: list[str], result: dict[str, Any], refusal: _Refused) -> int:
    error = refusal.error
    result["verified"] = result["verified"] and refusal.check == "appraisal"
    result["refused"] = {"check": refusal.check, "reason": error.reason.value, "detail": error.detail}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
        print(f"REFUSED at {refusal.check}: {error.reason.value}: {error.detail}")
        print(f"sevlaunch: report NOT accepted: {refusal.check} failed", file=sys.stderr)
    return EXIT_REFUSED


def _product(given: str | None, report: AttestationReport, vek: x509.Certificate) -> Product:
    from cryptography.x509.oid import NameOID

    from sevlaunch.snp.tcb import Product

    if given is not None:
        return Product(given)
    if report.cpuid_fam_id:
        return report.product()
    issuer_cns = {a.value for a in vek.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)}
    for product in Product:
        if issuer_cns & {f"SEV-{product.kds_name}", f"SEV-VLEK-{product.kds_name}"}:
            return product
    raise UsageError(
        f"cannot tell the product of a v{report.version} report issued by "
        f"{vek.issuer.rfc4514_string()}: give --product"
    )


def run_show(args: argparse.Namespace) -> int:
    from sevlaunch.snp.policy import platform_info_names
    from sevlaunch.snp.report import AttestationReport
    from sevlaunch.snp.tcb import Product

    report = AttestationReport.from_bytes(read_bytes(args.report))
    product = None
    try:
        product = report.product(Product(args.product) if args.product else None)
    except SevError:
        if args.product or report.cpuid_fam_id:
            raise
    data = report.as_json(product)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    try:
        policy_text = ", ".join(report.guest_policy().flag_names()) or "-"
    except SevError as exc:
        policy_text = f"malformed ({exc.detail})"
    for key, value in data.items():
        if key.endswith("_tcb_decoded"):
            continue
        text = f"{value:#x}" if key in ("policy", "platform_info") and isinstance(value, int) else value
        if key == "policy":
            text = f"{text} ({policy_text})"
        elif key == "platform_info":
            text = f"{text} ({', '.join(platform_info_names(report.platform_info)) or '-'})"
        elif key.endswith("_tcb") and product is not None:
            text = f"{value:#018x} ({getattr(report.tcbs(product), key.removesuffix('_tcb'))})"
        print(f"{key:<20} {text}")
    if product is None:
        print("(TCBs not decoded: a v2 report does not say its product; give --product)")
    return 0


def run_vcek_url(args: argparse.Namespace) -> int:
    from sevlaunch.snp.kds import DEFAULT_KDS_URL, report_vcek_url
    from sevlaunch.snp.report import AttestationReport, SigningKey
    from sevlaunch.snp.tcb import Product

    report = AttestationReport.from_bytes(read_bytes(args.report))
    if report.signing_key is SigningKey.VLEK:
        raise CommandError("the report is VLEK-signed: a VLEK comes from the cloud provider, not from KDS")
    product = Product(args.product) if args.product else None
    if product is None and not report.cpuid_fam_id:
        raise UsageError(f"a v{report.version} report does not say its product: give --product")
    print(report_vcek_url(report, product, base_url=args.kds_url or DEFAULT_KDS_URL))
    return 0
