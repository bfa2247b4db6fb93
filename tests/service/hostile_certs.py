"""Client certificates an attacker could hold: issued by the services' own CA, but with a subject that
must not be taken as an identity (several CNs, no CN, a role only in a SAN).

The CA key comes from the CA folder `sevlaunch dev-certs` keeps apart from the TLS folder.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevlaunch.cli.devcerts import default_ca_dir, load_ca


def cn(*names: str) -> x509.Name:
    """A subject with one RDN per CN, in this order (`CN=a, CN=b`)."""
    rdns = [x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, n)]) for n in names]
    return x509.Name(rdns)


def issue_client(
    tls_dir: Path,
    out: Path,
    file_name: str,
    subject: x509.Name,
    *,
    san_dns: tuple[str, ...] = (),
) -> Path:
    """Issues `out/FILE_NAME.pem|.key` from the CA of `tls_dir` (with `ca.pem` beside them) and returns
    `out`, a TLS folder usable as `secure_channel_sync(addr, out, FILE_NAME)`."""
    key_ca, ca = load_ca(default_ca_dir(tls_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if san_dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in san_dns]), critical=False
        )
    cert = builder.sign(key_ca, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tls_dir / "ca.pem", out / "ca.pem")
    (out / f"{file_name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{file_name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return out
