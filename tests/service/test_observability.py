"""What an operator's Prometheus and log shipper see of the three services running for real: process
series, `sevlaunch_build_info`, the conventional gRPC labels, a refused launch counted as refused,
`promtool check metrics` clean on each service's /metrics, and the launch id carried into log lines."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch import __version__
from sevlaunch.demo.env import DEFAULT_FIRMWARE, DemoEnvironment
from sevlaunch.rpc import launch_id_scope, secure_channel_sync
from sevlaunch.rpc.v1 import platform_pb2, platform_pb2_grpc

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

SERVICES = {
    "platform": "sevlaunch.v1.PlatformService",
    "launcher": "sevlaunch.v1.LauncherService",
    "owner": "sevlaunch.v1.OwnerService",
}


LAUNCHES: dict[str, str] = {}  # name -> the launcher's launch id, filled by the env fixture


@pytest.fixture(scope="module")
def env() -> Iterator[DemoEnvironment]:
    with DemoEnvironment() as demo:
        demo.prepare()
        demo.start()
        demo.configure_owner()
        good = demo.launch("good", demo.firmware)
        refused = demo.launch("tampered", demo.tampered_firmware)
        assert good.outcome == "running" and refused.reason == "measurement_mismatch"
        LAUNCHES.update(good=good.launch_id, tampered=refused.launch_id)
        yield demo


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_service_exports_process_build_and_grpc_series(env: DemoEnvironment, name: str) -> None:
    url = env.metrics_urls()[name]
    assert url.startswith("http://127.0.0.1:")
    samples = _samples(_scrape(url))
    names = {n for n, _ in samples}
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                   "process_start_time_seconds", "python_info"):  # fmt: skip
        assert series in names, series
    assert samples[("sevlaunch_build_info", (("service", name), ("version", __version__)))] == 1
    handled = [labels for n, labels in samples if n == "grpc_server_handled_total"]
    assert handled, "no gRPC calls counted"
    for labels in handled:
        keys = dict(labels)
        assert set(keys) == {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}
        assert keys["grpc_service"] in (SERVICES[name], "grpc.health.v1.Health")
        assert "/" not in keys["grpc_method"]
    assert not [n for n in names if n.startswith("sevlaunch_rpc_requests")]  # the old series is gone


def test_a_refused_launch_is_counted_as_refused(env: DemoEnvironment) -> None:
    launcher = _samples(_scrape(env.metrics_urls()["launcher"]))
    launch = (("grpc_method", "Launch"), ("grpc_service", SERVICES["launcher"]))
    # Both Launch streams ended OK (the failure rides in the stream) ...
    ok = (("grpc_code", "OK"), *launch, ("grpc_type", "server_stream"))
    assert launcher[("grpc_server_handled_total", ok)] == 2
    # ... but the outcomes tell the running launch from the refused one.
    assert launcher[("sevlaunch_rpc_outcomes_total", (*launch, ("outcome", "ok")))] == 1
    assert launcher[("sevlaunch_rpc_outcomes_total", (*launch, ("outcome", "refused")))] == 1
    failed = (("failed_phase", "SECRET_RELEASED"), ("mode", "orchestrated"), ("outcome", "failed"))
    assert launcher[("sevlaunch_launcher_launches_total", failed)] == 1
    owner = _samples(_scrape(env.metrics_urls()["owner"]))
    release = (("grpc_method", "ReleaseSecret"), ("grpc_service", SERVICES["owner"]))
    denied = (("grpc_code", "PERMISSION_DENIED"), *release, ("grpc_type", "unary"))
    assert owner[("grpc_server_handled_total", denied)] == 1
    assert owner[("sevlaunch_rpc_outcomes_total", (*release, ("outcome", "refused")))] == 1
    assert owner[("sevlaunch_owner_release_refusals_total", (("reason", "measurement_mismatch"),))] == 1


@pytest.mark.parametrize("name", list(SERVICES))
def test_promtool_check_metrics(env: DemoEnvironment, name: str) -> None:
    text = _scrape(env.metrics_urls()[name])
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_launch_id_from_the_client_reaches_the_service_log(env: DemoEnvironment) -> None:
    launch_id = "obs-test-0123456789"
    with secure_channel_sync(env.services["platform"].address, env.tls_dir, "client") as channel:
        stub = platform_pb2_grpc.PlatformServiceStub(channel)
        with launch_id_scope(launch_id):
            stub.GetIdentifier(platform_pb2.GetIdentifierRequest(), timeout=30)
        stub.GetPlatformStatus(platform_pb2.GetPlatformStatusRequest(), timeout=30)  # outside the scope
    log = Path(env.logs_dir / "platform.log")
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        rpc = [line for line in lines if line.get("message") == "rpc"]
        tagged = [line for line in rpc if line.get("launch_id") == launch_id]
        later = [line for line in rpc if line.get("method", "").endswith("/GetPlatformStatus")]
        if (tagged and later) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [line["method"] for line in tagged] == ["/sevlaunch.v1.PlatformService/GetIdentifier"]
    assert all("launch_id" not in line for line in later[-1:])


def _tagged_rpcs(log: Path, launch_id: str) -> list[str]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [
        str(line["method"])
        for line in lines
        if line.get("message") == "rpc" and line.get("launch_id") == launch_id
    ]


def _tagged_lines(log: Path, launch_id: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("launch_id") == launch_id]


@pytest.mark.parametrize("name", ["good", "tampered"])
def test_one_launch_id_in_all_three_logs_and_the_owner_audit(env: DemoEnvironment, name: str) -> None:
    """The launcher's id for a launch tags the launcher's own call, the platform's and owner's calls it
    made for that launch, and the owner's audit records of the session and the release decision."""
    launch_id = LAUNCHES[name]
    assert launch_id
    expected = {
        "launcher": {"/sevlaunch.v1.LauncherService/GetLaunch"},  # the demo reads the launch back by id
        "platform": {"/sevlaunch.v1.PlatformService/GetCertificateChain"},
        "owner": {"/sevlaunch.v1.OwnerService/OpenSession", "/sevlaunch.v1.OwnerService/ReleaseSecret"},
    }
    deadline = time.monotonic() + 10
    while True:
        seen = {svc: set(_tagged_rpcs(env.logs_dir / f"{svc}.log", launch_id)) for svc in expected}
        if all(expected[svc] <= seen[svc] for svc in expected) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for svc in expected:
        assert expected[svc] <= seen[svc], (svc, seen[svc])
    # The launcher's own lines about the launch carry it too (its phase log lines, the GetLaunch call).
    assert _tagged_lines(env.logs_dir / "launcher.log", launch_id)
    # The audit records carry it, and the chain still verifies with them.
    audit = env.audit()
    assert audit.ok, audit.problem
    tagged = {(r.action, r.outcome) for r in env.owner_audit_events() if r.launch_id == launch_id}
    outcome = "allowed" if name == "good" else "refused"
    assert ("open_session", "allowed") in tagged and ("release_secret", outcome) in tagged, tagged
