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

from sevlaunch.cli._common import add_chain_args, extra_roots, load_chain
from sevlaunch.sev.chain import check_links, pinned_roots

EXIT_UNTRUSTED = 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "verify",
        help="verify a platform certificate chain against pinned AMD roots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_chain_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    roots = pinned_roots() + extra_roots(args)
    chain = load_chain(args, roots)
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
