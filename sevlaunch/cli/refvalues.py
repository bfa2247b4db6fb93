"""`sevlaunch refvalues {make,sign,verify}`: reference value manifests for firmware publishers.

    sevlaunch refvalues make --firmware OVMF.fd --name OVMF --version 2024.05 --mode sev \\
        --mode sev-es --vcpus 1 --vcpus 4 --vcpu-type EPYC-Milan [--kernel K --initrd I --cmdline C] \\
        [--valid-days 365] --out M.json
    sevlaunch refvalues sign --key distro.key M.json --out M.dsse
    sevlaunch refvalues verify --pubkey distro.key.pub M.dsse

`make` computes one launch digest per configuration: SEV once, SEV-ES for every vCPU count and VMSA
layout given (`--vmsa-layout` repeatable, default init2), SEV-SNP for every vCPU count (48-byte digests of
`sevlaunch.snp.launch_digest`, for the `--guest-features` and `--vmm-type` given) with the manifest's
`snp` section from `--family-id`, `--image-id`, `--guest-svn` and `--min-tcb` (repeatable, one per product):

    sevlaunch refvalues make --mode sev-snp --firmware OVMF.fd --name OVMF --version 2024.05 \
        --vcpus 1 --vcpus 2 --vcpu-type EPYC-v4 [--guest-features 0x1] [--vmm-type QEMU] \
        [--min-tcb genoa=9:0:23:72 --min-tcb turin=0:1:0:1:72] --out M.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sevlaunch.cli import UsageError
from sevlaunch.cli._common import parse_hex, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.limits import U32_MAX, U64_MAX
from sevlaunch.refvalues import (
    DigestConfig,
    KernelHashes,
    Manifest,
    PublisherKey,
    ReferenceDigest,
    load_private_key,
    make_manifest,
    manifest_id,
    sign_envelope,
    verify_manifest,
)
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature
from sevlaunch.snp.launch_digest import launch_digest as snp_launch_digest
from sevlaunch.snp.reference import SnpReference, parse_min_tcb
from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES, VmmType


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("refvalues", help="make, sign and verify reference value manifests")
    actions = p.add_subparsers(dest="refvalues_command", required=True, metavar="ACTION")

    make = actions.add_parser("make", help="compute launch digests of a firmware into a manifest")
    make.add_argument("--firmware", required=True, help="firmware image (OVMF .fd)")
    make.add_argument("--name", required=True, help="firmware name, e.g. OVMF")
    make.add_argument("--version", required=True, help="firmware version, e.g. 2024.05-1")
    make.add_argument("--publisher", default="local", help="publisher name recorded in the manifest")
    make.add_argument(
        "--mode",
        action="append",
        choices=[m.value for m in Technology],
        help="launch mode (repeatable; default sev)",
    )
    make.add_argument(
        "--vcpus",
        action="append",
        type=_vcpu_counts,
        help="SEV-ES/SNP vCPU count(s): 4 or 1,2,4 (repeatable)",
    )
    make.add_argument("--vcpu-type", help="QEMU CPU model for SEV-ES/SNP, e.g. EPYC-Milan")
    make.add_argument(
        "--guest-features",
        type=int_in(0, U64_MAX),
        default=int(DEFAULT_GUEST_FEATURES),
        help="SNP SEV_FEATURES (0x1)",
    )
    make.add_argument("--vmm-type", default=VmmType.QEMU.value, help="SNP VMM type: QEMU, ec2, gce")
    make.add_argument("--family-id", help="SNP ID block family id (32 hex digits; default zero)")
    make.add_argument("--image-id", help="SNP ID block image id (32 hex digits; default zero)")
    make.add_argument(
        "--guest-svn", type=int_in(0, U32_MAX), default=0, help="SNP guest SVN of this build (default 0)"
    )
    make.add_argument(
        "--min-tcb",
        action="append",
        default=[],
        metavar="PRODUCT=BL:TEE:SNP:UCODE",
        help="SNP minimum TCB of a product (turin=FMC:BL:TEE:SNP:UCODE; repeatable)",
    )
    make.add_argument(
        "--vmsa-layout",
        action="append",
        choices=[v.value for v in VMSALayout],
        help="SEV-ES VMSA layout (repeatable; default init2)",
    )
    make.add_argument("--kernel", help="kernel measured with kernel-hashes=on")
    make.add_argument("--initrd")
    make.add_argument("--cmdline")
    make.add_argument(
        "--valid-days",
        type=int_in(1, 3650, hex_ok=False),
        default=365,
        help="days the manifest is valid, 1..3650",
    )
    make.add_argument(
        "--revokes",
        action="append",
        default=[],
        metavar="ID",
        help="id of an earlier manifest this one withdraws (repeatable)",
    )
    make.add_argument("--out", required=True)
    make.set_defaults(func=_make)

    sign = actions.add_parser("sign", help="sign a manifest into a DSSE envelope")
    sign.add_argument("--key", required=True, help="private key from `sevlaunch keygen`")
    sign.add_argument("manifest")
    sign.add_argument("--out", required=True)
    sign.set_defaults(func=_sign)

    verify = actions.add_parser("verify", help="verify a DSSE manifest envelope")
    verify.add_argument("--pubkey", action="append", required=True, help="trusted public key (repeatable)")
    verify.add_argument("envelope")
    verify.set_defaults(func=_verify)


def _vcpu_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a vCPU count or a comma-separated list") from None
    if any(not 1 <= n <= 4096 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: vCPU counts are 1..4096")
    return counts


def _snp_digests(
    args: argparse.Namespace,
    image: bytes,
    hashes: KernelHashes | None,
    kernel: bytes | None,
    initrd: bytes | None,
) -> list[ReferenceDigest]:
    vmm = VmmType.parse(args.vmm_type)
    if not args.vcpus or (vmm is VmmType.QEMU and not args.vcpu_type):
        raise UsageError("--mode sev-snp needs --vcpus (and --vcpu-type under QEMU)")
    sig = vcpu_signature(args.vcpu_type) if args.vcpu_type else None
    out = []
    for n in dict.fromkeys(c for counts in args.vcpus for c in counts):
        ld = snp_launch_digest(
            image,
            vcpus=n,
            vcpu_sig=sig,
            guest_features=args.guest_features,
            vmm_type=vmm,
            kernel=kernel,
            initrd=initrd,
            cmdline=args.cmdline,
        )
        cfg = DigestConfig(
            Technology.SEV_SNP,
            vcpus=n,
            vcpu_type=args.vcpu_type,
            guest_features=args.guest_features,
            vmm_type=vmm.value,
            kernel_hashes=hashes,
        )
        out.append(ReferenceDigest(bytes(ld), cfg))
    return out


def _min_tcb(text: str) -> Any:
    try:
        return parse_min_tcb(text)
    except SevError as exc:
        raise UsageError(f"--min-tcb: {exc}") from None


def _snp_reference(args: argparse.Namespace) -> SnpReference:
    return SnpReference(
        family_id=parse_hex(args.family_id, what="--family-id", length=16) if args.family_id else bytes(16),
        image_id=parse_hex(args.image_id, what="--image-id", length=16) if args.image_id else bytes(16),
        guest_svn=args.guest_svn,
        min_tcb=tuple(_min_tcb(text) for text in args.min_tcb),
    )


def _digests(args: argparse.Namespace, image: bytes) -> list[ReferenceDigest]:
    if args.kernel is None and (args.initrd is not None or args.cmdline is not None):
        raise UsageError("--initrd and --cmdline need --kernel")
    kernel = read_bytes(args.kernel) if args.kernel else None
    initrd = read_bytes(args.initrd) if args.initrd else None
    cmdline = args.cmdline
    hashes = None
    if kernel is not None:
        hashes = KernelHashes(
            kernel=hashlib.sha256(kernel).hexdigest(),
            initrd=hashlib.sha256(initrd or b"").hexdigest(),
            cmdline=hashlib.sha256((cmdline or "").encode() + b"\x00").hexdigest(),
        )
    out: list[ReferenceDigest] = []
    for mode in dict.fromkeys(args.mode or [Technology.SEV.value]):
        if mode == Technology.SEV_SNP.value:
            out += _snp_digests(args, image, hashes, kernel, initrd)
            continue
        if mode == Technology.SEV.value:
            ld = launch_digest(image, mode="sev", kernel=kernel, initrd=initrd, cmdline=cmdline)
            out.append(ReferenceDigest(bytes(ld), DigestConfig(Technology.SEV, kernel_hashes=hashes)))
            continue
        if not args.vcpus or not args.vcpu_type:
            raise UsageError("--mode sev-es needs --vcpus and --vcpu-type")
        sig = vcpu_signature(args.vcpu_type)
        for layout in dict.fromkeys(args.vmsa_layout or [VMSALayout.init2.value]):
            for n in dict.fromkeys(c for counts in args.vcpus for c in counts):
                ld = launch_digest(
                    image,
                    mode="sev-es",
                    vcpus=n,
                    vcpu_sig=sig,
                    layout=VMSALayout(layout),
                    kernel=kernel,
                    initrd=initrd,
                    cmdline=cmdline,
                )
                cfg = DigestConfig(
                    Technology.SEV_ES,
                    vcpus=n,
                    vcpu_type=args.vcpu_type,
                    vmsa_layout=layout,
                    kernel_hashes=hashes,
                )
                out.append(ReferenceDigest(bytes(ld), cfg))
    return out


def _make(args: argparse.Namespace) -> int:
    image = read_bytes(args.firmware)
    snp_mode = Technology.SEV_SNP.value in (args.mode or [])
    if not snp_mode and (args.family_id or args.image_id or args.guest_svn or args.min_tcb):
        raise UsageError("--family-id, --image-id, --guest-svn and --min-tcb need --mode sev-snp")
    manifest = make_manifest(
        publisher=args.publisher,
        firmware_name=args.name,
        firmware_version=args.version,
        digests=_digests(args, image),
        valid_days=args.valid_days,
        firmware_sha256=hashlib.sha256(image).hexdigest(),
        revokes=args.revokes,
        snp=_snp_reference(args) if snp_mode else None,
    )
    Path(args.out).write_bytes(manifest.to_json())
    print(
        f"wrote {args.out}: {len(manifest.digests)} launch digest(s), valid until "
        f"{manifest.not_after.isoformat()}"
    )
    return 0


def _sign(args: argparse.Namespace) -> int:
    key = load_private_key(read_bytes(args.key))
    payload = read_bytes(args.manifest)
    Manifest.from_json(payload)  # never sign something the owner would refuse to parse
    Path(args.out).write_bytes(sign_envelope(payload, key).to_json())
    print(f"wrote {args.out}: manifest id {manifest_id(payload)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    keys = [PublisherKey.from_pem(read_bytes(p), name=p) for p in args.pubkey]
    vm = verify_manifest(read_bytes(args.envelope), keys, now=datetime.now(UTC))
    m = vm.manifest
    print(
        json.dumps(
            {
                "manifest_id": vm.id,
                "keyid": vm.keyid,
                "publisher": m.publisher,
                "firmware": {"name": m.firmware_name, "version": m.firmware_version},
                "not_before": m.not_before.isoformat(),
                "not_after": m.not_after.isoformat(),
                "digests": [{"launch_digest": d.launch_digest.hex(), **d.config.to_obj()} for d in m.digests],
                "revokes": list(m.revokes),
                **({"snp": m.snp.to_obj()} if m.snp is not None else {}),
            },
            indent=2,
        )
    )
    return 0
