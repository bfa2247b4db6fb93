"""`sevlaunch dev-certs`: a CA and per-identity certificates that mTLS and authorisation rely on."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevlaunch.cli import main
from sevlaunch.cli.devcerts import DEFAULT_IDENTITIES, SERVER_IDENTITIES, default_ca_dir, write_dev_certs
from sevlaunch.rpc.tls import TLSMaterialError, server_credentials


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_dev_certs_writes_ca_and_every_identity(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert main(["dev-certs", "--out", str(out), "--san", "10.0.0.7", "--san", "platform.svc"]) == 0
    ca = _load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_dir = tmp_path / "tls-ca"
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert (ca_dir / "ca.pem").read_bytes() == (out / "ca.pem").read_bytes()
    for name in DEFAULT_IDENTITIES:
        cert = _load(out / f"{name}.pem")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        cert.verify_directly_issued_by(ca)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        if name in SERVER_IDENTITIES:
            # A server (that also calls): the shared SANs plus its own identity's server name only.
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = set(san.get_values_for_type(x509.DNSName))
            assert dns == {"localhost", "platform.svc", f"{name}.sevlaunch.internal"}
            ips = set(san.get_values_for_type(x509.IPAddress))
            assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")} == ips
            assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        else:
            # A client identity cannot pass for a server: client auth only, no names at all.
            assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH}
            with pytest.raises(x509.ExtensionNotFound):
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(SERVER_IDENTITIES) == {"platform", "launcher", "owner"}


def test_extra_server_identity(tmp_path: Path) -> None:
    assert (
        main(["dev-certs", "--out", str(tmp_path), "--only", "--server", "owner-b", "--identity", "ops"]) == 0
    )
    san = _load(tmp_path / "owner-b.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "owner-b.sevlaunch.internal" in san.value.get_values_for_type(x509.DNSName)
    eku = _load(tmp_path / "ops.pem").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH}


@pytest.mark.parametrize("san", ["owner.sevlaunch.internal", "sevlaunch.internal", "X.Sevlaunch.Internal."])
def test_reserved_names_are_refused_as_shared_sans(
    tmp_path: Path, san: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every server certificate gets each --san: one of these would make every server pass for that identity.
    assert main(["dev-certs", "--out", str(tmp_path), "--san", san]) == 1
    assert "sevlaunch.internal" in capsys.readouterr().err
    assert not (tmp_path / "ca.pem").exists()


def test_extra_and_only_identities(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert main(["dev-certs", "--out", str(out), "--only", "--identity", "ops"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "ops.key", "ops.pem"]
    assert sorted(p.name for p in (tmp_path / "tls-ca").iterdir()) == ["ca.key", "ca.pem"]


@pytest.mark.parametrize("bad", ["ca", "Upper", "../escape", "a b"])
def test_bad_identity_names_are_refused(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev-certs", "--out", str(tmp_path), "--identity", bad]) == 1
    assert "identity" in capsys.readouterr().err
    assert not (tmp_path / "ca.pem").exists()


# ------------------------------------------------------- issue 12, item 8: the CA key kept apart


def test_service_folder_reader_cannot_mint_identities_the_ca_key_is_apart(tmp_path: Path) -> None:
    """Whoever can read a service's TLS folder must not find the key that signs every identity."""
    out, ca_dir = tmp_path / "tls", tmp_path / "private" / "ca"
    assert main(["dev-certs", "--out", str(out), "--ca-dir", str(ca_dir)]) == 0
    assert not list(out.glob("ca.key")) and not any(b"PRIVATE KEY" in p.read_bytes() for p in out.glob("ca*"))
    assert (ca_dir / "ca.key").is_file()
    ca = _load(ca_dir / "ca.pem")
    for name in DEFAULT_IDENTITIES:
        _load(out / f"{name}.pem").verify_directly_issued_by(ca)
        # No service key file in the folder is the CA's key.
        assert (out / f"{name}.key").read_bytes() != (ca_dir / "ca.key").read_bytes()


def test_identities_added_later_come_from_the_same_ca(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert main(["dev-certs", "--out", str(out)]) == 0
    first_ca = (out / "ca.pem").read_bytes()
    assert main(["dev-certs", "--out", str(out), "--only", "--identity", "ops"]) == 0
    assert (out / "ca.pem").read_bytes() == first_ca
    ca = _load(out / "ca.pem")
    _load(out / "ops.pem").verify_directly_issued_by(ca)
    _load(out / "owner.pem").verify_directly_issued_by(ca)  # the earlier certificates stay valid


def test_a_legacy_ca_key_in_the_tls_folder_is_moved_apart(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    write_dev_certs(out)
    ca_key = (default_ca_dir(out) / "ca.key").read_bytes()
    # The layout an older dev-certs wrote: the CA key beside the services' keys, no CA folder.
    (out / "ca.key").write_bytes(ca_key)
    for p in default_ca_dir(out).iterdir():
        p.unlink()
    assert main(["dev-certs", "--out", str(out), "--only", "--identity", "ops"]) == 0
    assert not (out / "ca.key").exists()
    assert (default_ca_dir(out) / "ca.key").read_bytes() == ca_key
    _load(out / "ops.pem").verify_directly_issued_by(_load(out / "ca.pem"))


def test_the_ca_folder_cannot_be_the_tls_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev-certs", "--out", str(tmp_path), "--ca-dir", str(tmp_path)]) == 1
    assert "CA folder" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()


def test_a_service_refuses_a_tls_folder_holding_the_ca_key(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    write_dev_certs(out)
    server_credentials(out, "owner")  # the normal layout is accepted
    (out / "ca.key").write_bytes((default_ca_dir(out) / "ca.key").read_bytes())
    with pytest.raises(TLSMaterialError, match=r"ca\.key"):
        server_credentials(out, "owner")
