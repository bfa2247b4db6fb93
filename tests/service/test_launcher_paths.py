"""Paths as a user types them: relative state folders work, missing folders get one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher_svc.adapters.emulated import EmulatedHypervisor
from sevlaunch.cli import main as cli_main


def test_the_emulated_hypervisor_accepts_a_relative_state_folder(
    emulated_chip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sevlaunch-launcher --emulator chip` from the folder holding it: libvirt must not read "chip" in
    # test://chip/... as a host name.
    monkeypatch.chdir(tmp_path)
    hv = EmulatedHypervisor(emulated_chip, "hypervisor")
    assert hv.domains_dir == tmp_path / "hypervisor"
    assert (tmp_path / "hypervisor" / "testnode.xml").is_file()


def test_a_key_into_a_missing_folder_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["keygen", "--out", "pub/key"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sevlaunch: error: cannot write pub/key: folder pub does not exist"
    assert not (tmp_path / "pub").exists()
