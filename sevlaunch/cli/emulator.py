"""`sevlaunch emulator`: make, inspect and serve an emulated SEV chip (a software PSP).

* `init`: a new chip in a state directory, with its own emulated AMD root; also writes
  `DIR/ask_ark.cert` (the emulated ASK‖ARK) for whoever chooses to trust that root.
* `status`: PLATFORM_STATUS, chip id and guests.
* `kds`: an emulated AMD KDS serving the chip's ASK-signed CEK at `/cek/id/<chip id>`, and for SEV-SNP
  its VCEKs by hardware id and TCB, the cert chain and the CRL under `/vcek/v1/<product>/`.
* `update`: an emulated SEV-SNP firmware update: the current TCB changes (`--tcb bootloader=8,snp=15`;
  components not named keep their value); the reported TCB, and with it the VCEK, follows only on
  SNP_COMMIT (`--commit`, or `commit` later).
* `commit`: SNP_COMMIT. `snp-status`: SNP_PLATFORM_STATUS with the decoded TCBs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import parse_int
from sevlaunch.cli.bounds import int_in
from sevlaunch.cli.output import add_json_flag, emit, message_dict
from sevlaunch.firmware.emulator import ASK_ARK_CERT, STATE_FILE, ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.emulator.layout import EmulatorStateError
from sevlaunch.firmware.emulator.snp_keys import SNP_ROOT_PEM, has_snp_root, load_snp_root
from sevlaunch.limits import MAX_EMULATED_ASIDS, U8_MAX
from sevlaunch.snp.certs import common_name
from sevlaunch.snp.tcb import Product, TcbVersion


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("emulator", help="manage an emulated SEV chip (software PSP)")
    commands = parser.add_subparsers(dest="emulator_command", required=True, metavar="SUBCOMMAND")

    init = commands.add_parser("init", help="create an emulated chip in a state directory")
    init.add_argument("--state", required=True, help="state directory of the chip")
    defaults = ChipConfig()
    init.add_argument(
        "--generation", default=defaults.generation, help="generation label (default %(default)s)"
    )
    init.add_argument("--api-major", type=int_in(0, U8_MAX), default=defaults.api_major)
    init.add_argument("--api-minor", type=int_in(0, U8_MAX), default=defaults.api_minor)
    init.add_argument("--build", type=int_in(0, U8_MAX), default=defaults.build)
    init.add_argument(
        "--max-guests", type=int_in(0, MAX_EMULATED_ASIDS), default=defaults.max_guests, help="SEV ASIDs"
    )
    init.add_argument(
        "--max-es-guests",
        type=int_in(0, MAX_EMULATED_ASIDS),
        default=defaults.max_es_guests,
        help="SEV-ES ASIDs",
    )
    init.add_argument(
        "--root", metavar="DIR", help="reuse the emulated AMD root (ARK/ASK) of another chip directory"
    )
    init.add_argument(
        "--product",
        choices=[p.value for p in Product],
        default=defaults.product,
        help="SEV-SNP product: report version and TCB layout (default %(default)s)",
    )
    init.set_defaults(func=_init)

    update = commands.add_parser("update", help="emulated SEV-SNP firmware update (the current TCB changes)")
    update.add_argument("--state", required=True, help="state directory of the chip")
    update.add_argument(
        "--tcb", required=True, help="new SPLs, e.g. bootloader=8,tee=0,snp=15,microcode=73 (fmc= on Turin)"
    )
    update.add_argument("--build", type=int_in(0, U8_MAX), help="new firmware build (default: the next one)")
    update.add_argument("--commit", action="store_true", help="SNP_COMMIT afterwards")
    update.set_defaults(func=_update)

    commit = commands.add_parser("commit", help="SNP_COMMIT: the current TCB becomes committed and reported")
    commit.add_argument("--state", required=True, help="state directory of the chip")
    commit.set_defaults(func=_commit)

    snp_status = commands.add_parser("snp-status", help="SNP_PLATFORM_STATUS with the decoded TCBs")
    snp_status.add_argument("--state", required=True, help="state directory of the chip")
    add_json_flag(snp_status)
    snp_status.set_defaults(func=_snp_status)

    status = commands.add_parser("status", help="show the chip's PLATFORM_STATUS")
    status.add_argument("--state", required=True, help="state directory of the chip")
    add_json_flag(status)
    status.set_defaults(func=_status)

    kds = commands.add_parser("kds", help="serve the chip's ASK-signed CEK like AMD's KDS")
    kds.add_argument("--state", required=True, action="append", help="chip directory (repeatable)")
    kds.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    kds.add_argument(
        "--rate-limit",
        type=int_in(1, 1_000_000),
        metavar="N",
        help="answer at most N requests a second, then 429",
    )
    kds.add_argument("--retry-after", type=int_in(0, 3600), default=1, help="Retry-After of a 429 (seconds)")
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
            product=args.product,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    root = snp_root = None
    if args.root:
        try:
            root = EmulatedRoot.load(args.root)
        except FileNotFoundError:
            raise CommandError(f"no emulated AMD root in {args.root}") from None
        if has_snp_root(Path(args.root)):
            try:
                snp_root = load_snp_root(Path(args.root), config.snp_product)
            except EmulatorStateError as exc:
                raise CommandError(f"the SNP root in {args.root}: {exc}") from None
            if snp_root.product is not config.snp_product or common_name(snp_root.ark) != (
                f"ARK-{config.snp_product.kds_name}"
            ):
                snp_root = None  # another product's root: this chip gets its own
    firmware = EmulatedFirmware(state, config=config, root=root, snp_root=snp_root)
    print(f"emulated chip created in {state}")
    print(f"chip id:   {firmware.chip_id_hex()}")
    print(f"root:      {state / ASK_ARK_CERT} (emulated ASK||ARK; trusted only if you pass it explicitly)")
    print(
        f"snp root:  {state / SNP_ROOT_PEM} (emulated {config.product} ARK/ASK/ASVK, made on first SNP use)"
    )
    _print_status(firmware)
    return 0


def _parse_tcb(text: str, current: TcbVersion) -> TcbVersion:
    values = current.components()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = {"bl": "bootloader", "ucode": "microcode"}.get(name.strip(), name.strip())
        if not sep or name not in values:
            raise CommandError(f"--tcb: {part!r} is not NAME=VALUE with NAME one of {', '.join(values)}")
        values[name] = parse_int(value)
    try:
        return TcbVersion(current.product, **values)
    except ValueError as exc:
        raise CommandError(f"--tcb: {exc}") from None


def _print_snp(firmware: EmulatedFirmware) -> None:
    status, tcbs = firmware.snp_platform_status(), firmware.snp_tcb_status()
    print(f"product:        {tcbs.product.value}")
    print(f"snp firmware:   {status.api_major}.{status.api_minor} build {status.build_id}")
    print(
        f"committed fw:   {'.'.join(map(str, tcbs.committed_version[:2]))} build {tcbs.committed_version[2]}"
    )
    print(f"current tcb:    {tcbs.current} ({tcbs.current.raw:#018x})")
    print(f"committed tcb:  {tcbs.committed} ({tcbs.committed.raw:#018x})")
    print(f"reported tcb:   {tcbs.reported} ({tcbs.reported.raw:#018x})")
    print(f"mask chip id:   {status.mask_chip_id}   vlek loaded: {status.vlek_en}")
    print(f"snp guests:     {status.guest_count}")


def _update(args: argparse.Namespace) -> int:
    firmware = _open(args.state)
    tcb = _parse_tcb(args.tcb, firmware.snp_tcb_status().current)
    firmware.snp_firmware_update(tcb, build=args.build)
    if args.commit:
        firmware.snp_commit()
    _print_snp(firmware)
    return 0


def _commit(args: argparse.Namespace) -> int:
    firmware = _open(args.state)
    firmware.snp_commit()
    _print_snp(firmware)
    return 0


def _snp_status(args: argparse.Namespace) -> int:
    firmware = _open(args.state)
    if args.json:
        emit(args, snp_status_dict(firmware))
    else:
        _print_snp(firmware)
    return 0


def snp_status_dict(firmware: EmulatedFirmware) -> dict[str, Any]:
    """The chip's SNP status under the names and types `sevlaunch platform snp-status --json` prints
    (the GetSnpStatusResponse message in docs/CLI.md's style), read from the chip directly."""
    from sevlaunch.firmware.devsev_snp import SnpPlatformState
    from sevlaunch.rpc.v1 import platform_pb2

    status, tcbs = firmware.snp_platform_status(), firmware.snp_tcb_status()

    def tcb(t: TcbVersion) -> platform_pb2.SnpTcb:
        return platform_pb2.SnpTcb(
            bootloader=t.bootloader, tee=t.tee, snp=t.snp, microcode=t.microcode, fmc=t.fmc, raw=t.raw
        )

    reply = platform_pb2.GetSnpStatusResponse(
        product=platform_pb2.SnpProduct.Value(f"SNP_PRODUCT_{tcbs.product.name}"),
        api_major=status.api_major,
        api_minor=status.api_minor,
        build_id=status.build_id,
        initialized=status.state is SnpPlatformState.INIT,
        current_tcb=tcb(tcbs.current),
        reported_tcb=tcb(tcbs.reported),
        committed_tcb=tcb(tcbs.committed),
        mask_chip_id=status.mask_chip_id,
        mask_chip_key=status.mask_chip_key,
        vlek_loaded=status.vlek_en,
        guest_count=status.guest_count,
        hwid=firmware.snp_hwid().hex(),
    )
    return dict(message_dict(reply))


def _print_status(firmware: EmulatedFirmware) -> None:
    status = firmware.platform_status()
    config = firmware.config
    print(f"generation: {config.generation}")
    print(f"api:        {status.api_major}.{status.api_minor} build {status.build}")
    print(f"state:      {status.state.name}")
    print(f"owner:      {'external' if status.owned_externally else 'self'}")
    print(f"sev-es:     {'enabled' if status.es_enabled else 'disabled'}")
    print(f"guests:     {status.guest_count} (max {config.max_guests} SEV, {config.max_es_guests} SEV-ES)")


def status_dict(firmware: EmulatedFirmware) -> dict[str, Any]:
    """The chip's status under the names and types `sevlaunch platform status --json` prints (the
    GetPlatformStatusResponse message in docs/CLI.md's style), with what only the emulator knows."""
    from sevlaunch.rpc.v1 import common_pb2, platform_pb2

    status = firmware.platform_status()
    config = firmware.config
    reply = platform_pb2.GetPlatformStatusResponse(
        firmware=common_pb2.FirmwareVersion(
            api_major=status.api_major, api_minor=status.api_minor, build_id=status.build
        ),
        state=platform_pb2.PlatformState.Value(f"PLATFORM_STATE_{status.state.name}"),
        owned_externally=status.owned_externally,
        es_supported=status.es_enabled,
        guest_count=status.guest_count,
        flags=status.flags,
    )
    return {
        "chip_id": firmware.chip_id_hex(),
        "generation": config.generation,
        **message_dict(reply),
        "max_guests": config.max_guests,
        "max_es_guests": config.max_es_guests,
        "guests": [firmware.guest_info(h) for h in firmware.guest_handles()],
    }


def _status(args: argparse.Namespace) -> int:
    firmware = _open(args.state)
    if args.json:
        emit(args, status_dict(firmware))
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
    from sevlaunch.snp.kds import vcek_url

    host, port = _parse_listen(args.listen)
    chips = [_open(state) for state in args.state]
    server = KDSServer(chips, host=host, port=port)
    if args.rate_limit is not None:
        server.rate_limit(args.rate_limit, window=1.0, retry_after=args.retry_after)
    print(f"emulated KDS on {server.url}", flush=True)
    for chip in chips:
        print(f"  {server.url}/cek/id/{chip.chip_id_hex()}", flush=True)
        tcb = chip.snp_tcb_status().reported
        print(f"  {vcek_url(chip.snp_hwid(), tcb, base_url=server.url)}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0
