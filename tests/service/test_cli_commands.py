"""Every client command of `sevlaunch` against the three services running for real (the demo
environment: separate processes, mTLS, the emulated chip), with its `--json` output parsed and checked
field by field against what the services answer directly. Also: exit statuses (0 done, 1 refused or
failed, 2 usage), errors naming what to change, SEVLAUNCH_* variables for the client options."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sevlaunch import __version__
from sevlaunch.cli import main
from sevlaunch.demo.env import DEFAULT_FIRMWARE, WORKLOAD_ID, DemoEnvironment
from sevlaunch.rpc.v1 import launcher_pb2, platform_pb2

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


@pytest.fixture(scope="module")
def env() -> Iterator[DemoEnvironment]:
    with DemoEnvironment() as demo:
        demo.prepare()
        demo.start()
        demo.configure_owner()
        yield demo


def _conn(env: DemoEnvironment, service: str) -> list[str]:
    return ["--endpoint", env.services[service].address, "--tls-dir", str(env.tls_dir)]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    assert main(argv) == code, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # one JSON document, one line
    return json.loads(out)


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("sevlaunch: error: ") and err.count("\n") == 1, err
    return err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sevlaunch {__version__}"


def test_platform_status_id_chain_json(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    direct = env.platform().GetPlatformStatus(platform_pb2.GetPlatformStatusRequest(), timeout=30)
    status = _json(capsys, ["platform", "status", *_conn(env, "platform"), "--json"])
    assert status == {
        "firmware": {
            "api_major": direct.firmware.api_major,
            "api_minor": direct.firmware.api_minor,
            "build_id": direct.firmware.build_id,
        },
        "state": platform_pb2.PlatformState.Name(direct.state).removeprefix("PLATFORM_STATE_"),
        "owned_externally": direct.owned_externally,
        "es_supported": direct.es_supported,
        "guest_count": direct.guest_count,
        "flags": direct.flags,
    }
    assert isinstance(status["flags"], int)
    chip = env.platform().GetIdentifier(platform_pb2.GetIdentifierRequest(), timeout=30).chip_id
    assert _json(capsys, ["platform", "id", *_conn(env, "platform"), "--json"]) == {"chip_id": chip}
    out = tmp_path / "chain.cert"
    chain = _json(capsys, ["platform", "chain", *_conn(env, "platform"), "--json", "--out", str(out)])
    assert chain["platform"]["chip_id"] == chip
    assert chain["platform"]["generation"] == "emulated"
    assert chain["cek_source"] in ("kds", "kds-cache")
    assert chain["out"] == str(out) and chain["full_chain_bytes"] == len(out.read_bytes())
    parts = ("pdh_cert", "pek_cert", "oca_cert", "cek_cert", "ask_cert", "ark_cert")
    assert b"".join(bytes.fromhex(chain["platform"]["chain"][p]) for p in parts) == out.read_bytes()


def test_client_options_from_environment(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEVLAUNCH_PLATFORM_ENDPOINT", env.services["platform"].address)
    monkeypatch.setenv("SEVLAUNCH_TLS_DIR", str(env.tls_dir))
    assert "chip_id" in _json(capsys, ["platform", "id", "--json"])
    # The option wins over its variable.
    monkeypatch.setenv("SEVLAUNCH_CLIENT_IDENTITY", "owner")
    err = _fails(capsys, ["platform", "id", "--identity", "owner"])
    assert "'owner'" in err
    assert _json(capsys, ["platform", "id", "--identity", "client", "--json"])["chip_id"]


def test_refusal_names_identity_and_allowed_roles(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(capsys, ["platform", "rotate", *_conn(env, "platform"), "--identity", "client"])
    assert "PERMISSION_DENIED" in err and "caller_not_authorized" in err
    assert "you called as 'client'" in err and "allowed: platform-admin" in err
    assert "--identity platform-admin" in err
    assert str(env.tls_dir / "client.pem") in err


def test_wrong_server_names_the_service(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    # The owner's address where the platform is expected: the owner cannot prove the platform identity.
    argv = ["platform", "id", *_conn(env, "owner"), "--timeout", "5"]
    err = _fails(capsys, argv)
    assert "is not the platform service" in err and "--server-identity" in err


def test_usage_errors_exit_2(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    conn = _conn(env, "launcher")
    with pytest.raises(SystemExit) as exc:
        main(["launches", "show", *conn])  # LAUNCH_ID missing: argparse
    assert exc.value.code == 2
    capsys.readouterr()
    argv = [
        "launches",
        "prepare",
        *conn,
        "--godh",
        "x",
        "--session",
        "y",
        "--firmware",
        "/f",
        "--initrd",
        "i",
    ]
    assert "need --kernel" in _fails(capsys, argv, code=2)
    assert "--yes" in _fails(capsys, ["platform", "reset", *_conn(env, "platform")], code=2)


def test_launch_then_list_show_destroy(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "launch",
        "--launcher",
        env.services["launcher"].address,
        "--owner",
        env.services["owner"].address,
        "--workload",
        WORKLOAD_ID,
        "--firmware",
        str(env.firmware),
        "--tls-dir",
        str(env.tls_dir),
        "--memory",
        "256",
        "--name",
        "cli-guest",
        "--json",
    ]
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["phase"] for e in events][-1] == "RUNNING"
    assert all(
        set(e)
        == {"launch_id", "phase", "duration_ms", "failed_phase", "reason", "detail", "domain_name", "at"}
        for e in events
    )
    assert all(e["failed_phase"] is None and isinstance(e["duration_ms"], float) for e in events)
    launch_id = events[-1]["launch_id"]
    conn = _conn(env, "launcher")

    listed = _json(capsys, ["launches", "list", *conn, "--json"])["launches"]
    mine = [launch for launch in listed if launch["launch_id"] == launch_id]
    assert len(mine) == 1 and mine[0]["state"] == "RUNNING"

    shown = _json(capsys, ["launches", "show", launch_id, *conn, "--json"])
    direct = env.launcher().GetLaunch(launcher_pb2.GetLaunchRequest(launch_id=launch_id), timeout=30)
    assert shown["launch_id"] == direct.launch_id
    assert shown["mode"] == "ORCHESTRATED" and shown["state"] == "RUNNING"
    assert shown["failed_phase"] is None and shown["reason"] == ""
    assert shown["guest_name"] == "cli-guest" and shown["domain_name"] == direct.domain_name
    assert shown["workload_id"] == WORKLOAD_ID and shown["owner_endpoint"] == direct.owner_endpoint
    assert shown["sev_mode"] == "SEV" and shown["policy"] == direct.policy == 3 and shown["vcpus"] == 1
    assert shown["measurement"] == direct.measurement.hex() and len(shown["measurement"]) == 96
    for key in ("created_at", "updated_at"):
        assert shown[key] is not None
        assert re.match(RFC3339, shown[key]), shown[key]
    assert shown == mine[0]

    # A RUNNING launch cannot be aborted: refused (exit 1) with the launcher's reason.
    assert "FAILED_PRECONDITION" in _fails(capsys, ["launches", "abort", launch_id, *conn])
    destroyed = _json(capsys, ["launches", "destroy", launch_id, *conn, "--json"])
    assert destroyed["launch_id"] == launch_id and destroyed["state"] == "DESTROYED"
    listed = _json(capsys, ["launches", "list", *conn, "--json"])["launches"]
    assert launch_id not in {launch["launch_id"] for launch in listed}
    listed = _json(capsys, ["launches", "list", *conn, "--all", "--json"])["launches"]
    assert launch_id in {launch["launch_id"] for launch in listed}


def test_failed_launch_shows_phase_and_reason(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "launch",
        "--launcher",
        env.services["launcher"].address,
        "--owner",
        env.services["owner"].address,
        "--workload",
        WORKLOAD_ID,
        "--firmware",
        str(env.tampered_firmware),
        "--tls-dir",
        str(env.tls_dir),
        "--memory",
        "256",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    failed = out.strip().splitlines()[-1]
    assert failed.startswith("FAILED in SECRET_RELEASED: measurement_mismatch")
    launch_id = failed.split("[launch ")[1].split(";")[0]
    shown = _json(capsys, ["launches", "show", launch_id, *_conn(env, "launcher"), "--json"])
    assert shown["state"] == "FAILED" and shown["failed_phase"] == "SECRET_RELEASED"
    assert shown["reason"] == "measurement_mismatch" and shown["detail"]
    # The text form shows the same facts for people.
    assert main(["launches", "show", launch_id, *_conn(env, "launcher")]) == 0
    lines = {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
    }
    assert lines["failed_phase"] == "SECRET_RELEASED" and lines["reason"] == "measurement_mismatch"
    assert lines["launch_id"] == launch_id and lines["state"] == "FAILED"


def test_path_not_allowed_names_image_dir(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    session = env.workdir / "unused"
    session.write_bytes(b"\x00")
    argv = [
        "launches",
        "prepare",
        *_conn(env, "launcher"),
        "--godh",
        str(session),
        "--session",
        str(session),
        "--firmware",
        "/etc/hostname",
    ]
    err = _fails(capsys, argv)
    assert "path_not_allowed" in err and "--image-dir" in err
    assert str(env.images_dir.resolve()) in err
    assert err.count("path_not_allowed") == 1  # the reason is not repeated


def test_two_phase_prepare_complete_and_abort(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    chain = tmp_path / "chain.cert"
    assert main(["platform", "chain", *_conn(env, "platform"), "--out", str(chain)]) == 0
    ca = ["--ca", str(env.chip_dir / "ask_ark.cert")]
    session = tmp_path / "session"
    assert main(["session", "--chain", str(chain), *ca, "--policy", "0x3", "--out", str(session)]) == 0
    capsys.readouterr()
    conn = _conn(env, "launcher")
    spec = ["--ovmf", str(env.firmware), "--memory", "256", "--name", "two-phase"]
    blob_file = tmp_path / "measurement.b64"
    prepared = _json(
        capsys,
        [
            "launches",
            "prepare",
            *conn,
            "--godh",
            str(session / "godh.b64"),
            "--session",
            str(session / "session.b64"),
            *spec,
            "--json",
            "--measurement-out",
            str(blob_file),
        ],
    )
    assert set(prepared) == {
        "launch_id",
        "measurement",
        "api_major",
        "api_minor",
        "build_id",
        "policy",
        "domain_name",
        "complete_by",
    }
    assert prepared["policy"] == 3 and len(prepared["measurement"]) == 96
    assert base64.b64decode(blob_file.read_text()).hex() == prepared["measurement"]
    shown = _json(capsys, ["launches", "show", prepared["launch_id"], *conn, "--json"])
    assert shown["mode"] == "TWO_PHASE" and shown["state"] == "MEASURED"

    secret = tmp_path / "passphrase"
    secret.write_bytes(b"two-phase secret\x00")
    header, payload = tmp_path / "header.bin", tmp_path / "payload.bin"
    assert (
        main(
            [
                "secret",
                "build",
                "--tek",
                str(session / "tek.bin"),
                "--tik",
                str(session / "tik.bin"),
                "--launch-measure-blob",
                blob_file.read_text().strip(),
                "--secret",
                f"736869e5-84f0-4973-92ec-06879ce3da0b:{secret}",
                "--header-out",
                str(header),
                "--payload-out",
                str(payload),
                "--api-major",
                str(prepared["api_major"]),
                "--api-minor",
                str(prepared["api_minor"]),
            ]
        )
        == 0
    )
    capsys.readouterr()
    completed = _json(
        capsys,
        [
            "launches",
            "complete",
            prepared["launch_id"],
            *conn,
            "--json",
            "--secret-header",
            str(header),
            "--secret-payload",
            str(payload),
        ],
    )
    assert completed["state"] == "RUNNING" and completed["launch_id"] == prepared["launch_id"]
    _json(capsys, ["launches", "destroy", prepared["launch_id"], *conn, "--json"])

    # A second prepared launch is aborted before it completes.
    prepared = _json(
        capsys,
        [
            "launches",
            "prepare",
            *conn,
            "--godh",
            str(session / "godh.b64"),
            "--session",
            str(session / "session.b64"),
            *spec,
            "--json",
        ],
    )
    aborted = _json(capsys, ["launches", "abort", prepared["launch_id"], *conn, "--json"])
    assert aborted["state"] in ("FAILED", "DESTROYED") and aborted["launch_id"] == prepared["launch_id"]


def test_platform_admin_verbs(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    admin = [*_conn(env, "platform"), "--identity", "platform-admin"]
    pdh = tmp_path / "pdh.cert"
    rotated = _json(capsys, ["platform", "rotate", *admin, "--json", "--pdh-out", str(pdh)])
    assert rotated["pdh_bytes"] == 0x824 == len(pdh.read_bytes())
    assert _json(capsys, ["platform", "generate", *admin, "--json"]) == {"action": "generate"}
    csr = tmp_path / "pek.csr"
    got = _json(capsys, ["platform", "provision", *admin, "--csr-out", str(csr), "--json"])
    assert got["csr_bytes"] == 0x824 == len(csr.read_bytes())
    # The CSR is unsigned: importing it as the signed PEK is refused by the platform (exit 1).
    err = _fails(capsys, ["platform", "provision", *admin, "--pek", str(csr), "--oca", str(csr)])
    assert "INVALID_ARGUMENT" in err or "PERMISSION_DENIED" in err or "FAILED_PRECONDITION" in err
    assert env.guest_count() == 0
    assert _json(capsys, ["platform", "reset", *admin, "--yes", "--json"]) == {"action": "reset"}
    status = _json(capsys, ["platform", "status", *_conn(env, "platform"), "--json"])
    assert status["owned_externally"] is False
