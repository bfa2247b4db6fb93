"""A launcher process that dies at a chosen point (a test helper, run as a script).

    python tests/fakes/kill_launch.py STATE_DIR DB OVMF KILL_AT

Opens the emulated chip at STATE_DIR with its hypervisor, the launch store DB and a launcher core, and
starts one two-phase launch of OVMF. At the step or firmware command named KILL_AT ("after DEFINED",
"after LAUNCH_START", ...: the checkpoints of the step machine and of the emulated hypervisor) it sends
itself SIGKILL, the way a node loses a process: no finally, no fail-closed. Exits 0 if it never got there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from launcher_svc.adapters.emulated import EmulatedHypervisor
from launcher_svc.adapters.sqlite_store import SqliteLaunchStore
from launcher_svc.core.launcher import Launcher, LauncherConfig
from launcher_svc.core.spec import PathPolicy, create_spec
from sevlaunch.firmware import EmulatedFirmware
from sevlaunch.sev.cert import SEVCertificate
from sevlaunch.sev.session import create_session
from sevlaunch.sev.technology import Technology

SECRET_GPA = 0x80C000


def config(ovmf: Path) -> LauncherConfig:
    return LauncherConfig(paths=PathPolicy((str(ovmf.parent),)), secret_gpa=SECRET_GPA, reconcile_interval=0)


async def launch(state_dir: Path, db: Path, ovmf: Path, kill_at: str) -> None:
    def checkpoint(name: str) -> None:
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    chip = EmulatedFirmware(state_dir)
    hv = EmulatedHypervisor(chip, state_dir / "hypervisor", checkpoint=checkpoint)
    core = Launcher(
        hypervisor=hv,
        store=SqliteLaunchStore(str(db)),
        platform=None,
        owners=None,
        config=config(ovmf),
        checkpoint=checkpoint,
    )
    await core.start()
    pdh, _ = chip.pdh_cert_export()
    session = create_session(SEVCertificate.from_bytes(pdh), 0x3)
    spec = create_spec(
        name="g",
        memory_mib=256,
        vcpus=1,
        firmware_path=str(ovmf),
        mode=Technology.SEV,
        policy=0x3,
        paths=config(ovmf).paths,
    )
    await core.prepare(
        spec, godh_cert=session.godh.to_bytes(), session=session.blob.to_bytes(), requested_by="c"
    )


if __name__ == "__main__":
    state, db_path, image, point = sys.argv[1:5]
    asyncio.run(launch(Path(state), Path(db_path), Path(image), point))
