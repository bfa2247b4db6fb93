"""`sevlaunch snp id-block`: sign the launch an SEV-SNP guest must match (ID block and ID auth info).

Writes `id_block.b64` and `id_auth.b64` into `--out`, in the base64 form QEMU's `sev-snp-guest`
`id-block`/`id-auth` properties and libvirt's `<idBlock>`/`<idAuth>` take, and prints the SHA-384
digests of the two public keys, which the guest's attestation reports will carry (ID_KEY_DIGEST,
AUTHOR_KEY_DIGEST). The keys are read here and never printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sevlaunch.cli import CommandError, UsageError
from sevlaunch.cli._common import parse_hex, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.limits import U32_MAX, U64_MAX

ID_BLOCK_FILE = "id_block.b64"
ID_AUTH_FILE = "id_auth.b64"
_POLICY_MUST_BE_ONE = 1 << 17


def _write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    try:
        # Public material (signatures and public keys): an ordinary file, replaced atomically.
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text + "\n", encoding="ascii")
        tmp.replace(path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


def _run(args: argparse.Namespace) -> int:
    # Here, not at the top: `cryptography` loads only for this command.
    from sevlaunch.snp.idblock import DIGEST_SIZE, ID_SIZE, IdBlock, load_signing_key, sign_id_block

    digest = parse_hex(args.launch_digest, what="--launch-digest", length=DIGEST_SIZE)
    family_id = parse_hex(args.family_id, what="--family-id", length=ID_SIZE)
    image_id = parse_hex(args.image_id, what="--image-id", length=ID_SIZE)
    if not 0 <= args.policy < 1 << 64:
        raise UsageError("--policy must fit in 64 bits")
    if not args.policy & _POLICY_MUST_BE_ONE:
        # SNP_LAUNCH_START refuses such a policy: an ID block naming it could never be used.
        raise UsageError(f"--policy {args.policy:#x} lacks bit 17, which SEV-SNP requires set")
    if not 0 <= args.guest_svn < 1 << 32:
        raise UsageError("--guest-svn must fit in 32 bits")
    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    id_key = load_signing_key(read_bytes(args.id_key), what="--id-key")
    author_key = load_signing_key(read_bytes(args.author_key), what="--author-key")

    id_block = IdBlock(
        launch_digest=digest,
        family_id=family_id,
        image_id=image_id,
        guest_svn=args.guest_svn,
        policy=args.policy,
    )
    id_auth = sign_id_block(id_block, id_key, author_key)
    # Check what is written before writing it: a signing fault must not reach a launch.
    id_auth.verify(id_block)
    _write(out, ID_BLOCK_FILE, id_block.to_b64())
    _write(out, ID_AUTH_FILE, id_auth.to_b64())
    print(f"id_key_digest: {id_auth.id_key_digest.hex()}")
    print(f"author_key_digest: {id_auth.author_key_digest.hex()}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "id-block",
        help="sign an ID block and ID auth info for a launch digest (id_block.b64, id_auth.b64)",
        description="Writes DIR/id_block.b64 and DIR/id_auth.b64 (base64, for libvirt's <idBlock> and "
        "<idAuth>) and prints the ID and author key digests the guest's reports will show.",
    )
    parser.add_argument("--launch-digest", required=True, metavar="HEX", help="the 48-byte SNP launch digest")
    parser.add_argument("--id-key", required=True, metavar="PEM", help="the ID key (EC P-384 private key)")
    parser.add_argument(
        "--author-key", required=True, metavar="PEM", help="the author key (EC P-384 private key)"
    )
    parser.add_argument(
        "--policy",
        type=int_in(0, U64_MAX),
        default=0x30000,
        metavar="N",
        help="guest policy (default 0x30000)",
    )
    parser.add_argument("--family-id", default="00" * 16, metavar="HEX", help="16 bytes (default zeros)")
    parser.add_argument("--image-id", default="00" * 16, metavar="HEX", help="16 bytes (default zeros)")
    parser.add_argument(
        "--guest-svn", type=int_in(0, U32_MAX), default=0, metavar="N", help="guest SVN (default 0)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for id_block.b64 and id_auth.b64")
    parser.set_defaults(func=_run)
