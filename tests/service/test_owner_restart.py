"""The owner as a real process: SIGKILL between OpenSession and ReleaseSecret, restart, release works.

Sessions (with their TEK/TIK sealed under the KEK) live in the SQLite file, so a crash loses nothing.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from owner_proc import ProcessHarness, free_port, start_owner, wait_serving
from owner_support import (
    SEV_POLICY,
    Publisher,
    emulator_chain,
    launch,
    provision,
    secret_area,
)

from sevlaunch.cli import main as cli_main
from sevlaunch.rpc.v1 import owner_pb2

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]


def test_sigkill_between_open_and_release(
    tmp_path: Path, tls_dir: Path, emu: Any, emu_root_file: Path, publisher: Publisher, capsys: Any
) -> None:
    port = free_port()
    address = f"localhost:{port}"
    proc = start_owner(tmp_path, tls_dir, emu_root_file, publisher, port)
    try:
        wait_serving(address, tls_dir, proc)
        assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600
        h = ProcessHarness(address, tls_dir)
        provision(h, publisher)  # type: ignore[arg-type]
        opened = h.stub().OpenSession(
            owner_pb2.OpenSessionRequest(workload_id="web", chain=emulator_chain(emu), policy=SEV_POLICY)
        )
        run = launch(emu, opened)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        proc = start_owner(tmp_path, tls_dir, emu_root_file, publisher, port)
        wait_serving(address, tls_dir, proc)
        released = h.stub().ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        base, _ = secret_area()
        emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
        emu.decommission(run.handle)

        # The admin CLI against the live service, and the offline audit check of its database.
        assert (
            cli_main(["owner", "sessions", "--endpoint", address, "--tls-dir", str(tls_dir), "--json"]) == 0
        )
        assert "RELEASED" in [s["state"] for s in json.loads(capsys.readouterr().out)["sessions"]]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert (
        cli_main(
            [
                "owner",
                "audit",
                "verify",
                "--db",
                str(tmp_path / "owner.db"),
                "--kek-file",
                str(tmp_path / "kek"),
            ]
        )
        == 0
    )
    assert "MACs verified" in capsys.readouterr().out
