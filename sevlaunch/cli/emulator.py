"""`sevlaunch emulator`: make, inspect and serve an emulated SEV chip (a software PSP).

* `init`: a new chip in a state directory, with its own emulated AMD root; also writes
  `DIR/ask_ark.cert` (the emulated ASK‖ARK) for whoever chooses to trust that root.
* `status`: PLATFORM_STATUS, chip id and guests.
* `kds`: an emulated AMD KDS serving the chip's ASK-signed CEK at `/cek/id/<chip id>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import parse_int
from sevlaunch.firmware.emulator import ASK_ARK_CERT, STATE_FILE, ChipConfig, EmulatedFirmware, EmulatedRoot


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("emulator", help="manage an emulated SEV chip (software PSP)")
    commands = parser.add_subparsers(dest="emulator_command", required=True, metavar="SUBCOMMAND")

    init = commands.add_parser("init", help="create an emulated chip in a state directory")
    init.add_argument("--state", required=True, help="state directory of the chip")
    defaults = ChipConfig()
    init.add_argument(
        "--generation", default=defaults.generation, help="generation label (default %(default)s)"
    )
    init.add_argument("--api-major", type=parse_int, default=defaults.api_major)
    init.add_argument("--api-minor", type=parse_int, default=defaults.api_minor)
    init.add_argument("--build", type=parse_int, default=defaults.build)
    init.add_argument("--max-guests", type=parse_int, default=defaults.max_guests, help="SEV ASIDs")
    init.add_argument("--max-es-guests", type=parse_int, default=defaults.max_es_guests, help="SEV-ES ASIDs")
    init.add_argument(
        "--root", metavar="DIR", help="reuse the emulated AMD root (ARK/ASK) of another chip directory"
    )
    init.set_defaults(func=_init)

    status = commands.add_parser("status", help="show the chip's PLATFORM_STATUS")
    status.add_argument("--state", required=True, help="state directory of the chip")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    kds = commands.add_parser("kds", help="serve the chip's ASK-signed CEK like AMD's KDS")
    kds.add_argument("--state", required=True, action="append", help="chip directory (repeatable)")
    kds.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    kds.set_defaults(func=_kds)


def _open(state: str) -> EmulatedFirmware:
    if not (Path(state) / STATE_FILE).exists():
        raise CommandError(f"no emulated chip in {state} (run `sevlaunch emulator init --state {state}`)")
    return EmulatedFirmware(state, create=False)


def _init(args: argparse.Namespace) -> int:
    state = Path(args.state)
    if (state / STATE_FILE).exists():
        raise CommandError(f"{state} already holds an emulated chip")
    try:
        config = ChipConfig(
            generation=args.generation,
            api_major=args.api_major,
            api_minor=args.api_minor,
            build=args.build,
            max_guests=args.max_guests,
            max_es_guests=args.max_es_guests,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    root = None
    if args.root:
        try:
            root = EmulatedRoot.load(args.root)
        except FileNotFoundError:
            raise CommandError(f"no emulated AMD root in {args.root}") from None
    firmware = EmulatedFirmware(state, config=config, root=root)
    print(f"emulated chip created in {state}")
    print(f"chip id:   {firmware.chip_id_hex()}")
    print(f"root:      {state / ASK_ARK_CERT} (emulated ASK||ARK; trusted only if you pass it explicitly)")
    _print_status(firmware)
    return 0


def _print_status(firmware: EmulatedFirmware) -> None:
    status = firmware.platform_status()
    config = firmware.config
    print(f"generation: {config.generation}")
    print(f"api:        {status.api_major}.{status.api_minor} build {status.build}")
    print(f"state:      {status.state.name}")
    print(f"owner:      {'external' if status.owned_externally else 'self'}")
    print(f"sev-es:     {'enabled' if status.es_enabled else 'disabled'}")
    print(f"guests:     {status.guest_count} (max {config.max_guests} SEV, {config.max_es_guests} SEV-ES)")


def _status(args: argparse.Namespace) -> int:
    firmware = _open(args.state)
    if args.json:
        status = firmware.platform_status()
        config = firmware.config
        doc = {
            "chip_id": firmware.chip_id_hex(),
            "generation": config.generation,
            "api_major": status.api_major,
            "api_minor": status.api_minor,
            "build": status.build,
            "state": status.state.name,
            "owned_externally": status.owned_externally,
            "es_enabled": status.es_enabled,
            "guest_count": status.guest_count,
            "max_guests": config.max_guests,
            "max_es_guests": config.max_es_guests,
            "guests": [firmware.guest_info(h) for h in firmware.guest_handles()],
        }
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"chip id:    {firmware.chip_id_hex()}")
    _print_status(firmware)
    for handle in firmware.guest_handles():
        info = firmware.guest_info(handle)
        print(
            f"  guest {info['handle']}: asid {info['asid']} policy {int(info['policy']):#06x} {info['state']}"
        )
    return 0


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise CommandError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _kds(args: argparse.Namespace) -> int:
    from sevlaunch.firmware.kds import KDSServer

    host, port = _parse_listen(args.listen)
    chips = [_open(state) for state in args.state]
    server = KDSServer(chips, host=host, port=port)
    print(f"emulated KDS on {server.url}", flush=True)
    for chip in chips:
        print(f"  {server.url}/cek/id/{chip.chip_id_hex()}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0
