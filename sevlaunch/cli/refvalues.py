"""`sevlaunch refvalues {make,sign,verify}`: reference value manifests for firmware publishers.

    sevlaunch refvalues make --firmware OVMF.fd --name OVMF --version 2024.05 --mode sev \\
        --mode sev-es --vcpus 1 --vcpus 4 --vcpu-type EPYC-Milan [--kernel K --initrd I --cmdline C] \\
        [--valid-days 365] --out M.json
    sevlaunch refvalues sign --key distro.key M.json --out M.dsse
    sevlaunch refvalues verify --pubkey distro.key.pub M.dsse

`make` computes one launch digest per configuration: SEV once, SEV-ES for every vCPU count and VMSA
layout given (`--vmsa-layout` repeatable, default init2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sevlaunch.cli import UsageError
from sevlaunch.cli._common import read_bytes
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
from sevlaunch.sev.technology import PRE_LAUNCH, Technology
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature


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
        choices=[m.value for m in Technology if m in PRE_LAUNCH],
        help="launch mode (repeatable; default sev)",
    )
    make.add_argument("--vcpus", action="append", type=int, help="SEV-ES vCPU count (repeatable)")
    make.add_argument("--vcpu-type", help="QEMU CPU model for SEV-ES, e.g. EPYC-Milan")
    make.add_argument(
        "--vmsa-layout",
        action="append",
        choices=[v.value for v in VMSALayout],
        help="SEV-ES VMSA layout (repeatable; default init2)",
    )
    make.add_argument("--kernel", help="kernel measured with kernel-hashes=on")
    make.add_argument("--initrd")
    make.add_argument("--cmdline")
    make.add_argument("--valid-days", type=int, default=365)
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
        if mode == Technology.SEV.value:
            ld = launch_digest(image, mode="sev", kernel=kernel, initrd=initrd, cmdline=cmdline)
            out.append(ReferenceDigest(bytes(ld), DigestConfig(Technology.SEV, kernel_hashes=hashes)))
            continue
        if not args.vcpus or not args.vcpu_type:
            raise UsageError("--mode sev-es needs --vcpus and --vcpu-type")
        sig = vcpu_signature(args.vcpu_type)
        for layout in dict.fromkeys(args.vmsa_layout or [VMSALayout.init2.value]):
            for n in dict.fromkeys(args.vcpus):
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
    manifest = make_manifest(
        publisher=args.publisher,
        firmware_name=args.name,
        firmware_version=args.version,
        digests=_digests(args, image),
        valid_days=args.valid_days,
        firmware_sha256=hashlib.sha256(image).hexdigest(),
        revokes=args.revokes,
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
            },
            indent=2,
        )
    )
    return 0
