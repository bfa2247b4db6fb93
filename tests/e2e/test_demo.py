"""`sevlaunch demo` end to end: the command a new user runs first.

Each test runs the real command in a subprocess (three service processes of its own, mTLS on localhost,
the emulated chip, Debian's OVMF) and checks what it reports against independent facts: the launch
digest of an SEV launch without kernel hashes is the SHA-256 of the OVMF image (PROTOCOL.md section 5),
the services' own /metrics, the chip's state directory, and the process table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.demo import verify_audit_chain
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
#: The README promises the demo in under 30 seconds on a 2-core machine.
DEMO_BUDGET_SECONDS = 30.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OVMF.is_file(), reason="Debian's OVMF (package ovmf) is not installed"),
]


def demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sevlaunch", "demo", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEVLAUNCH_")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped running all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def service_pids(progress: str) -> dict[str, int]:
    """The pids the demo printed in its "services SERVING" step."""
    return {
        name: int(pid) for name, pid in re.findall(r"(owner|platform|launcher) \S+ \(pid (\d+)\)", progress)
    }


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------------------------------- --json


@dataclass
class DemoRun:
    doc: dict[str, Any]
    stderr: str
    returncode: int
    wall: float


@pytest.fixture(scope="module")
def demo_json() -> DemoRun:
    started = time.monotonic()
    proc = subprocess.run(
        demo_argv("--json"), capture_output=True, text=True, timeout=120, env=clean_env(), check=False
    )
    wall = time.monotonic() - started
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr}"
    return DemoRun(json.loads(proc.stdout), proc.stderr, proc.returncode, wall)


def test_demo_exits_zero_within_budget(demo_json: DemoRun) -> None:
    assert demo_json.returncode == 0, demo_json.stderr
    assert demo_json.doc["ok"] is True
    # The whole command, interpreter start-up and clean-up included.
    assert demo_json.wall < DEMO_BUDGET_SECONDS, f"demo took {demo_json.wall:.1f} s"


def test_demo_good_launch_runs_with_the_manifest_digest(demo_json: DemoRun) -> None:
    launches = demo_json.doc["launches"]
    assert [launch["name"] for launch in launches] == ["demo-guest", "demo-tampered"]
    good = launches[0]
    assert good["outcome"] == "running"
    assert good["phase"] == "RUNNING"
    assert good["reason"] == ""
    # An SEV launch without kernel hashes measures exactly the OVMF image: its launch digest is the
    # image's SHA-256, computed here without any sevlaunch code.
    expected = hashlib.sha256(OVMF.read_bytes()).hexdigest()
    assert good["matched_digest"] == expected
    assert demo_json.doc["reference_digest"] == expected
    assert good["manifest_id"] == demo_json.doc["manifest_id"]
    assert re.fullmatch(r"[0-9a-f]{96}", good["measurement"])  # measure[32] || mnonce[16]
    assert good["launcher_state"] == "RUNNING"
    assert good["guests_after"] == good["guests_before"] + 1
    phases = [
        "chain_fetched",
        "session_opened",
        "defined",
        "started_paused",
        "measured",
        "secret_released",
        "secret_injected",
        "running",
    ]
    assert list(good["durations_ms"]) == phases
    assert all(isinstance(v, float | int) and v >= 0 for v in good["durations_ms"].values())


def test_demo_tampered_launch_refused_and_destroyed(demo_json: DemoRun) -> None:
    good, bad = demo_json.doc["launches"]
    assert bad["outcome"] == "refused"
    assert bad["phase"] == "SECRET_RELEASED"
    assert bad["reason"] == "measurement_mismatch"
    assert bad["matched_digest"] is None
    assert bad["firmware"].endswith("-tampered.fd")
    # It was measured (so the launch really ran up to LAUNCH_MEASURE), and differently from the good one.
    assert re.fullmatch(r"[0-9a-f]{96}", bad["measurement"])
    assert bad["measurement"][:64] != good["measurement"][:64]
    assert bad["launcher_state"] == "FAILED"
    # Fail closed: the paused domain and its firmware guest context are gone again.
    assert bad["guests_after"] == bad["guests_before"] == good["guests_after"]
    assert bad["domain_destroyed"] is True
    assert set(bad["durations_ms"]) == {
        "chain_fetched",
        "session_opened",
        "defined",
        "started_paused",
        "measured",
        "secret_released",
    }


def test_demo_audit_verified(demo_json: DemoRun) -> None:
    assert demo_json.doc["audit_ok"] is True
    assert "hash chain verified" in demo_json.stderr
    assert "release_secret" in demo_json.stderr and "measurement_mismatch" in demo_json.stderr


def test_demo_cleans_up_processes_and_folder(demo_json: DemoRun) -> None:
    pids = service_pids(demo_json.stderr)
    assert set(pids) == {"owner", "platform", "launcher"}, demo_json.stderr
    assert wait_gone(list(pids.values())) == []
    workdir = Path(demo_json.doc["launches"][1]["firmware"]).parent.parent
    assert workdir.name.startswith("sevlaunch-demo-")
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------- --keep


@dataclass
class KeptDemo:
    doc: dict[str, Any]
    workdir: Path
    tls_dir: Path


@pytest.fixture(scope="module")
def kept_demo() -> Iterator[KeptDemo]:
    proc = subprocess.run(
        demo_argv("--json", "--keep"),
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )
    doc = json.loads(proc.stdout)
    pids = [s["pid"] for s in doc.get("services", {}).values()]
    try:
        assert proc.returncode == 0, proc.stderr
        yield KeptDemo(doc, Path(doc["workdir"]), Path(doc["tls_dir"]))
    finally:
        # The services are the demo's children no more: stop them by their recorded pids only.
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        left = wait_gone(pids)
        for pid in left:
            os.killpg(pid, signal.SIGKILL)
        if doc.get("workdir"):
            shutil.rmtree(doc["workdir"], ignore_errors=True)


def test_keep_leaves_services_running_and_metrics_count_what_happened(kept_demo: KeptDemo) -> None:
    services = kept_demo.doc["services"]
    assert set(services) == {"owner", "platform", "launcher"}
    assert all(alive(s["pid"]) for s in services.values())

    launcher = scrape(services["launcher"]["metrics_url"])
    assert (
        value(
            launcher,
            "sevlaunch_launcher_launches_total",
            mode="orchestrated",
            outcome="running",
            failed_phase="",
        )
        == 1
    )
    assert (
        value(
            launcher,
            "sevlaunch_launcher_launches_total",
            mode="orchestrated",
            outcome="failed",
            failed_phase="SECRET_RELEASED",
        )
        == 1
    )
    assert value(launcher, "sevlaunch_launcher_domains_destroyed_total", path="fail_closed") == 1
    assert value(launcher, "sevlaunch_launcher_launches_in_flight") == 0
    assert (
        value(
            launcher,
            "grpc_server_handled_total",
            grpc_type="server_stream",
            grpc_service="sevlaunch.v1.LauncherService",
            grpc_method="Launch",
            grpc_code="OK",
        )
        == 2
    )
    # Each phase of the good launch was timed once; the refused one stopped after MEASURED.
    assert value(launcher, "sevlaunch_launcher_phase_duration_seconds_count", phase="RUNNING") == 1
    assert value(launcher, "sevlaunch_launcher_phase_duration_seconds_count", phase="MEASURED") == 2
    # The firmware commands the launcher's emulated hypervisor issued in QEMU's place: the running
    # guest had START, UPDATE_DATA, MEASURE, SECRET, FINISH; the refused one START, UPDATE_DATA,
    # MEASURE and its DECOMMISSION. Both are SEV guests: no VMSA.
    launch_commands = {
        "LAUNCH_START": 2,
        "LAUNCH_UPDATE_DATA": 2,
        "LAUNCH_MEASURE": 2,
        "LAUNCH_SECRET": 1,
        "LAUNCH_FINISH": 1,
        "DECOMMISSION": 1,
    }
    for command, count in launch_commands.items():
        fw = "sevlaunch_launcher_firmware_commands_total"
        assert value(launcher, fw, command=command, status="SUCCESS") == count, command
        duration = "sevlaunch_launcher_firmware_command_duration_seconds_count"
        assert value(launcher, duration, command=command) == count, command
    fw_samples = {
        labels: v
        for (name, labels), v in launcher.items()
        if name == "sevlaunch_launcher_firmware_commands_total"
    }
    # Nothing else, and no command failed.
    assert fw_samples == {(("command", c), ("status", "SUCCESS")): n for c, n in launch_commands.items()}

    owner = scrape(services["owner"]["metrics_url"])
    assert value(owner, "sevlaunch_owner_sessions_opened_total") == 2
    assert value(owner, "sevlaunch_owner_secrets_released_total") == 1
    assert value(owner, "sevlaunch_owner_release_refusals_total", reason="measurement_mismatch") == 1
    assert (
        value(
            owner,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="sevlaunch.v1.OwnerService",
            grpc_method="ReleaseSecret",
            grpc_code="PERMISSION_DENIED",
        )
        == 1
    )
    assert value(owner, "sevlaunch_owner_verification_seconds_count", step="measurement") == 2

    platform = scrape(services["platform"]["metrics_url"])
    assert (
        value(
            platform,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="sevlaunch.v1.PlatformService",
            grpc_method="GetCertificateChain",
            grpc_code="OK",
        )
        == 2
    )
    # One chain export for both launches (the second came from the cache), and one CEK from the KDS.
    assert value(platform, "sevlaunch_chain_cache_misses_total") == 1
    assert value(platform, "sevlaunch_chain_cache_hits_total") == 1
    assert (
        value(platform, "sevlaunch_firmware_commands_total", command="PDH_CERT_EXPORT", status="SUCCESS") == 1
    )
    assert value(platform, "sevlaunch_kds_fetches_total", outcome="ok") == 1


def test_keep_chip_holds_exactly_the_running_guest(kept_demo: KeptDemo) -> None:
    # LAUNCH_* run in the launcher's emulated hypervisor, not through platform_svc, so the firmware's
    # own record is the chip directory: one guest context left, the good one, launched and finished.
    chip = EmulatedFirmware(kept_demo.workdir / "chip", create=False)
    handles = list(chip.guest_handles())
    assert len(handles) == 1
    assert chip.platform_status().guest_count == 1
    assert chip.guest_info(handles[0])["state"] == "RUNNING"


def test_keep_audit_chain_detects_an_edited_record(kept_demo: KeptDemo) -> None:
    address = kept_demo.doc["services"]["owner"]["address"]
    with secure_channel_sync(address, kept_demo.tls_dir, "owner-admin") as channel:
        stub = owner_pb2_grpc.OwnerServiceStub(channel)
        records = list(stub.GetAuditLog(owner_pb2.GetAuditLogRequest(), timeout=10).records)
    assert len(records) == 7
    assert [r.action for r in records[-2:]] == ["open_session", "release_secret"]
    assert records[-1].outcome == "refused" and records[-1].reason == "measurement_mismatch"
    assert verify_audit_chain(records) == ""
    # Turning the refusal into an approval, as someone covering their tracks would, breaks its hash.
    forged = [owner_pb2.AuditRecord() for _ in records]
    for copy, original in zip(forged, records, strict=True):
        copy.CopyFrom(original)
    forged[-1].outcome = "allowed"
    assert "does not match its hash" in verify_audit_chain(forged)
    # Dropping a record from the middle breaks the sequence.
    assert "missing" in verify_audit_chain([*records[:3], *records[4:]])


# ---------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_services_and_removes_folder() -> None:
    proc = subprocess.Popen(
        demo_argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env()
    )
    assert proc.stdout is not None
    seen: list[str] = []
    pids: dict[str, int] = {}
    try:
        for line in proc.stdout:
            seen.append(line)
            if "services SERVING" in line:
                pids = service_pids(line)
                break
        assert set(pids) == {"owner", "platform", "launcher"}, "".join(seen)
        assert all(alive(p) for p in pids.values())
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "interrupted (SIGINT)" in output
    assert wait_gone(list(pids.values())) == []
    workdir = Path(re.search(r"in (/\S+sevlaunch-demo-\S+)", output).group(1))  # type: ignore[union-attr]
    assert not workdir.exists()
