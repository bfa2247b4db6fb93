"""The CEK from the KDS: deadline, Retry-After, bounded retries, on-disk cache; a provisioned file."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.firmware import EmulatedFirmware
from sevlaunch.rpc import error_info, secure_channel_sync
from sevlaunch.rpc.v1 import platform_pb2 as pb
from sevlaunch.rpc.v1 import platform_pb2_grpc
from sevlaunch.sev.cert import SEVCertificate


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _chain(address: str, tls_dir: Path) -> pb.GetCertificateChainResponse:
    with secure_channel_sync(address, tls_dir, "launcher") as ch:
        reply: pb.GetCertificateChainResponse = platform_pb2_grpc.PlatformServiceStub(ch).GetCertificateChain(
            pb.GetCertificateChainRequest(), timeout=20
        )
        return reply


def _kds_outcomes(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        s.labels["outcome"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "sevlaunch_kds_fetches_total"
    }


def test_kds_fetch_is_cached_on_disk_and_serves_when_the_kds_is_gone(
    start_platform: Any,
    tls_dir: Path,
    emulated_chip: EmulatedFirmware,
    tmp_path: Path,
    scripted_kds: Callable[..., Any],
) -> None:
    cache = tmp_path / "cek-cache"
    chip_path = f"/cek/id/{emulated_chip.chip_id_hex()}"
    paths: list[str] = []

    def kds_reply(n: int) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/octet-stream"}, emulated_chip.kds_cek()

    kds = scripted_kds(kds_reply, record_paths=paths)
    running, _ = start_platform(kds_url=kds.url, cek_cache_dir=cache, kds_timeout=5)
    reply = _chain(running.address, tls_dir)
    assert reply.cek_source == "kds" and paths == [chip_path]
    assert _kds_outcomes(running.metrics_url) == {"ok": 1}
    kds.close()
    cached = cache / f"{emulated_chip.chip_id_hex()}.cek"
    assert cached.read_bytes() == reply.platform.chain.cek_cert
    # A second platform process (fresh memory) with the KDS unreachable serves the cached CEK.
    again, _ = start_platform(kds_url=_closed_port_url(), cek_cache_dir=cache, kds_timeout=1)
    second = _chain(again.address, tls_dir)
    assert second.cek_source == "kds-cache"
    assert second.platform.chain.cek_cert == reply.platform.chain.cek_cert


@pytest.mark.parametrize("kind", ["unreachable", "slow"])
def test_kds_down_gives_unavailable_within_the_deadline(
    start_platform: Any, tls_dir: Path, scripted_kds: Callable[..., Any], kind: str
) -> None:
    if kind == "unreachable":
        url = _closed_port_url()
    else:
        url = scripted_kds(lambda n: (200, {}, b"\0" * 0x824), delay=8.0).url
    running, _ = start_platform(kds_url=url, kds_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _chain(running.address, tls_dir)
    elapsed = time.monotonic() - started
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.UNAVAILABLE
    assert info.reason == "kds_unavailable"
    assert elapsed < 2.5, elapsed
    expected = "unavailable" if kind == "unreachable" else "timeout"
    assert info.metadata["kds_outcome"] == expected
    assert _kds_outcomes(running.metrics_url) == {expected: 1}


def test_retry_after_is_honoured_within_the_deadline(
    start_platform: Any, tls_dir: Path, emulated_chip: EmulatedFirmware, scripted_kds: Callable[..., Any]
) -> None:
    cek = emulated_chip.kds_cek()
    kds = scripted_kds(lambda n: (429, {"Retry-After": "1"}, b"") if n == 1 else (200, {}, cek))
    running, _ = start_platform(kds_url=kds.url, kds_timeout=5)
    started = time.monotonic()
    assert _chain(running.address, tls_dir).cek_source == "kds"
    assert kds.requests == 2 and 1.0 <= time.monotonic() - started < 4


def test_retry_after_beyond_the_deadline_fails_fast_and_retries_are_bounded(
    start_platform: Any, tls_dir: Path, scripted_kds: Callable[..., Any]
) -> None:
    later = scripted_kds(lambda n: (429, {"Retry-After": "120"}, b""))
    running, _ = start_platform(kds_url=later.url, kds_timeout=3)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _chain(running.address, tls_dir)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.5 and later.requests == 1
    # A KDS that keeps failing is asked at most kds_attempts times.
    failing = scripted_kds(lambda n: (500, {}, b""))
    running, _ = start_platform(kds_url=failing.url, kds_timeout=5, kds_attempts=3)
    with pytest.raises(grpc.RpcError) as err:
        _chain(running.address, tls_dir)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE and failing.requests == 3


def test_cek_file_is_served_and_another_chips_cek_is_refused(
    start_platform: Any, tls_dir: Path, emulated_chip: EmulatedFirmware, emulated_root: Any, tmp_path: Path
) -> None:
    good = tmp_path / "cek.cert"
    good.write_bytes(emulated_chip.kds_cek())
    running, _ = start_platform(cek_file=good)
    reply = _chain(running.address, tls_dir)
    assert reply.cek_source == "file" and reply.platform.chain.cek_cert == good.read_bytes()

    other = EmulatedFirmware(tmp_path / "other-chip", root=emulated_root)
    wrong = tmp_path / "other-cek.cert"
    wrong.write_bytes(other.kds_cek())
    assert (
        SEVCertificate.from_bytes(wrong.read_bytes()).fingerprint()
        != SEVCertificate.from_bytes(good.read_bytes()).fingerprint()
    )
    running, _ = start_platform(cek_file=wrong)
    with pytest.raises(grpc.RpcError) as err:
        _chain(running.address, tls_dir)
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.PERMISSION_DENIED
    assert info.metadata["link"] == "ASK->CEK"
