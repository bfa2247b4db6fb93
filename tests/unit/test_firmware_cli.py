"""`sevlaunch emulator init|status` and `sevlaunch export`, checked with `sevlaunch verify`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sevlaunch.cli import main
from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot, PlatformState
from sevlaunch.sev.chain import CertificateChain, load_roots_file, verify_chain
from sevlaunch.sev.errors import Reason, VerificationFailed


@pytest.fixture(scope="module")
def root_dir(emulated_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding an emulated root, so `init --root` skips the RSA-4096 key generation."""
    out = tmp_path_factory.mktemp("root")
    emulated_root.save(out)
    return out


@pytest.fixture
def chip_dir(tmp_path: Path, root_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    state = tmp_path / "chip"
    args = ["emulator", "init", "--state", str(state), "--root", str(root_dir)]
    args += [
        "--generation",
        "lab",
        "--api-minor",
        "23",
        "--build",
        "7",
        "--max-guests",
        "3",
        "--max-es-guests",
        "1",
    ]
    assert main(args) == 0
    assert "emulated chip created" in capsys.readouterr().out
    return state


def test_init_writes_a_configured_chip(chip_dir: Path, root_dir: Path) -> None:
    fw = EmulatedFirmware(chip_dir, create=False)
    status = fw.platform_status()
    assert (status.api_major, status.api_minor, status.build) == (0, 23, 7)
    assert status.state is PlatformState.UNINIT
    assert (fw.config.generation, fw.config.max_guests, fw.config.max_es_guests) == ("lab", 3, 1)
    assert (chip_dir / "ask_ark.cert").read_bytes() == (root_dir / "ask_ark.cert").read_bytes()
    assert stat.S_IMODE((chip_dir / "cek.key").stat().st_mode) == 0o600


def test_init_refuses_an_existing_chip_and_bad_values(
    chip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["emulator", "init", "--state", str(chip_dir)]) == 1
    assert "already holds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # a one-byte field: refused while parsing, a usage error
        main(["emulator", "init", "--state", str(tmp_path / "x"), "--build", "300"])
    assert exited.value.code == 2 and "argument --build" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["emulator", "status", "--state", str(tmp_path / "none")]) == 1


def test_status(chip_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw = EmulatedFirmware(chip_dir, create=False)
    assert main(["emulator", "status", "--state", str(chip_dir)]) == 0
    text = capsys.readouterr().out
    assert fw.get_id().hex() in text and "0.23 build 7" in text and "UNINIT" in text
    assert main(["emulator", "status", "--state", str(chip_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["chip_id"] == fw.get_id().hex() and doc["guest_count"] == 0 and doc["generation"] == "lab"


def test_export_full_verifies_only_with_the_emulated_root(
    chip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chain.cert"
    assert main(["export", "--state", str(chip_dir), "--full", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert len(data) == 4 * 0x824 + 2 * 1600
    chain = CertificateChain.from_full_bytes(data)
    ca = chip_dir / "ask_ark.cert"
    verified = verify_chain(chain, extra_roots=[load_roots_file(ca.read_bytes(), "emulated")])
    assert all(link.ok for link in verified.links)
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(chain)
    assert exc.value.reason is Reason.UNTRUSTED_ROOT
    capsys.readouterr()
    # The same through the CLI.
    assert main(["verify", "--chain", str(out), "--ca", str(ca)]) == 0
    assert "chain verified" in capsys.readouterr().out
    assert main(["verify", "--chain", str(out)]) != 0


def test_export_without_full_is_the_firmware_chain(chip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pdh_chain.cert"
    assert main(["export", "--state", str(chip_dir), "--out", str(out)]) == 0
    pdh, chain = EmulatedFirmware(chip_dir, create=False).pdh_cert_export()
    assert out.read_bytes() == pdh + chain
    assert main(["export", "--device", "/dev/null", "--full", "--out", str(out)]) == 1
