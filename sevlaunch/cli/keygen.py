"""`sevlaunch keygen`: a reference value signing key pair.

    sevlaunch keygen --out distro.key [--type ecdsa-p256|ed25519]

Writes the private key (PKCS#8 PEM, 0600, never world-readable even for an instant) and its public key
to `distro.key.pub`, which owners pass as `--publisher-key`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import write_private
from sevlaunch.refvalues import KeyType, generate_private_key, key_id, private_key_pem, public_key_pem


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("keygen", help="make a reference value signing key pair (KEY and KEY.pub)")
    p.add_argument("--out", required=True, help="private key file; the public key goes to OUT.pub")
    p.add_argument("--type", choices=[t.value for t in KeyType], default=KeyType.ECDSA_P256.value)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pub = out.with_name(out.name + ".pub")
    if not args.force and (out.exists() or pub.exists()):
        # Overwriting a signing key by accident would orphan every manifest it signed.
        raise CommandError(f"{out} or {pub} exists (use --force to overwrite)")
    key = generate_private_key(KeyType(args.type))
    write_private(out, private_key_pem(key))
    pub.write_bytes(public_key_pem(key.public_key()))
    print(f"wrote {out} (private, 0600) and {pub}; keyid {key_id(key.public_key())}")
    return 0
