"""A launcher killed at any point of a launch leaves nothing on the chip once it is back (issue 12,
item 11). A launcher SIGKILLed between DEFINED and STARTED_PAUSED left the chip's guest in LUPDATE
holding an ASID that no restart cleaned up. The kill points are the checkpoints between the steps of the
step machine and between the firmware commands of the emulated hypervisor (QEMU's part): exact, no sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.kill_launch import config

from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.adapters.sqlite_store import SqliteLaunchStore
from launcher_svc.core.launcher import Launcher
from launcher_svc.core.state import Phase
from sevlaunch.firmware import EmulatedFirmware

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "tests" / "fakes" / "kill_launch.py"
OVMF = REPO / "tests" / "vectors" / "measurement" / "ovmf_OvmfX64_suffix.bin"

KILL_POINTS = [
    "after DEFINED",
    "before STARTED_PAUSED",
    "after LAUNCH_START",  # the guest exists (LUPDATE, an ASID); its handle is not recorded yet
    "after LAUNCH_UPDATE_DATA",
    "after LAUNCH_MEASURE",
    "after STARTED_PAUSED",
    "after MEASURED",
]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_a_launcher_killed_mid_launch_leaves_no_guest_on_the_chip_after_restart(
    emulated_chip: EmulatedFirmware, tmp_path: Path, kill_at: str
) -> None:
    db = tmp_path / "launcher.db"
    # The helper runs this checkout's code, whatever the installed one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(emulated_chip.state_dir), str(db), str(OVMF), kill_at],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    chip = EmulatedFirmware(emulated_chip.state_dir)
    if kill_at != "after DEFINED" and kill_at != "before STARTED_PAUSED":
        assert chip.guest_handles(), "the kill left no guest: the point was not reached"

    async def restart() -> None:
        hv = EmulatedHypervisor(chip, emulated_chip.state_dir / "hypervisor")
        store = SqliteLaunchStore(str(db))
        core = Launcher(hypervisor=hv, store=store, platform=None, owners=None, config=config(OVMF))
        await core.start()  # the reconciler runs before anything else
        try:
            assert chip.guest_handles() == []
            assert chip.platform_status().guest_count == 0
            assert hv.list_domains() == []
            (rec,) = store.records()
            assert (rec.state, rec.reason) == (Phase.FAILED, "launcher_restarted")
        finally:
            await core.stop()
            hv.close()
            store.close()

    asyncio.run(restart())
    assert not list((emulated_chip.state_dir / "hypervisor").glob("sl-*.json"))
