"""The emulated KDS: `/cek/id/<chip id>` serves the ASK-signed CEK, anything else is a 404."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.sev.cert import SEVCertificate, Usage


@pytest.fixture(scope="module")
def chips(emulated_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> list[EmulatedFirmware]:
    base = tmp_path_factory.mktemp("kds")
    return [EmulatedFirmware(base / f"chip{i}", root=emulated_root) for i in range(2)]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serves_each_chips_ask_signed_cek(chips: list[EmulatedFirmware], emulated_root: EmulatedRoot) -> None:
    with KDSServer([chips[0], chips[1].state_dir]) as kds:
        for chip in chips:
            status, body = get(f"{kds.url}/cek/id/{chip.get_id().hex()}")
            assert status == 200
            cek = SEVCertificate.from_bytes(body)
            assert cek.usage is Usage.CEK
            cek.verify_signed_by(emulated_root.ask)
            _, chain = chip.pdh_cert_export()
            exported = SEVCertificate.from_bytes(chain[2 * 0x824 :])
            assert cek.public_key_bytes() == exported.public_key_bytes()
        # Like AMD's KDS, each reply is signed afresh: the bytes differ, the key does not.
        url = f"{kds.url}/cek/id/{chips[0].get_id().hex()}"
        first, second = get(url)[1], get(url)[1]
        assert first != second
        assert (
            SEVCertificate.from_bytes(first).public_key_bytes()
            == SEVCertificate.from_bytes(second).public_key_bytes()
        )
        assert kds.requests == 4


def test_unknown_ids_and_paths_are_not_found(chips: list[EmulatedFirmware]) -> None:
    with KDSServer(chips[:1]) as kds:
        chip_hex = chips[0].get_id().hex()
        assert get(f"{kds.url}/cek/id/{chips[1].get_id().hex()}")[0] == 404  # not served here
        assert get(f"{kds.url}/cek/id/{'00' * 64}")[0] == 404
        assert get(f"{kds.url}/cek/id/{chip_hex.upper()}")[0] == 404  # the KDS takes lower hex
        assert get(f"{kds.url}/vcek/v1/Milan/{chip_hex}")[0] == 404
        assert get(f"{kds.url}/cek/id/{chip_hex}?x=1")[0] == 200


def test_cli_serves_until_stopped(chips: list[EmulatedFirmware]) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sevlaunch",
            "emulator",
            "kds",
            "--state",
            str(chips[0].state_dir),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().strip()
        assert banner.startswith("emulated KDS on http://127.0.0.1:")
        url = banner.rsplit(" ", 1)[1]
        status, body = get(f"{url}/cek/id/{chips[0].get_id().hex()}")
        assert status == 200 and len(body) == 0x824
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_refuses_a_directory_without_chip(tmp_path: Path) -> None:
    from sevlaunch.cli import main

    assert main(["emulator", "kds", "--state", str(tmp_path), "--listen", "127.0.0.1:0"]) == 1
