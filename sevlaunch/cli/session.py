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
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import add_chain_args, extra_roots, load_chain, write_private
from sevlaunch.cli.bounds import int_in
from sevlaunch.limits import U32_MAX
from sevlaunch.sev.chain import pinned_roots, verify_chain
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.session import create_session


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "session",
        help="create a launch session (GODH, session blob, TEK/TIK) for a verified platform",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_chain_args(parser)
    parser.add_argument(
        "--policy", type=int_in(0, U32_MAX), required=True, help="guest policy (e.g. 0x3, 0x7)"
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="directory for the output files")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = GuestPolicy(args.policy)
    extra = extra_roots(args)
    chain = load_chain(args, pinned_roots() + extra, accept_base64=True)
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
