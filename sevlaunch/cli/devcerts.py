"""`sevlaunch dev-certs --out DIR`: a local CA and mTLS certificates for development and tests.

Writes `ca.pem` (+ `ca.key`), and `NAME.pem`/`NAME.key` for each identity; keys are ECDSA P-256, 0600.
Every certificate's subject CN is the identity (which the services authorise). Two kinds:
* server identities (platform, launcher, owner, and any `--server NAME`): TLS server and client auth (a
  launcher serves and also calls; tests call with them too), SANs localhost, 127.0.0.1, ::1, any `--san`,
  and the identity's own server name `NAME.sevlaunch.internal`, which a client expecting that identity
  checks (the launcher for the owner and the platform: `--owner-identity`, `--platform-identity`);
* client identities (client, platform-admin, owner-admin, any `--identity NAME`): client auth only and no
  SANs, so they cannot pass for a server at all.
Names under `sevlaunch.internal` are reserved for the identities: refused as a `--san`, which every server
certificate shares. Not for production: the CA key sits beside the certificates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
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


def write_dev_certs(
    out: Path,
    *,
    identities: Iterable[str] = DEFAULT_IDENTITIES,
    sans: Sequence[str] = (),
    servers: Iterable[str] = SERVER_IDENTITIES,
) -> list[str]:
    """Creates the CA and one certificate per identity in `out`; returns the identities written. The
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
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
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
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(out / "ca.key", _pem_key(ca_key))
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
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
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
    names = write_dev_certs(
        out, identities=identities, sans=args.san or [], servers=[*SERVER_IDENTITIES, *extra_servers]
    )
    print(f"wrote CA and certificates for {', '.join(names)} to {out}")
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
