"""A corrupt `launcher.db` (issue 12, item 6): never a traceback. The launcher sets the file aside
(renamed with a timestamp) and starts on a fresh database, and its reconciler destroys the paused SEV
guests no record owns, as after a lost database; their ASIDs come back. A file it cannot set aside stops
the start with one line naming it and the command that recovers."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from launcher_svc.adapters import sqlite_store
from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.adapters.sqlite_store import SqliteLaunchStore
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.spec import PathPolicy, create_spec
from launcher_svc.core.state import Phase
from launcher_svc.server import LauncherServerConfig, create_server, main
from sevlaunch.firmware import EmulatedFirmware
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.session import create_session
from sevlaunch.sev.technology import Technology

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "measurement"
OVMF = str(VECTORS / "ovmf_OvmfX64_suffix.bin")
SECRET_GPA = 0x80C000


def _config() -> LauncherConfig:
    return LauncherConfig(paths=PathPolicy((str(VECTORS),)), secret_gpa=SECRET_GPA, reconcile_interval=0)


def _leave_a_paused_guest(chip: EmulatedFirmware, db: Path) -> str:
    """A two-phase launch left waiting for CompleteLaunch by a launcher that then dies (no stop, no
    fail-closed): a paused guest holding an ASID, and its record in `db`."""

    async def main() -> str:
        hv = EmulatedHypervisor(chip, chip.state_dir / "hypervisor")
        store = SqliteLaunchStore(str(db))
        core = Launcher(hypervisor=hv, store=store, platform=None, owners=None, config=_config())
        await core.start()
        pdh, _ = chip.pdh_cert_export()
        session = create_session(SEVCertificate.from_bytes(pdh), 0x3)
        spec = create_spec(
            name="g",
            memory_mib=256,
            vcpus=1,
            firmware_path=OVMF,
            mode=Technology.SEV,
            policy=0x3,
            paths=_config().paths,
        )
        rec, _ = await core.prepare(
            spec, godh_cert=session.godh.to_bytes(), session=session.blob.to_bytes(), requested_by="c"
        )
        assert rec.state is Phase.MEASURED
        store.close()
        hv.close()
        return rec.domain_name

    return asyncio.run(main())


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite database\n" * 64)


def _damaged_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    assert len(data) >= 3 * 4096
    data[4096 : 3 * 4096] = b"\xa5" * (2 * 4096)  # the table's pages, not the header
    db.write_bytes(bytes(data))


def _undecodable_row(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("UPDATE launches SET state='NOT_A_PHASE'")
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "corrupt", [_garbage, _damaged_pages, _undecodable_row], ids=lambda f: f.__name__[1:]
)
def test_a_corrupt_launcher_db_is_set_aside_and_its_paused_guest_destroyed(
    emulated_chip: EmulatedFirmware,
    tls_dir: Path,
    tmp_path: Path,
    corrupt: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "launcher.db"
    domain = _leave_a_paused_guest(emulated_chip, db)
    assert emulated_chip.platform_status().guest_count == 1
    corrupt(db)
    cfg = LauncherServerConfig(
        tls_dir=tls_dir,
        listen="127.0.0.1:0",
        hypervisor="emulated",
        emulator=emulated_chip.state_dir,
        db=db,
        metrics_listen=None,
        launcher=_config(),
    )

    async def restart() -> list[str]:
        _server, core = await create_server(cfg)
        try:
            return [d.name for d in core.hv.list_domains()]
        finally:
            await core.stop()
            core.hv.close()

    with caplog.at_level(logging.INFO):
        left = asyncio.run(restart())
    assert domain not in left and left == []
    assert emulated_chip.platform_status().guest_count == 0  # the ASID is back
    (aside,) = tmp_path.glob("launcher.db.corrupt-*")
    assert aside.name.startswith("launcher.db.corrupt-")
    assert SqliteLaunchStore(str(db)).records() == []  # a fresh database took its place
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    (warning,) = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert warning.__dict__["db"] == str(db) and warning.__dict__["moved_to"] == str(aside)


def test_a_corrupt_launcher_db_that_cannot_be_set_aside_stops_the_start_in_one_line(
    emulated_chip: EmulatedFirmware,
    tls_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "launcher.db"
    _garbage(db)

    def refuse(path: str, now: float | None = None) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(sqlite_store, "set_aside", refuse)
    # main() points the root logger at this test's stderr; tests/conftest.py puts it back afterwards.
    status = main(
        [
            "--tls-dir", str(tls_dir), "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--hypervisor", "emulated", "--emulator", str(emulated_chip.state_dir), "--db", str(db),
        ]
    )  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    (line,) = [json.loads(line) for line in lines if "cannot start" in line]
    assert str(db) in line["error"] and f"mv {db}" in line["error"] and "corrupt" in line["error"]
    assert db.read_bytes().startswith(b"this is not")  # left as it was
