"""`sevlaunch secret build`: packages a secret table (OVMF's SEV secret table) for LAUNCH_SECRET.

    sevlaunch secret build --tek tek.bin --tik tik.bin --launch-measure-blob B64 \\
        --secret 736869e5-84f0-4973-92ec-06879ce3da0b:passphrase.txt [--secret GUID:FILE ...] \\
        --header-out header.bin --payload-out payload.bin [--base64] [--api-major N --api-minor N]

Only package a secret for a launch whose measurement was verified: the MAC binds it to that measure.
Secret files are taken byte for byte (a LUKS passphrase for grub/efi_secret should end in a NUL).
Give --api-major/--api-minor of the platform: firmware before API 0.17 leaves the measure out of the MAC;
without them, the 0.17-and-later rule applies. --base64 writes the outputs as base64 text, as libvirt's
`sev-secret-header` / `sev-secret` and QMP `sev-inject-launch-secret` take them.
"""

from __future__ import annotations

import argparse
import base64
import uuid
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError, UsageError
from sevlaunch.cli._common import parse_b64, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.limits import MAX_SECRET_AREA_SIZE, U8_MAX
from sevlaunch.sev.measurement import LaunchMeasurement
from sevlaunch.sev.secret import DEFAULT_SECRET_AREA_SIZE, SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import TransportKeys


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("secret", help="launch secrets", description="Launch secrets (LAUNCH_SECRET).")
    actions = parser.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="package a secret table for LAUNCH_SECRET",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--tek", metavar="FILE", required=True, help="the 16-byte TEK of the session")
    build.add_argument("--tik", metavar="FILE", required=True, help="the 16-byte TIK of the session")
    build.add_argument(
        "--launch-measure-blob",
        metavar="B64",
        required=True,
        help="the verified LAUNCH_MEASURE output, base64",
    )
    build.add_argument(
        "--secret", metavar="GUID:FILE", action="append", required=True, help="a table entry (repeatable)"
    )
    build.add_argument(
        "--header-out", metavar="FILE", required=True, help="where to write the 52-byte header"
    )
    build.add_argument(
        "--payload-out", metavar="FILE", required=True, help="where to write the encrypted table"
    )
    build.add_argument("--base64", action="store_true", help="write both outputs as base64 text")
    # One byte each in PLATFORM_STATUS: a wider value would silently pick the wrong MAC rule.
    build.add_argument(
        "--api-major", type=int_in(0, U8_MAX, hex_ok=False), help="the platform's firmware API major"
    )
    build.add_argument(
        "--api-minor", type=int_in(0, U8_MAX, hex_ok=False), help="the platform's firmware API minor"
    )
    build.add_argument(
        "--max-size",
        type=int_in(1, MAX_SECRET_AREA_SIZE, hex_ok=False),
        default=DEFAULT_SECRET_AREA_SIZE,
        help=f"size of the guest's secret area in bytes (default {DEFAULT_SECRET_AREA_SIZE}, OVMF's;"
        f" at most {MAX_SECRET_AREA_SIZE})",
    )
    build.add_argument(
        "--iv", metavar="B64", help="a fixed 16-byte IV, for reproducible tests (default: random)"
    )
    build.set_defaults(func=run_build)


def _read_key(path: str, what: str) -> bytes:
    data = read_bytes(path)
    if len(data) != 16:
        raise CommandError(f"{what} file {path} must hold 16 bytes, got {len(data)}")
    return data


def _entry(spec: str) -> SecretEntry:
    guid_text, sep, path = spec.partition(":")
    if not sep or not path:
        raise CommandError(f"--secret wants GUID:FILE, got {spec!r}")
    try:
        guid = uuid.UUID(guid_text)
    except ValueError:
        raise CommandError(f"--secret: {guid_text!r} is not a GUID") from None
    return SecretEntry(guid, read_bytes(path))


def _write(path: str, data: bytes, *, as_base64: bool) -> None:
    try:
        Path(path).write_bytes(base64.b64encode(data) + b"\n" if as_base64 else data)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


def run_build(args: argparse.Namespace) -> int:
    if (args.api_major is None) != (args.api_minor is None):
        raise UsageError("give --api-major and --api-minor together, or neither")
    keys = TransportKeys(_read_key(args.tek, "TEK"), _read_key(args.tik, "TIK"))
    measurement = LaunchMeasurement.from_b64(args.launch_measure_blob.strip())
    iv = None if args.iv is None else parse_b64(args.iv, what="--iv")
    table = SecretTable.of([_entry(spec) for spec in args.secret])
    table.require_fits(args.max_size)
    header, payload = package_secret(
        keys, measurement.measure, table.to_bytes(), iv=iv, api_major=args.api_major, api_minor=args.api_minor
    )
    _write(args.header_out, header.to_bytes(), as_base64=args.base64)
    _write(args.payload_out, payload, as_base64=args.base64)
    print(f"secret table: {len(table.entries)} entries, {len(payload)} bytes")
    return 0
