"""`sevlaunch measurement digest|build`: expected launch digests and launch measurements.

`digest` prints what sev-snp-measure prints for `--mode sev|seves|snp|snp:ovmf-hash|snp:svsm` (with the
init2 VMSA layout for SEV-ES) and accepts its spellings (`--mode seves` for sev-es, `--ovmf`, `--append`,
`--output-format hex|base64` for every mode); `build` prints the 48-byte measure‖mnonce blob in base64,
as QEMU and libvirt show it, like `sevctl measurement build`, and takes its inputs as sevctl does:
`--tik`, `--nonce` and `--launch-measure-blob` as a file or base64 text, `--launch-digest` in base64
(or hex), `--outfile` for the binary blob.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import re
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError, UsageError
from sevlaunch.cli._common import parse_b64, parse_hex, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.limits import MAX_VCPU_FAMILY, MAX_VCPU_MODEL, MAX_VCPU_STEPPING, MAX_VCPUS, U8_MAX, U32_MAX
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.types import LaunchDigest, MNonce
from sevlaunch.sev.vcpu import VCPU_TYPES, VMSALayout, vcpu_signature

_MEASUREMENT_BLOB = 48
_MNONCE = 16
_TIK = 16
#: sev-snp-measure's spellings of the SEV modes.
_MODE_ALIASES = {"seves": Technology.SEV_ES.value}
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def _canonical_mode(args: argparse.Namespace) -> None:
    if args.mode is not None:
        args.mode = _MODE_ALIASES.get(args.mode, args.mode)


def _hex_or_b64(text: str, *, what: str, length: int) -> bytes:
    """`length` bytes given as hex (ours) or base64 (sevctl's). Unambiguous for the lengths used here
    (16, 32): their base64 ends in `=`, which hex never holds."""
    text = text.strip()
    if _HEX.fullmatch(text):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"{what} is neither hex nor base64") from None
    if len(raw) != length:
        raise UsageError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _file_or_text(value: str) -> tuple[bytes | None, str]:
    """sevctl's "path or base64": the file's bytes when `value` names a file, else None and the text."""
    path = Path(value)
    if path.is_file():
        return read_bytes(value), value
    return None, value


def _add_digest_options(parser: argparse.ArgumentParser, *, mode_required: bool, snp: bool = False) -> None:
    group = parser.add_argument_group("launch digest")
    group.add_argument(
        "--mode",
        choices=[m.value for m in Technology if snp or m is not Technology.SEV_SNP]
        + list(_MODE_ALIASES)
        + (list(_SNP_MODES) if snp else []),
        required=mode_required,
        help="guest type; seves is sev-snp-measure's name for sev-es"
        + ("" if mode_required else " (default: sev-es when the policy has ES, else sev)"),
    )
    group.add_argument("--firmware", "--ovmf", metavar="OVMF", help="the OVMF code image QEMU loads")
    group.add_argument("--kernel", metavar="FILE", help="kernel booted with kernel-hashes=on")
    group.add_argument("--initrd", metavar="FILE", help="initrd (with --kernel)")
    group.add_argument("--cmdline", "--append", metavar="STRING", help="kernel command line (with --kernel)")
    group.add_argument(
        "--vcpus",
        metavar="N",
        type=int_in(1, MAX_VCPUS, hex_ok=False),
        default=1,
        help=f"vCPU count (SEV-ES; default 1, at most {MAX_VCPUS})",
    )
    vcpu = group.add_mutually_exclusive_group()
    vcpu.add_argument("--vcpu-type", metavar="NAME", choices=list(VCPU_TYPES), help="QEMU CPU model (SEV-ES)")
    vcpu.add_argument(
        "--vcpu-sig", metavar="N", type=int_in(0, U32_MAX), help="CPUID(1).EAX of the guest vCPU (SEV-ES)"
    )
    vcpu.add_argument(
        "--vcpu-family", metavar="N", type=int_in(0, MAX_VCPU_FAMILY), help="vCPU family (SEV-ES)"
    )
    group.add_argument(
        "--vcpu-model", metavar="N", type=int_in(0, MAX_VCPU_MODEL), help="vCPU model (with --vcpu-family)"
    )
    group.add_argument(
        "--vcpu-stepping",
        metavar="N",
        type=int_in(0, MAX_VCPU_STEPPING),
        help="vCPU stepping (with --vcpu-family)",
    )
    group.add_argument(
        "--vmsa-layout",
        choices=[v.value for v in VMSALayout],
        default=VMSALayout.init2.value,
        help="init2: KVM with KVM_SEV_INIT2 (MXCSR/FCW set); legacy: older KVM (default: init2)",
    )


# sev-snp-measure's spellings; `sev-snp` (the Technology value) is `snp`.
_SNP_MODES = ("snp", "snp:ovmf-hash", "snp:svsm")
_SNP_ONLY = ("guest_features", "vmm_type", "snp_ovmf_hash", "svsm", "vars_size", "vars_file")


def _vmm_type(value: str) -> Any:
    from sevlaunch.snp.vmsa import VmmType

    try:
        return VmmType.parse(value)
    except SevError:
        raise argparse.ArgumentTypeError(f"unknown VMM type {value!r} (qemu, ec2 or gce)") from None


def _add_snp_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SEV-SNP (--mode snp, sev-snp, snp:ovmf-hash, snp:svsm)")
    group.add_argument(
        "--guest-features",
        metavar="N",
        type=int_in(0, (1 << 64) - 1),
        help="the VMSA's SEV features, bit 0 (SNPActive) set (default 0x1; 0x21 adds DebugSwap)",
    )
    group.add_argument(
        "--vmm-type",
        metavar="VMM",
        type=_vmm_type,
        help="who creates the VMSAs: qemu (default), ec2 or gce",
    )
    group.add_argument(
        "--snp-ovmf-hash",
        metavar="HEX",
        help="the firmware's precomputed digest (from --mode snp:ovmf-hash); the image is then read only "
        "for its metadata",
    )
    group.add_argument("--svsm", metavar="FILE", help="the COCONUT-SVSM image (snp:svsm)")
    vars_group = group.add_mutually_exclusive_group()
    vars_group.add_argument(
        "--vars-size", metavar="N", type=int_in(0, U32_MAX), help="OVMF variable store size (snp:svsm)"
    )
    vars_group.add_argument(
        "--vars-file", metavar="FILE", help="the OVMF variable store, for its size (snp:svsm)"
    )


def _vars_size(args: argparse.Namespace) -> int:
    if args.vars_file is not None:
        try:
            return Path(args.vars_file).stat().st_size
        except OSError as exc:
            raise CommandError(f"cannot read {args.vars_file}: {exc.strerror}") from None
    if args.vars_size is None:
        raise UsageError("snp:svsm needs --vars-size or --vars-file")
    return int(args.vars_size)


def _compute_snp_digest(args: argparse.Namespace) -> bytes:
    # Here, not at the top: the SEV modes never load the SNP code.
    from sevlaunch.snp.launch_digest import launch_digest as snp_launch_digest
    from sevlaunch.snp.launch_digest import ovmf_hash, svsm_launch_digest
    from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES, VmmType

    if args.firmware is None:
        raise UsageError("--firmware is required to compute a launch digest")
    if args.kernel is None and (args.initrd is not None or args.cmdline is not None):
        raise UsageError("--initrd and --cmdline need --kernel")
    if args.svsm is not None and args.mode != "snp:svsm":
        raise UsageError("--svsm needs --mode snp:svsm")
    if (args.vars_size is not None or args.vars_file is not None) and args.mode != "snp:svsm":
        raise UsageError("--vars-size and --vars-file need --mode snp:svsm")
    if args.mode == "snp:ovmf-hash":
        if args.kernel is not None or args.snp_ovmf_hash is not None:
            raise UsageError("snp:ovmf-hash hashes the firmware alone: no --kernel, no --snp-ovmf-hash")
        return ovmf_hash(read_bytes(args.firmware))
    vmm_type = VmmType.QEMU if args.vmm_type is None else args.vmm_type
    vcpu_sig = _vcpu_sig(args)
    if vcpu_sig is None and vmm_type is VmmType.QEMU:
        raise UsageError(
            f"--mode {args.mode} needs --vcpu-type, --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping"
        )
    if args.mode == "snp:svsm":
        if args.svsm is None:
            raise UsageError("snp:svsm needs --svsm")
        if vmm_type is not VmmType.QEMU:
            raise UsageError("snp:svsm is measured for QEMU only")
        if args.kernel is not None or args.snp_ovmf_hash is not None:
            raise UsageError("snp:svsm takes no --kernel and no --snp-ovmf-hash")
        if vcpu_sig is None:
            raise UsageError("snp:svsm needs the vCPU type")
        return svsm_launch_digest(
            read_bytes(args.firmware),
            read_bytes(args.svsm),
            vars_size=_vars_size(args),
            vcpus=args.vcpus,
            vcpu_sig=vcpu_sig,
        )
    seed = None
    if args.snp_ovmf_hash is not None:
        seed = parse_hex(args.snp_ovmf_hash, what="--snp-ovmf-hash", length=48)
    return snp_launch_digest(
        read_bytes(args.firmware),
        vcpus=args.vcpus,
        vcpu_sig=vcpu_sig,
        guest_features=DEFAULT_GUEST_FEATURES if args.guest_features is None else args.guest_features,
        vmm_type=vmm_type,
        kernel=None if args.kernel is None else read_bytes(args.kernel),
        initrd=None if args.initrd is None else read_bytes(args.initrd),
        cmdline=args.cmdline,
        ovmf_hash=seed,
    )


def _vcpu_sig(args: argparse.Namespace) -> int | None:
    split = (args.vcpu_model, args.vcpu_stepping)
    if args.vcpu_family is None and any(v is not None for v in split):
        raise UsageError("--vcpu-model and --vcpu-stepping need --vcpu-family")
    if args.vcpu_family is not None:
        if any(v is None for v in split):
            raise UsageError("--vcpu-family needs --vcpu-model and --vcpu-stepping")
        return vcpu_signature(family=args.vcpu_family, model=args.vcpu_model, stepping=args.vcpu_stepping)
    if args.vcpu_type is not None:
        return vcpu_signature(args.vcpu_type)
    if args.vcpu_sig is not None:
        if not 0 <= args.vcpu_sig <= 0xFFFFFFFF:
            raise UsageError("--vcpu-sig must fit in 32 bits")
        return int(args.vcpu_sig)
    return None


def _compute_digest(args: argparse.Namespace, mode: Technology) -> LaunchDigest:
    if args.firmware is None:
        raise UsageError("--firmware is required to compute a launch digest")
    if args.kernel is None and (args.initrd is not None or args.cmdline is not None):
        raise UsageError("--initrd and --cmdline need --kernel")
    vcpu_sig = _vcpu_sig(args)
    if mode is Technology.SEV_ES:
        if vcpu_sig is None:
            raise UsageError(
                "sev-es needs --vcpu-type, --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping"
            )
        if args.vcpus < 1:
            raise UsageError("--vcpus must be at least 1")
    return launch_digest(
        read_bytes(args.firmware),
        mode=mode,
        vcpus=args.vcpus,
        vcpu_sig=vcpu_sig,
        layout=VMSALayout(args.vmsa_layout),
        kernel=None if args.kernel is None else read_bytes(args.kernel),
        initrd=None if args.initrd is None else read_bytes(args.initrd),
        cmdline=args.cmdline,
    )


def _run_digest(args: argparse.Namespace) -> int:
    _canonical_mode(args)
    if args.mode in _SNP_MODES or args.mode == Technology.SEV_SNP:
        digest: bytes = _compute_snp_digest(args)
    else:
        given = [f"--{n.replace('_', '-')}" for n in _SNP_ONLY if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to the SNP modes")
        digest = _compute_digest(args, Technology(args.mode))
    print(base64.b64encode(digest).decode("ascii") if args.output_format == "base64" else digest.hex())
    return 0


def _run_build(args: argparse.Namespace) -> int:
    # Here, not at the top: the measure's HMAC needs `cryptography`, which `digest` does not load.
    from sevlaunch.sev.measurement import LaunchMeasurement, compute_measure
    from sevlaunch.sev.policy import PolicyFlags

    for name in ("api_major", "api_minor", "build_id"):
        if not 0 <= getattr(args, name) <= 0xFF:
            raise UsageError(f"--{name.replace('_', '-')} must be 0..255")
    if not 0 <= args.policy <= 0xFFFFFFFF:
        raise UsageError("--policy must fit in 32 bits")
    _canonical_mode(args)
    tik = _tik(args.tik)
    mnonce = _mnonce(args)

    if args.launch_digest is not None:
        if args.firmware is not None or args.mode is not None:
            raise UsageError("give either --launch-digest or the firmware options, not both")
        digest = LaunchDigest(_hex_or_b64(args.launch_digest, what="--launch-digest", length=32))
    else:
        # QEMU sets the ES policy bit exactly for SEV-ES guests: a digest of the other kind cannot match.
        policy_mode = Technology.SEV_ES if args.policy & PolicyFlags.ES else Technology.SEV
        if args.mode is not None and Technology(args.mode) is not policy_mode:
            raise UsageError(f"--mode {args.mode} contradicts policy {args.policy:#x} (ES bit)")
        digest = _compute_digest(args, policy_mode)

    measure = compute_measure(
        tik,
        api_major=args.api_major,
        api_minor=args.api_minor,
        build_id=args.build_id,
        policy=args.policy,
        launch_digest=digest,
        mnonce=MNonce(mnonce),
    )
    measurement = LaunchMeasurement(measure=measure, mnonce=MNonce(mnonce))
    if args.outfile:
        try:
            Path(args.outfile).write_bytes(measurement.to_bytes())
        except OSError as exc:
            raise CommandError(f"cannot write {args.outfile}: {exc.strerror}") from None
    print(measurement.to_bytes().hex() if args.output_format == "hex" else measurement.to_b64())
    return 0


def _tik(value: str) -> bytes:
    """The TIK: a file of 16 raw bytes or of their base64 (sevctl), or the base64 itself."""
    data, _ = _file_or_text(value)
    if data is None:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError(f"cannot read {value}: no such file, and not base64") from None
        if len(raw) != _TIK:
            raise UsageError(f"--tik must be {_TIK} bytes, got {len(raw)}")
        return raw
    if len(data) == _TIK:
        return data
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _TIK:
        raise CommandError(
            f"the TIK file must hold {_TIK} raw bytes (or their base64), got {len(data)} bytes"
        )
    return raw


def _mnonce(args: argparse.Namespace) -> bytes:
    """The mnonce from --nonce (hex or base64, or a file of either or of the raw bytes) or from the
    reported --launch-measure-blob (base64, or a file of it or of the raw 48 bytes)."""
    from sevlaunch.sev.measurement import LaunchMeasurement

    if args.nonce is not None:
        data, text = _file_or_text(args.nonce)
        if data is not None and len(data) == _MNONCE:
            return data
        if data is not None:
            text = data.decode("ascii", errors="replace")
        return _hex_or_b64(text, what="--nonce", length=_MNONCE)
    data, text = _file_or_text(args.launch_measure_blob)
    if data is not None and len(data) == _MEASUREMENT_BLOB:
        blob = data
    else:
        if data is not None:
            text = data.decode("ascii", errors="replace").strip()
        blob = parse_b64(text, what="--launch-measure-blob")
        if len(blob) != _MEASUREMENT_BLOB:
            raise UsageError(f"--launch-measure-blob must be {_MEASUREMENT_BLOB} bytes, got {len(blob)}")
    return bytes(LaunchMeasurement.from_bytes(blob).mnonce)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("measurement", help="expected launch digests and measurements")
    commands = parser.add_subparsers(dest="measurement_command", required=True, metavar="SUBCOMMAND")

    digest = commands.add_parser(
        "digest", help="print the expected launch digest (hex) for a firmware and guest configuration"
    )
    _add_digest_options(digest, mode_required=True, snp=True)
    _add_snp_options(digest)
    digest.add_argument(
        "--output-format",
        choices=("hex", "base64"),
        default="hex",
        help="how to print the digest, for every mode (default hex, as sev-snp-measure)",
    )
    digest.set_defaults(func=_run_digest)

    build = commands.add_parser(
        "build", help="print the expected launch measurement (measure||mnonce, base64)"
    )
    build.add_argument("--api-major", type=int_in(0, U8_MAX), required=True, metavar="N")
    build.add_argument("--api-minor", type=int_in(0, U8_MAX), required=True, metavar="N")
    build.add_argument("--build-id", type=int_in(0, U8_MAX), required=True, metavar="N")
    build.add_argument("--policy", type=int_in(0, U32_MAX), required=True, metavar="N")
    build.add_argument(
        "--tik",
        required=True,
        metavar="FILE|B64",
        help="the session's 16-byte TIK: a file (raw or base64, as `sevlaunch session` and sevctl write "
        "it) or the base64 itself",
    )
    nonce = build.add_mutually_exclusive_group(required=True)
    nonce.add_argument(
        "--nonce", metavar="HEX|B64|FILE", help="the firmware's mnonce (16 bytes: hex, base64 or a file)"
    )
    nonce.add_argument(
        "--launch-measure-blob",
        metavar="B64|FILE",
        help="the measurement the host reported (base64, as QEMU and virsh show it, or a file); its mnonce "
        "is used",
    )
    build.add_argument(
        "--launch-digest",
        metavar="B64|HEX",
        help="a known launch digest, 32 bytes in base64 (sevctl) or hex (instead of computing it)",
    )
    build.add_argument(
        "--output-format",
        choices=("base64", "hex"),
        default="base64",
        help="how to print the measurement (default base64, as sevctl, QEMU and libvirt)",
    )
    build.add_argument("--outfile", metavar="FILE", help="also write the 48 bytes, binary, to FILE (sevctl)")
    _add_digest_options(build, mode_required=False)
    build.set_defaults(func=_run_build)
