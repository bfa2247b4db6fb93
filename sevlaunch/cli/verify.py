"""`sevlaunch verify`: checks a platform's SEV certificate chain up to a trusted AMD root.

    sevlaunch verify --chain FILE                  FILE = PDH‖PEK‖OCA‖CEK‖ASK‖ARK (sevctl export --full)
    sevlaunch verify --pdh F --pek F --oca F --cek F [--ask F --ark F]
    ... [--ca ASK_ARK_FILE]...                     extra trusted roots (e.g. the emulator's)

Without --ask/--ark the pinned root of the generation whose ASK signed the CEK is used. Prints every
link's result; exits 0 only when all of them hold.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import read_bytes
from sevlaunch.sev.amd_cert import AMDCertificate, parse_ark
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.chain import (
    CertificateChain,
    TrustedRoot,
    check_links,
    load_roots_file,
    pinned_roots,
    root_for_cek,
)

EXIT_UNTRUSTED = 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "verify",
        help="verify a platform certificate chain against pinned AMD roots",
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
        help="an extra trusted root, an ASK||ARK file (repeatable)",
    )
    parser.set_defaults(func=run)


def _load_chain(args: argparse.Namespace, roots: tuple[TrustedRoot, ...]) -> CertificateChain:
    parts = ("pdh", "pek", "oca", "cek")
    if args.chain is not None:
        if any(getattr(args, n) is not None for n in (*parts, "ask", "ark")):
            raise CommandError("give either --chain or the separate certificate files, not both")
        return CertificateChain.from_full_bytes(read_bytes(args.chain))
    missing = [f"--{n}" for n in parts if getattr(args, n) is None]
    if missing:
        raise CommandError(f"missing {', '.join(missing)} (or give --chain)")
    if (args.ask is None) != (args.ark is None):
        raise CommandError("give --ask and --ark together, or neither")
    pdh, pek, oca, cek = (SEVCertificate.from_bytes(read_bytes(getattr(args, n))) for n in parts)
    if args.ask is not None:
        ask = AMDCertificate.from_bytes(read_bytes(args.ask))
        ark = parse_ark(read_bytes(args.ark))
    else:
        root = root_for_cek(cek, roots)
        ask, ark = root.ask, root.ark
    return CertificateChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark)


def run(args: argparse.Namespace) -> int:
    extra = tuple(load_roots_file(read_bytes(path), path) for path in args.ca)
    roots = pinned_roots() + extra
    chain = _load_chain(args, roots)
    results = check_links(chain, roots)
    trusted = next((r for r in roots if r.ark == chain.ark), None)
    if trusted is None:
        print("root: untrusted ARK")
    else:
        generation = trusted.generation.value if trusted.generation is not None else "none (extra root)"
        print(f"root: {trusted.name} (generation: {generation})")
    print(f"CEK fingerprint: {chain.cek.fingerprint()}")
    for result in results:
        if result.ok:
            print(f"  {result.link:<10}  ok" + (f"  ({result.detail})" if result.detail else ""))
        else:
            reason = result.reason.value if result.reason is not None else "failed"
            print(f"  {result.link:<10}  FAILED  {reason}: {result.detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"sevlaunch: chain NOT verified: {', '.join(r.link for r in failed)} failed", file=sys.stderr)
        return EXIT_UNTRUSTED
    print("chain verified")
    return 0
