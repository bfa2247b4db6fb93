"""`sevlaunch session`: makes the LAUNCH_START inputs for one launch, against a verified platform chain.

    sevlaunch session --chain FILE --policy 0x3 --out DIR
    sevlaunch session --pdh F --pek F --oca F --cek F [--ask F --ark F] --policy N --out DIR [--ca FILE]

The chain is verified up to a pinned AMD root (or an extra root given with --ca) before anything is made;
an unverified chain is refused, naming the failing link. Certificates are read as raw bytes or base64
(as libvirt and QEMU report them). Writes DIR/godh.b64 and DIR/session.b64 (libvirt's <dhCert> and
<session>), and DIR/tek.bin and DIR/tik.bin (mode 0600): keep these to verify the measurement and to
package the secret.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import parse_int, read_bytes, write_private
from sevlaunch.sev.amd_cert import AMDCertificate, parse_ark
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.chain import (
    CertificateChain,
    TrustedRoot,
    load_roots_file,
    pinned_roots,
    root_for_cek,
    verify_chain,
)
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.session import create_session

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "session",
        help="create a launch session (GODH, session blob, TEK/TIK) for a verified platform",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--chain", metavar="FILE", help="full chain PDH||PEK||OCA||CEK||ASK||ARK")
    for name in ("pdh", "pek", "oca", "cek", "ask", "ark"):
        parser.add_argument(f"--{name}", metavar="FILE", help=f"the {name.upper()} certificate")
    parser.add_argument(
        "--ca",
        metavar="FILE",
        action="append",
        default=[],
        help="an extra trusted root, ASK||ARK (repeatable)",
    )
    parser.add_argument("--policy", type=parse_int, required=True, help="guest policy (e.g. 0x3, 0x7)")
    parser.add_argument("--out", metavar="DIR", required=True, help="directory for the output files")
    parser.set_defaults(func=run)


def _maybe_base64(data: bytes, *, what: str) -> bytes:
    """Certificates are binary; text made only of the base64 alphabet is taken as base64 (libvirt, QEMU)."""
    compact = b"".join(data.split())
    if not compact or compact.strip(_B64_ALPHABET):
        return data
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(f"{what} looks like base64 but does not decode") from None


def _read_cert(path: str, what: str) -> SEVCertificate:
    return SEVCertificate.from_bytes(_maybe_base64(read_bytes(path), what=what))


def _load_chain(args: argparse.Namespace, roots: tuple[TrustedRoot, ...]) -> CertificateChain:
    parts = ("pdh", "pek", "oca", "cek")
    if args.chain is not None:
        if any(getattr(args, n) is not None for n in (*parts, "ask", "ark")):
            raise CommandError("give either --chain or the separate certificate files, not both")
        data = read_bytes(args.chain)
        return CertificateChain.from_full_bytes(_maybe_base64(data, what=args.chain))
    missing = [f"--{n}" for n in parts if getattr(args, n) is None]
    if missing:
        raise CommandError(f"missing {', '.join(missing)} (or give --chain)")
    if (args.ask is None) != (args.ark is None):
        raise CommandError("give --ask and --ark together, or neither")
    pdh, pek, oca, cek = (_read_cert(getattr(args, n), f"--{n}") for n in parts)
    if args.ask is not None:
        ask = AMDCertificate.from_bytes(read_bytes(args.ask))
        ark = parse_ark(read_bytes(args.ark))
    else:
        root = root_for_cek(cek, roots)
        ask, ark = root.ask, root.ark
    return CertificateChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark)


def run(args: argparse.Namespace) -> int:
    policy = GuestPolicy(args.policy)
    extra = tuple(load_roots_file(read_bytes(path), path) for path in args.ca)
    chain = _load_chain(args, pinned_roots() + extra)
    # Raises VerificationFailed naming the first failing link: no session for an unverified platform.
    verified = verify_chain(chain, extra_roots=extra)
    session = create_session(verified.chain.pdh, policy)

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "godh.b64").write_text(base64.b64encode(session.godh.to_bytes()).decode("ascii") + "\n")
        (out / "session.b64").write_text(base64.b64encode(session.blob.to_bytes()).decode("ascii") + "\n")
        write_private(out / "tek.bin", session.keys.tek)
        write_private(out / "tik.bin", session.keys.tik)
    except OSError as exc:
        raise CommandError(f"cannot write to {out}: {exc.strerror}") from None
    print(f"chain verified against root {verified.root_name}; policy {policy.describe()}")
    print(f"wrote {out / 'godh.b64'}, {out / 'session.b64'}, {out / 'tek.bin'}, {out / 'tik.bin'} (0600)")
    return 0
