"""platform_svc on an SEV-SNP host (the emulated chip behind it, its emulated KDS in front): SNP status,
the VCEK chain of the reported TCB (one KDS fetch for a storm of callers, Retry-After within the deadline,
the cached chain while the KDS is down, provisioned offline, the new chain after a commit), the
certificate table, the SNP admin RPCs and their roles."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sevlaunch.cli import main as cli_main
from sevlaunch.firmware.emulator import EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.rpc import error_info, secure_channel, secure_channel_sync
from sevlaunch.rpc.v1 import platform_pb2 as pb
from sevlaunch.rpc.v1 import platform_pb2_grpc
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.snp.appraisal import verify_attestation
from sevlaunch.snp.certtable import CertTable
from sevlaunch.snp.gctx import PAGE_SIZE, PageType
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.tcb import Product, TcbVersion


@pytest.fixture
def snp_chip(
    tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot
) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path / "snp-chip", root=emulated_root, snp_root=emulated_snp_root)


@pytest.fixture
def kds(snp_chip: EmulatedFirmware) -> Iterator[KDSServer]:
    server = KDSServer([snp_chip]).start()
    yield server
    server.stop()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _stub(address: str, tls_dir: Path, identity: str = "launcher") -> Any:
    return secure_channel_sync(address, tls_dir, identity)


def _vek_chain(address: str, tls_dir: Path, timeout: float = 20) -> pb.GetVekChainResponse:
    with _stub(address, tls_dir) as ch:
        reply: pb.GetVekChainResponse = platform_pb2_grpc.PlatformServiceStub(ch).GetVekChain(
            pb.GetVekChainRequest(), timeout=timeout
        )
        return reply


def _guest_report(fw: EmulatedFirmware) -> bytes:
    handle = fw.snp_launch_start(0x30000)
    fw.snp_launch_update(handle, 0x1000, PageType.NORMAL, b"\xcc" * PAGE_SIZE)
    fw.snp_launch_finish(handle)
    return fw.snp_guest_report(handle, b"n" * 64)


def _verify(fw: EmulatedFirmware, report: bytes, reply: pb.GetVekChainResponse) -> None:
    chain = [x509.load_der_x509_certificate(reply.ask_cert), x509.load_der_x509_certificate(reply.ark_cert)]
    verify_attestation(
        report,
        x509.load_der_x509_certificate(reply.vek_cert),
        Product.GENOA,
        at=datetime.now(UTC),
        chain=chain,
        extra_roots=[fw.snp_trusted_root()],
    )


def test_snp_status_shows_the_tcbs(start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir)
    with _stub(running.address, tls_dir, "client") as ch:
        st = platform_pb2_grpc.PlatformServiceStub(ch).GetSnpStatus(pb.GetSnpStatusRequest(), timeout=10)
    tcbs = snp_chip.snp_tcb_status()
    assert st.product == pb.SNP_PRODUCT_GENOA and (st.api_major, st.api_minor) == (1, 55)
    assert (st.current_tcb.raw, st.reported_tcb.raw, st.committed_tcb.raw) == (
        tcbs.current.raw,
        tcbs.reported.raw,
        tcbs.committed.raw,
    )
    assert st.reported_tcb.snp == tcbs.reported.snp and not st.reported_tcb.HasField("fmc")
    assert st.hwid == snp_chip.snp_hwid().hex()


def test_snp_status_json_names_are_the_same_on_the_platform_and_the_emulator(
    start_platform: Any,
    tls_dir: Path,
    snp_chip: EmulatedFirmware,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`platform snp-status --json` is the GetSnpStatusResponse in docs/CLI.md's style, and `emulator
    snp-status --json` on the chip the platform serves prints the same document."""
    import json

    from sevlaunch.firmware.devsev_snp import SnpPlatformState

    snp_chip.snp_firmware_update(TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=21, microcode=84))
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir)
    conn = ["--endpoint", running.address, "--tls-dir", str(tls_dir)]
    out_file = tmp_path / "snp-status.json"
    assert cli_main(["platform", "snp-status", *conn, "--json", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    platform = json.loads(out)
    assert json.loads(out_file.read_text()) == platform
    assert cli_main(["emulator", "snp-status", "--state", str(snp_chip.state_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == platform

    status, tcbs = snp_chip.snp_platform_status(), snp_chip.snp_tcb_status()
    assert tcbs.current != tcbs.committed  # updated, not committed: the three TCBs are told apart

    def tcb(t: TcbVersion) -> dict[str, int]:
        return {"bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode,
                "fmc": 0, "raw": t.raw}  # fmt: skip

    assert platform == {
        "product": "GENOA",
        "api_major": status.api_major,
        "api_minor": status.api_minor,
        "build_id": status.build_id,
        "initialized": status.state is SnpPlatformState.INIT,
        "current_tcb": tcb(tcbs.current),
        "reported_tcb": tcb(tcbs.reported),
        "committed_tcb": tcb(tcbs.committed),
        "mask_chip_id": False,
        "mask_chip_key": False,
        "vlek_loaded": False,
        "guest_count": 0,
        "hwid": snp_chip.snp_hwid().hex(),
    }
    assert isinstance(platform["current_tcb"]["raw"], int) and platform["current_tcb"]["raw"] > 1 << 32
    # Without --json, lines for people (no JSON), the TCBs named by component.
    assert cli_main(["platform", "snp-status", *conn]) == 0
    text = capsys.readouterr().out
    assert "product:        genoa" in text and f"snp=21 microcode=84 ({tcbs.current.raw:#018x})" in text
    assert cli_main(["emulator", "snp-status", "--state", str(snp_chip.state_dir)]) == 0
    assert f"current tcb:    {tcbs.current}" in capsys.readouterr().out


def test_200_concurrent_vcek_requests_cost_one_kds_fetch(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer, tmp_path: Path
) -> None:
    running, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url, vcek_cache_dir=tmp_path / "vceks"
    )

    async def storm() -> list[pb.GetVekChainResponse]:
        async with secure_channel(running.address, tls_dir, "launcher") as ch:
            stub = platform_pb2_grpc.PlatformServiceStub(ch)
            return list(
                await asyncio.gather(
                    *(stub.GetVekChain(pb.GetVekChainRequest(), timeout=60) for _ in range(200))
                )
            )

    replies = asyncio.run(storm())
    assert kds.count("vcek") == 1 and kds.count("cert_chain") == 1
    assert len({r.vek_cert for r in replies}) == 1 and {r.source for r in replies} == {"kds"}
    assert replies[0].vek_cert == snp_chip.snp_vcek_der()
    assert replies[0].tcb.raw == snp_chip.snp_platform_status().reported_tcb
    _verify(snp_chip, _guest_report(snp_chip), replies[0])
    # Cached on disk per chip and TCB.
    cached = tmp_path / "vceks" / "Genoa" / replies[0].hwid / f"{replies[0].tcb.raw:016x}.der"
    assert cached.read_bytes() == replies[0].vek_cert


def test_after_an_update_and_commit_the_platform_serves_the_new_chain_after_one_fetch(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer
) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url)
    old = _vek_chain(running.address, tls_dir)
    current = snp_chip.snp_tcb_status().current
    newer = TcbVersion(Product.GENOA, **{**current.components(), "snp": current.snp + 1})
    snp_chip.snp_firmware_update(newer)
    # Before the commit nothing changes for the platform: the reported TCB is the same.
    assert _vek_chain(running.address, tls_dir).vek_cert == old.vek_cert and kds.count("vcek") == 1
    with _stub(running.address, tls_dir, "platform-admin") as ch:
        committed = platform_pb2_grpc.PlatformServiceStub(ch).CommitSnp(pb.CommitSnpRequest(), timeout=10)
    assert committed.status.reported_tcb.raw == newer.raw
    new = _vek_chain(running.address, tls_dir)
    again = _vek_chain(running.address, tls_dir)
    assert kds.count("vcek") == 2 and new.vek_cert == again.vek_cert != old.vek_cert
    assert new.tcb.raw == newer.raw
    report = _guest_report(snp_chip)
    _verify(snp_chip, report, new)
    with pytest.raises(VerificationFailed):
        _verify(snp_chip, report, old)


def test_a_429_is_waited_out_within_the_calls_deadline(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer
) -> None:
    running, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url, kds_timeout=10
    )
    kds.throttle(1, retry_after=1)
    started = time.monotonic()
    reply = _vek_chain(running.address, tls_dir, timeout=6)
    elapsed = time.monotonic() - started
    assert reply.source == "kds" and kds.count("rate_limited") == 1 and kds.count("vcek") == 1
    assert 1.0 <= elapsed < 5, elapsed


def test_a_retry_after_beyond_the_calls_deadline_fails_fast(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer
) -> None:
    running, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url, kds_timeout=10
    )
    kds.throttle(5, retry_after=30)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _vek_chain(running.address, tls_dir, timeout=3)
    info = error_info(err.value)
    assert info.code is grpc.StatusCode.UNAVAILABLE and info.reason == "kds_unavailable"
    assert time.monotonic() - started < 2.5 and kds.count("rate_limited") == 1


def test_with_the_kds_down_the_cached_chain_keeps_serving(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer, tmp_path: Path
) -> None:
    cache = tmp_path / "vceks"
    running, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url, vcek_cache_dir=cache
    )
    first = _vek_chain(running.address, tls_dir)
    kds.stop()
    assert _vek_chain(running.address, tls_dir).vek_cert == first.vek_cert  # the same process: memory
    # A restarted platform with the KDS unreachable serves the chain from its disk cache.
    again, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=_closed_port_url(), vcek_cache_dir=cache,
        kds_timeout=1,
    )  # fmt: skip
    cached = _vek_chain(again.address, tls_dir)
    assert cached.source == "kds-cache" and cached.vek_cert == first.vek_cert
    _verify(snp_chip, _guest_report(snp_chip), cached)
    # Without a cache, a KDS that is down is UNAVAILABLE within the deadline.
    bare, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=_closed_port_url(), kds_timeout=1
    )
    with pytest.raises(grpc.RpcError) as err:
        _vek_chain(bare.address, tls_dir)
    assert error_info(err.value).reason == "kds_unavailable"


def test_an_offline_platform_serves_a_provisioned_chain(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer, tmp_path: Path
) -> None:
    online, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url)
    out = tmp_path / "provisioned"
    common = ["--endpoint", online.address, "--tls-dir", str(tls_dir)]
    assert cli_main(["platform", "vcek", *common, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"vcek.pem", "vcek.der", "ask.pem", "ark.pem"}
    offline, _ = start_platform(
        firmware=snp_chip,
        emulator=snp_chip.state_dir,
        kds_url=_closed_port_url(),
        vcek_dir=out,
        kds_timeout=1,
    )
    reply = _vek_chain(offline.address, tls_dir)
    assert reply.source == "file" and reply.vek_cert == (out / "vcek.der").read_bytes()
    # A provisioned VCEK of another TCB is passed over, not served.
    current = snp_chip.snp_tcb_status().current
    snp_chip.snp_firmware_update(
        TcbVersion(Product.GENOA, **{**current.components(), "tee": current.tee + 1})
    )
    snp_chip.snp_commit()
    with pytest.raises(grpc.RpcError) as err:
        _vek_chain(offline.address, tls_dir)
    assert error_info(err.value).reason == "kds_unavailable"


def test_the_certificate_table_for_extended_reports(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer, tmp_path: Path
) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url)
    with _stub(running.address, tls_dir, "client") as ch:
        with pytest.raises(grpc.RpcError) as none:
            platform_pb2_grpc.PlatformServiceStub(ch).GetSnpCertTable(pb.GetSnpCertTableRequest(), timeout=10)
        assert error_info(none.value).reason == "no_cert_table"
        with pytest.raises(grpc.RpcError) as denied:
            platform_pb2_grpc.PlatformServiceStub(ch).InstallSnpCertTable(
                pb.InstallSnpCertTableRequest(), timeout=10
            )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    common = ["--endpoint", running.address, "--tls-dir", str(tls_dir)]
    admin = [*common, "--identity", "platform-admin"]
    assert cli_main(["platform", "cert-table", *admin, "--install"]) == 0
    chain = _vek_chain(running.address, tls_dir)
    handle = snp_chip.snp_launch_start(0x30000)
    snp_chip.snp_launch_finish(handle)
    guest = snp_chip.snp_ext_guest_report(handle, bytes(64))
    assert guest.cert_table is not None
    table = CertTable.from_bytes(guest.cert_table)
    assert (table.vcek, table.ask, table.ark) == (chain.vek_cert, chain.ask_cert, chain.ark_cert)
    exported = tmp_path / "table.bin"
    assert cli_main(["platform", "cert-table", *common, "--out", str(exported)]) == 0
    assert exported.read_bytes() == guest.cert_table

    with _stub(running.address, tls_dir, "platform-admin") as ch:
        stub = platform_pb2_grpc.PlatformServiceStub(ch)
        with pytest.raises(grpc.RpcError) as bad:
            stub.InstallSnpCertTable(pb.InstallSnpCertTableRequest(cert_table=b"\x01" * 40), timeout=10)
        assert error_info(bad.value).reason == "bad_cert_table"
        current = snp_chip.snp_tcb_status().current
        snp_chip.snp_firmware_update(
            TcbVersion(Product.GENOA, **{**current.components(), "snp": current.snp + 3})
        )
        stub.CommitSnp(pb.CommitSnpRequest(), timeout=10)
        stale = stub.GetSnpCertTable(pb.GetSnpCertTableRequest(), timeout=10)
        assert stale.cert_table == guest.cert_table and not stale.matches_reported_tcb
        with pytest.raises(grpc.RpcError) as mismatch:
            stub.InstallSnpCertTable(pb.InstallSnpCertTableRequest(cert_table=stale.cert_table), timeout=10)
        assert error_info(mismatch.value).reason == "cert_table_mismatch"
        fresh = stub.InstallSnpCertTable(pb.InstallSnpCertTableRequest(), timeout=20).cert_table
        assert stub.GetSnpCertTable(pb.GetSnpCertTableRequest(), timeout=10).matches_reported_tcb
        assert CertTable.from_bytes(fresh).vcek == snp_chip.snp_vcek_der()


def test_set_config_and_roles(start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir)  # VCEKs from the emulator
    current = snp_chip.snp_tcb_status().current
    lower = TcbVersion(Product.GENOA, **{**current.components(), "microcode": current.microcode - 1})
    with _stub(running.address, tls_dir, "launcher") as ch:
        with pytest.raises(grpc.RpcError) as denied:
            platform_pb2_grpc.PlatformServiceStub(ch).CommitSnp(pb.CommitSnpRequest(), timeout=10)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with _stub(running.address, tls_dir, "nobody") as ch:
        with pytest.raises(grpc.RpcError) as nobody:
            platform_pb2_grpc.PlatformServiceStub(ch).GetSnpStatus(pb.GetSnpStatusRequest(), timeout=10)
        assert nobody.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with _stub(running.address, tls_dir, "platform-admin") as ch:
        stub = platform_pb2_grpc.PlatformServiceStub(ch)
        with pytest.raises(grpc.RpcError) as bad:
            stub.SetSnpConfig(pb.SetSnpConfigRequest(reported_tcb=current.raw | 0xFF << 16), timeout=10)
        assert error_info(bad.value).reason == "bad_tcb"
        with pytest.raises(grpc.RpcError) as above:
            too_high = TcbVersion(Product.GENOA, **{**current.components(), "tee": current.tee + 1})
            stub.SetSnpConfig(pb.SetSnpConfigRequest(reported_tcb=too_high.raw), timeout=10)
        assert error_info(above.value).metadata["firmware_status"] == "INVALID_PARAM"
        set_reply = stub.SetSnpConfig(pb.SetSnpConfigRequest(reported_tcb=lower.raw), timeout=10)
        assert set_reply.status.reported_tcb.raw == lower.raw
    reply = _vek_chain(running.address, tls_dir)
    assert reply.tcb.raw == lower.raw and reply.source == "emulator"
    _verify(snp_chip, _guest_report(snp_chip), reply)
    assert cli_main(["platform", "snp-status", "--endpoint", running.address, "--tls-dir", str(tls_dir)]) == 0


def test_a_loaded_and_provisioned_vlek_is_served(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, tmp_path: Path
) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir)
    with _stub(running.address, tls_dir) as ch:
        with pytest.raises(grpc.RpcError) as none:
            platform_pb2_grpc.PlatformServiceStub(ch).GetVekChain(
                pb.GetVekChainRequest(kind=pb.VEK_KIND_VLEK), timeout=10
            )
    assert error_info(none.value).reason == "no_vlek"
    snp_chip.snp_vlek_load(snp_chip.snp_vlek_hashstick("example-cloud"))
    provisioned = tmp_path / "vlek"
    provisioned.mkdir()
    (provisioned / "vlek.der").write_bytes(snp_chip.snp_vlek_der())
    asvk, ark = x509.load_pem_x509_certificates(snp_chip.snp_cert_chain_pem(vlek=True))
    (provisioned / "asvk.pem").write_bytes(asvk.public_bytes(serialization.Encoding.PEM))
    (provisioned / "ark.pem").write_bytes(ark.public_bytes(serialization.Encoding.PEM))
    with_vlek, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir, vcek_dir=provisioned)
    reply = _vek_chain(with_vlek.address, tls_dir)  # AUTO: the VLEK, since one is loaded and provisioned
    assert reply.kind == pb.VEK_KIND_VLEK and reply.source == "file"
    report = _guest_report(snp_chip)  # KEY_SEL 0: the firmware signs with the loaded VLEK
    _verify(snp_chip, report, reply)
    with _stub(with_vlek.address, tls_dir) as ch:
        vcek = platform_pb2_grpc.PlatformServiceStub(ch).GetVekChain(
            pb.GetVekChainRequest(kind=pb.VEK_KIND_VCEK), timeout=10
        )
    assert vcek.kind == pb.VEK_KIND_VCEK and vcek.source == "emulator"


def test_a_caller_whose_deadline_ends_before_the_retry_after_leaves_the_fetch_to_finish(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer
) -> None:
    running, _ = start_platform(
        firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url, kds_timeout=10
    )
    kds.throttle(1, retry_after=2)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _vek_chain(running.address, tls_dir, timeout=1)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 1.8
    # The shared fetch waits out the Retry-After and asks for the VCEK with no caller waiting.
    deadline = time.monotonic() + 10
    while kds.count("vcek") == 0:
        assert time.monotonic() < deadline, "the fetch did not go on without its caller"
        time.sleep(0.02)
    reply = _vek_chain(running.address, tls_dir, timeout=5)
    assert reply.source == "kds" and kds.count("vcek") == 1 and kds.count("rate_limited") == 1
