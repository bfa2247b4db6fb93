"""`sevlaunch guest attest`: inside an SEV-SNP guest, attest to the owner and receive the launch's secret.

    sevlaunch guest attest --init-data /run/sevlaunch/init-data.json --out /run/sevlaunch \\
        [--source auto|configfs|sev-guest] [--vmpl 0] [--timeout 30]

Reads the init data (whose SHA-256 is this launch's HOST_DATA), asks the owner it names for a challenge,
gets a report through configfs-tsm or /dev/sev-guest (`auto`: configfs-tsm when the kernel has it), and
writes the released secret to OUT/secret, mode 0600. The owner is reached over server-authenticated TLS
only, trusting the init data's CA and nothing else. The secret is never printed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import read_bytes, write_private
from sevlaunch.cli.bounds import float_in
from sevlaunch.guest.source import GuestInterfaceUnavailable, GuestReportSource
from sevlaunch.limits import MAX_TIMEOUT_SECONDS
from sevlaunch.snp.initdata import InitData

SOURCES = ("auto", "configfs", "sev-guest")
SECRET_FILE = "secret"  # noqa: S105 - a file name


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "guest", help="inside an SEV-SNP guest: attest to the owner and receive the secret"
    )
    actions = parser.add_subparsers(dest="guest_command", required=True, metavar="ACTION")
    attest = actions.add_parser("attest", help="attest with a fresh report and write the released secret")
    attest.add_argument("--init-data", required=True, metavar="FILE", help="the launch's init data")
    attest.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the secret (OUT/secret, 0600)"
    )
    attest.add_argument("--source", choices=SOURCES, default="auto", help="report interface (default auto)")
    attest.add_argument(
        "--vmpl", type=int, default=0, choices=range(4), help="VMPL of the report (default 0)"
    )
    attest.add_argument(
        "--timeout", type=float_in(0, MAX_TIMEOUT_SECONDS), default=30.0, help="seconds per call to the owner"
    )
    attest.set_defaults(func=_attest)


def report_source(name: str) -> GuestReportSource:
    """The report interface `--source` names; `auto` prefers configfs-tsm (Linux 6.7+)."""
    from sevlaunch.guest import ConfigfsTsmSource, DevSevGuest, TsmTree

    if name == "configfs" or (name == "auto" and TsmTree().available()):
        return ConfigfsTsmSource()
    if name == "sev-guest" or os.path.exists("/dev/sev-guest"):
        return DevSevGuest()
    raise GuestInterfaceUnavailable("neither configfs-tsm nor /dev/sev-guest is present: not an SNP guest?")


def _attest(args: argparse.Namespace) -> int:
    from sevlaunch.guest.agent import attest_and_receive
    from sevlaunch.guest.owner_client import GrpcOwnerClient

    if args.timeout <= 0:
        raise CommandError("--timeout must be positive")
    out = Path(args.out)
    if not out.is_dir():
        raise CommandError(f"--out {out}: not a folder")
    init_data = InitData.parse(read_bytes(args.init_data))
    source = report_source(args.source)
    with GrpcOwnerClient(init_data, timeout=args.timeout) as owner:
        released = attest_and_receive(init_data, owner, source, vmpl=args.vmpl)
    write_private(out / SECRET_FILE, released.secret)
    print(
        f"released {len(released.secret)} bytes to {out / SECRET_FILE} "
        f"(authorization {init_data.authorization_id}, measurement {released.measurement.hex()[:16]}...)"
    )
    return 0
