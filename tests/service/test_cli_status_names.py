"""One name for each fact: `sevlaunch emulator status --json` on the chip a running platform service
serves prints the platform's facts under the names and types `sevlaunch platform status --json` uses
(the GetPlatformStatusResponse message in docs/CLI.md's style), with the same values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.cli.output import message_dict
from sevlaunch.demo.env import DEFAULT_FIRMWARE, DemoEnvironment
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.rpc.v1 import platform_pb2

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

PLATFORM_KEYS = set(message_dict(platform_pb2.GetPlatformStatusResponse()))


@pytest.fixture(scope="module")
def env() -> Iterator[DemoEnvironment]:
    with DemoEnvironment() as demo:
        demo.prepare()
        demo.start()
        yield demo


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one compact JSON document, as every --json
    return json.loads(out)


def test_emulator_and_platform_status_share_names_and_values(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--endpoint", env.services["platform"].address, "--tls-dir", str(env.tls_dir)]
    platform = _json(capsys, ["platform", "status", *conn, "--json"])
    emulator = _json(capsys, ["emulator", "status", "--state", str(env.chip_dir), "--json"])
    assert set(platform) == PLATFORM_KEYS == {
        "firmware", "state", "owned_externally", "es_supported", "guest_count", "flags"
    }  # fmt: skip
    assert {k: emulator[k] for k in PLATFORM_KEYS} == platform
    assert set(emulator) - PLATFORM_KEYS == {
        "chip_id", "generation", "max_guests", "max_es_guests", "guests"
    }  # fmt: skip
    # The old spellings are gone.
    assert not {"build", "es_enabled", "api_major"} & set(emulator)

    chip = EmulatedFirmware(env.chip_dir, create=False)
    status = chip.platform_status()
    assert emulator["firmware"] == {
        "api_major": status.api_major, "api_minor": status.api_minor, "build_id": status.build
    }  # fmt: skip
    assert emulator["state"] == status.state.name and isinstance(emulator["flags"], int)
    assert emulator["flags"] == status.flags and emulator["es_supported"] is status.es_enabled
    assert emulator["chip_id"] == chip.chip_id_hex()
    chip_id = _json(capsys, ["platform", "id", *conn, "--json"])["chip_id"]
    assert emulator["chip_id"] == chip_id and emulator["generation"] == "emulated"
    assert emulator["guests"] == [] and emulator["guest_count"] == 0
    assert isinstance(emulator["max_guests"], int) and isinstance(emulator["max_es_guests"], int)
