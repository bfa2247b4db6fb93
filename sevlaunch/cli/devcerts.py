"""`sevlaunch dev-certs --out DIR [--ca-dir CA_DIR]`: a local CA and mTLS certificates for development.

Writes `ca.pem` and `NAME.pem`/`NAME.key` for each identity into DIR (the services' TLS folder); keys
are ECDSA P-256, 0600. The CA's own key is kept apart, in CA_DIR (default: DIR-ca beside DIR, mode 0700
with `ca.key` 0600 and `ca.pem`): whoever can read `ca.key` can mint any identity, so it must never be in
a folder a service reads (the services refuse to start with a `ca.key` in their TLS folder) nor in a
Kubernetes Secret. A CA already in CA_DIR is reused, so a later run adds identities to the same CA;
a `ca.key` an older dev-certs left in DIR is moved to CA_DIR.
Every certificate's subject CN is the identity (which the services authorise). Two kinds:
* server identities (platform, launcher, owner, and any `--server NAME`): TLS server and client auth (a
  launcher serves and also calls; tests call with them too), SANs localhost, 127.0.0.1, ::1, any `--san`,
  and the identity's own server name `NAME.sevlaunch.internal`, which a client expecting that identity
  checks (the launcher for the owner and the platform: `--owner-identity`, `--platform-identity`);
* client identities (client, platform-admin, owner-admin, any `--identity NAME`): client auth only and no
  SANs, so they cannot pass for a server at all.
Names under `sevlaunch.internal` are reserved for the identities: refused as a `--san`, which every server
certificate shares. Not for production: the CA key is unencrypted on disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevlaunch.cli import CommandError
from sevlaunch.cli._common import write_private
from sevlaunch.tlsnames import is_reserved, server_name

DEFAULT_IDENTITIES = ("platform", "launcher", "owner", "client", "platform-admin", "owner-admin")
#: The identities that serve (and may also call): serverAuth + clientAuth and a `NAME.sevlaunch.internal` SAN.
SERVER_IDENTITIES = ("platform", "launcher", "owner")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
VALIDITY = dt.timedelta(days=825)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def default_ca_dir(out: Path) -> Path:
    """Where the CA key goes when no folder is given: `OUT-ca` beside the TLS folder `OUT`."""
    absolute = Path(os.path.abspath(out))
    return absolute.parent / f"{absolute.name}-ca"


def _new_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sevlaunch dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate of a CA folder (`ca.key`, `ca.pem`); CommandError when unusable."""
    try:
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    except OSError as exc:
        raise CommandError(f"cannot read the CA in {ca_dir}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CommandError(f"the CA in {ca_dir} is not a PEM key and certificate: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CommandError(f"{ca_dir / 'ca.key'} is not an EC key")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CommandError(f"{ca_dir / 'ca.key'} is not the key of {ca_dir / 'ca.pem'}")
    return key, cert


def _ca_folder(
    ca_dir: Path, out: Path, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in `ca_dir`: reused when there, moved there from a legacy `out/ca.key`, else created."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    legacy = out / "ca.key"
    if not (ca_dir / "ca.key").exists() and legacy.exists() and (out / "ca.pem").exists():
        write_private(ca_dir / "ca.key", legacy.read_bytes())
        (ca_dir / "ca.pem").write_bytes((out / "ca.pem").read_bytes())
        legacy.unlink()
    if (ca_dir / "ca.key").exists():
        return load_ca(ca_dir)
    key, cert = _new_ca(now)
    write_private(ca_dir / "ca.key", _pem_key(key))
    (ca_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def write_dev_certs(
    out: Path,
    *,
    identities: Iterable[str] = DEFAULT_IDENTITIES,
    sans: Sequence[str] = (),
    servers: Iterable[str] = SERVER_IDENTITIES,
    ca_dir: Path | None = None,
) -> list[str]:
    """Writes `ca.pem` and one certificate per identity into `out`, issued by the CA in `ca_dir`
    (default `default_ca_dir(out)`; created there when absent); returns the identities written. The
    identities also in `servers` get server certificates, the others client-only ones (module docstring)."""
    names = list(dict.fromkeys(identities))
    server_set = set(servers)
    for name in names:
        if not _NAME_RE.match(name) or name == "ca":
            raise CommandError(f"identity {name!r} must be lower-case letters, digits and '-', not 'ca'")
    for extra in sans:
        if is_reserved(extra):
            raise CommandError(
                f"--san {extra!r}: names under sevlaunch.internal belong to one identity each, not to every"
                " certificate"
            )
    ca_folder = default_ca_dir(out) if ca_dir is None else Path(ca_dir)
    if Path(os.path.abspath(ca_folder)) == Path(os.path.abspath(out)):
        raise CommandError("the CA folder must not be the TLS folder: the services would read the CA key")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    ca_key, ca_cert = _ca_folder(ca_folder, out, now)
    ca_name = ca_cert.subject
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        is_server = name in server_set
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if is_server
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if is_server:
            alt = [_general_name(v) for v in dict.fromkeys([*DEFAULT_SANS, *sans, server_name(name)])]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(out / f"{name}.key", _pem_key(key))
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return names


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    extra_servers = list(args.server or [])
    extra = [*(args.identity or []), *extra_servers]
    identities = [*DEFAULT_IDENTITIES, *extra] if not args.only else extra
    if not identities:
        raise CommandError("--only needs at least one --identity or --server")
    ca_dir = Path(args.ca_dir) if args.ca_dir else default_ca_dir(out)
    names = write_dev_certs(
        out,
        identities=identities,
        sans=args.san or [],
        servers=[*SERVER_IDENTITIES, *extra_servers],
        ca_dir=ca_dir,
    )
    print(f"wrote certificates for {', '.join(names)} to {out}; the CA key is in {ca_dir} (keep it apart)")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "dev-certs",
        help="make a local CA and mTLS certificates for the services (development only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write ca.pem and NAME.pem/NAME.key into")
    p.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="folder of the CA key (default: OUT-ca beside OUT); reused when it holds a CA already",
    )
    p.add_argument(
        "--san", action="append", metavar="NAME_OR_IP", help="an extra SAN for every server certificate"
    )
    p.add_argument(
        "--identity", action="append", metavar="NAME", help="an extra client identity (repeatable)"
    )
    p.add_argument(
        "--server",
        action="append",
        metavar="NAME",
        help="an extra server identity, with the SAN NAME.sevlaunch.internal (repeatable)",
    )
    p.add_argument(
        "--only", action="store_true", help="write only the --identity/--server names, not the defaults"
    )
    p.set_defaults(func=_run)
