"""`sevlaunch export`: write a platform's certificate chain to a file.

Without `--full`: PDH‖PEK‖OCA‖CEK as PDH_CERT_EXPORT gives them (the CEK without the ASK signature).
With `--full`: PDH‖PEK‖OCA‖CEK‖ASK‖ARK with the ASK-signed CEK (sevctl's `export --full` layout), which
`sevlaunch verify --chain FILE` checks; for an emulated chip pass `--ca DIR/ask_ark.cert` to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("export", help="export the platform certificate chain")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--state", help="emulated chip state directory")
    source.add_argument("--device", help="real SEV device, e.g. /dev/sev (without --full only)")
    parser.add_argument("--full", action="store_true", help="add the ASK-signed CEK, ASK and ARK")
    parser.add_argument("--out", required=True, help="output file")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    if args.device:
        if args.full:
            raise CommandError(
                "--full needs the ASK-signed CEK from AMD's KDS; ask the platform service for the full chain"
            )
        from sevlaunch.firmware.devsev import DevSev

        with DevSev(args.device) as device:
            pdh, chain = device.pdh_cert_export()
        data = pdh + chain
    else:
        from sevlaunch.cli.emulator import _open

        firmware = _open(args.state)
        if args.full:
            data = firmware.full_chain()
        else:
            pdh, chain = firmware.pdh_cert_export()
            data = pdh + chain
    Path(args.out).write_bytes(data)
    print(f"wrote {len(data)} bytes to {args.out}")
    return 0
