"""`sevlaunch verify` on real chains assembled from the vectors, sevctl style."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevlaunch.cli import main
from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def vec(path: str) -> bytes:
    return (VECTORS / path).read_bytes()


def write_full(tmp_path: Path, chain: str, *, cek: str = "cek.cert", roots: str | None = None) -> Path:
    d = f"chains/{chain}/"
    r = roots or d
    out = tmp_path / f"{chain}.full"
    out.write_bytes(b"".join([vec(d + n) for n in ("pdh.cert", "pek.cert", "oca.cert")] + [vec(d + cek)]
                             + [vec(r + "ask.cert"), vec(r + "ark.cert")]))  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("chain", "gen"), [("virtee-naples", "naples"), ("virtee-rome", "rome"), ("virtee-milan", "milan")]
)
def test_full_chain_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chain: str, gen: str
) -> None:
    assert main(["verify", "--chain", str(write_full(tmp_path, chain))]) == 0
    out = capsys.readouterr().out
    assert f"generation: {gen}" in out and "chain verified" in out
    assert "FAILED" not in out and out.count(" ok") == 8


def test_cross_generation_chain_fails_naming_the_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_full(tmp_path, "virtee-rome", roots="amd/milan/")
    assert main(["verify", "--chain", str(path)]) == 1
    captured = capsys.readouterr()
    assert "ASK->CEK    FAILED  bad_signature" in captured.out
    assert "ASK->CEK failed" in captured.err and "Traceback" not in captured.err


def test_separate_files_use_the_pinned_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = VECTORS / "chains/virtee-milan"
    args = ["verify"] + [x for n in ("pdh", "pek", "oca", "cek") for x in (f"--{n}", str(d / f"{n}.cert"))]
    assert main(args) == 0
    assert "generation: milan" in capsys.readouterr().out


def test_published_naples_ark_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = VECTORS / "chains/virtee-naples"
    args = ["verify"] + [
        x for n in ("pdh", "pek", "oca", "cek", "ask") for x in (f"--{n}", str(d / f"{n}.cert"))
    ]
    args += ["--ark", str(VECTORS / "amd/naples/ark.cert.truncated_public")]
    assert main(args) == 0


def test_unsigned_cek_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = VECTORS / "chains/virtee-naples-2019-02"
    args = ["verify"] + [x for n in ("pdh", "pek", "oca", "cek") for x in (f"--{n}", str(d / f"{n}.cert"))]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ASK->CEK" in err and "KDS" in err
    # With the ARK/ASK given, every link is printed and only ASK->CEK fails.
    assert main(["verify", "--chain", str(write_full(tmp_path, "virtee-naples-2019-02"))]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 1 and "ASK->CEK    FAILED  missing_signature" in out


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01" * 100)
    assert main(["verify", "--chain", str(bad)]) == 1
    assert main(["verify", "--chain", str(tmp_path / "missing")]) == 1
    assert main(["verify", "--pdh", str(bad)]) == 2  # usage: --pek, --oca, --cek missing
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err


def test_extra_root_with_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ark_key = rsa.generate_private_key(65537, 2048)
    ark = AMDCertificate.create(key_id=b"E" * 16, certifying_id=b"E" * 16, key_usage=AMDKeyUsage.ARK,
                                public_key=ark_key.public_key(), signer_private_key=ark_key)  # fmt: skip
    ask = AMDCertificate.create(key_id=b"F" * 16, certifying_id=b"E" * 16, key_usage=AMDKeyUsage.ASK,
                                public_key=ark_key.public_key(), signer_private_key=ark_key)  # fmt: skip
    k = {u: ec.generate_private_key(ec.SECP384R1()) for u in (Usage.CEK, Usage.OCA, Usage.PEK, Usage.PDH)}

    def cert(u: Usage, a: Algorithm = Algorithm.ECDSA_SHA256) -> SEVCertificate:
        return SEVCertificate.for_ec_key(
            usage=u, algorithm=a, public_key=k[u].public_key(), api_major=1, api_minor=0
        )

    e = Algorithm.ECDSA_SHA256
    pdh = cert(Usage.PDH, Algorithm.ECDH_SHA256).sign_with(Usage.PEK, e, k[Usage.PEK])
    pek = cert(Usage.PEK).sign_with(Usage.OCA, e, k[Usage.OCA]).sign_with(Usage.CEK, e, k[Usage.CEK])
    oca = cert(Usage.OCA).sign_with(Usage.OCA, e, k[Usage.OCA])
    cek = cert(Usage.CEK).sign_with(Usage.ASK, Algorithm.RSA_SHA256, ark_key)
    full = tmp_path / "emu.full"
    full.write_bytes(b"".join(c.to_bytes() for c in (pdh, pek, oca, cek, ask, ark)))
    ca = tmp_path / "ask_ark.cert"
    ca.write_bytes(ask.to_bytes() + ark.to_bytes())
    assert main(["verify", "--chain", str(full)]) == 1
    out = capsys.readouterr().out
    assert "ARK pinned  FAILED  untrusted_root" in out and out.count("FAILED") == 1
    assert main(["verify", "--chain", str(full), "--ca", str(ca)]) == 0
    assert "none (extra root)" in capsys.readouterr().out
