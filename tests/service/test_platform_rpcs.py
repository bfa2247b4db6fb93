"""platform_svc through a real gRPC server on port 0 with mTLS, over the emulated firmware."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.cli import main as cli_main
from sevlaunch.rpc import error_info, secure_channel, secure_channel_sync
from sevlaunch.rpc.v1 import platform_pb2 as pb
from sevlaunch.rpc.v1 import platform_pb2_grpc
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, SEVCertificate, Usage
from sevlaunch.sev.chain import CertificateChain, load_roots_file, verify_chain
from sevlaunch.sev.session import create_session


def _stub(address: str, tls_dir: Path, identity: str = "client") -> tuple[grpc.Channel, Any]:
    ch = secure_channel_sync(address, tls_dir, identity)
    return ch, platform_pb2_grpc.PlatformServiceStub(ch)


def _full(reply: pb.GetCertificateChainResponse) -> bytes:
    c = reply.platform.chain
    return c.pdh_cert + c.pek_cert + c.oca_cert + c.cek_cert + c.ask_cert + c.ark_cert


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_read_rpcs_return_the_chip_status_id_and_a_verifying_chain(
    start_platform: Any, tls_dir: Path, emulated_chip: Any
) -> None:
    running, _ = start_platform()
    ch, stub = _stub(running.address, tls_dir, "launcher")
    with ch:
        st = stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10)
        cfg = emulated_chip.config
        assert (st.firmware.api_major, st.firmware.api_minor, st.firmware.build_id) == (
            cfg.api_major,
            cfg.api_minor,
            cfg.build,
        )
        assert st.guest_count == 0 and st.es_supported == cfg.es_enabled
        assert (
            stub.GetIdentifier(pb.GetIdentifierRequest(), timeout=10).chip_id == emulated_chip.chip_id_hex()
        )
        reply = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10)
    p = reply.platform
    assert p.chip_id == emulated_chip.chip_id_hex()
    assert p.generation == cfg.generation and reply.cek_source == "emulator"
    assert p.firmware.api_minor == cfg.api_minor
    # The emulated KDS re-signs the CEK on each request (RSA-PSS, like AMD's): same key, other bytes.
    expected = CertificateChain.from_full_bytes(emulated_chip.full_chain())
    got = CertificateChain.from_full_bytes(_full(reply))
    assert (got.pdh, got.pek, got.oca, got.ask, got.ark) == (
        expected.pdh,
        expected.pek,
        expected.oca,
        expected.ask,
        expected.ark,
    )
    assert got.cek.fingerprint() == expected.cek.fingerprint()
    chain = CertificateChain.from_full_bytes(_full(reply))
    verified = verify_chain(chain, extra_roots=[load_roots_file(emulated_chip.ask_ark(), "emulated")])
    assert verified.chain == chain
    # Without the emulated root explicitly trusted, the chain proves nothing.
    with pytest.raises(Exception, match=r"root|pinned"):
        verify_chain(chain)


def test_cli_chain_out_verifies_with_sevlaunch_verify(
    start_platform: Any, tls_dir: Path, emulated_chip: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running, _ = start_platform()
    out = tmp_path / "chain.cert"
    common = ["--endpoint", running.address, "--tls-dir", str(tls_dir)]
    assert cli_main(["platform", "chain", *common, "--out", str(out)]) == 0
    assert len(out.read_bytes()) == 4 * CERT_SIZE + len(emulated_chip.ask_ark())
    assert cli_main(["platform", "id", *common]) == 0
    assert cli_main(["platform", "status", *common, "--identity", "launcher"]) == 0
    printed = capsys.readouterr().out
    assert emulated_chip.chip_id_hex() in printed and '"state"' in printed
    ca = emulated_chip.state_dir / "ask_ark.cert"
    assert cli_main(["verify", "--chain", str(out), "--ca", str(ca)]) == 0
    # A caller without a role gets a refusal, printed as a one-line error (exit status 1).
    assert cli_main(["platform", "id", *common, "--identity", "owner"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    # The CLI checks whom it reached: a platform is not accepted where an owner is expected (the
    # handshake fails; every dev server certificate is valid for localhost, only the identity differs).
    assert cli_main(["platform", "id", *common, "--server-identity", "owner", "--timeout", "3"]) == 1
    assert "this endpoint is not the owner service; check the address, or see --server-identity" in (
        capsys.readouterr().err
    )
    assert cli_main(["platform", "id", *common, "--server-identity", "bad name!"]) == 1
    assert "neither an identity name nor a DNS name" in capsys.readouterr().err


def test_roles_and_handshake_failures(start_platform: Any, tls_dir: Path, foreign_tls_dir: Path) -> None:
    running, _ = start_platform()
    for identity, method, request in (
        ("owner", "GetCertificateChain", pb.GetCertificateChainRequest()),
        ("nobody", "GetIdentifier", pb.GetIdentifierRequest()),
        ("launcher", "RotatePDH", pb.RotatePDHRequest()),
        ("client", "FactoryReset", pb.FactoryResetRequest(confirm=True)),
        ("owner-admin", "GeneratePEK", pb.GeneratePEKRequest()),
    ):
        ch, stub = _stub(running.address, tls_dir, identity)
        with ch, pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(request, timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, (identity, method)
        assert error_info(err.value).reason == "caller_not_authorized"
    # platform-admin may read too.
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        stub.GetIdentifier(pb.GetIdentifierRequest(), timeout=10)
    no_cert = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
    foreign = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        private_key=(foreign_tls_dir / "platform-admin.key").read_bytes(),
        certificate_chain=(foreign_tls_dir / "platform-admin.pem").read_bytes(),
    )
    for creds in (no_cert, foreign):
        with grpc.secure_channel(running.address, creds) as raw, pytest.raises(grpc.RpcError) as err:
            platform_pb2_grpc.PlatformServiceStub(raw).GetIdentifier(pb.GetIdentifierRequest(), timeout=10)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_admin_rpcs_rotate_generate_csr_import_reset(
    start_platform: Any, tls_dir: Path, emulated_chip: Any
) -> None:
    running, _ = start_platform()
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        first = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        new_pdh = stub.RotatePDH(pb.RotatePDHRequest(), timeout=10).pdh_cert
        assert new_pdh != first.pdh_cert and len(new_pdh) == CERT_SIZE
        # The cached chain was dropped: the next call shows the new PDH, same PEK.
        second = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        assert second.pdh_cert == new_pdh and second.pek_cert == first.pek_cert

        stub.GeneratePEK(pb.GeneratePEKRequest(), timeout=10)
        third = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        assert third.pek_cert != second.pek_cert

        # An owner's OCA signs the PEK CSR; the firmware takes it and the platform becomes owned.
        csr = SEVCertificate.from_bytes(stub.GetPEKCSR(pb.GetPEKCSRRequest(), timeout=10).pek_csr)
        assert csr.usage is Usage.PEK
        oca_key = ec.generate_private_key(ec.SECP384R1())
        oca = SEVCertificate.for_ec_key(
            usage=Usage.OCA,
            algorithm=Algorithm.ECDSA_SHA256,
            public_key=oca_key.public_key(),
            api_major=csr.api_major,
            api_minor=csr.api_minor,
        ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
        pek = csr.sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
        stub.ImportPEKCertificate(
            pb.ImportPEKCertificateRequest(pek_cert=pek.to_bytes(), oca_cert=oca.to_bytes()), timeout=10
        )
        assert stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10).owned_externally
        owned = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        assert owned.oca_cert == oca.to_bytes()

        stub.FactoryReset(pb.FactoryResetRequest(confirm=True), timeout=10)
        st = stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10)
        assert not st.owned_externally
        after = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        assert after.oca_cert != oca.to_bytes() and after.cek_cert == first.cek_cert


def test_bad_requests_are_invalid_argument_and_change_nothing(start_platform: Any, tls_dir: Path) -> None:
    running, _ = start_platform()
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        before = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10)
        status_before = stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10)
        csr = stub.GetPEKCSR(pb.GetPEKCSRRequest(), timeout=10).pek_csr
        bad = [
            (
                "ImportPEKCertificate",
                pb.ImportPEKCertificateRequest(pek_cert=b"\x01" * 12, oca_cert=b""),
                "bad_length",
            ),
            # Both well-formed, but the OCA slot holds a PEK.
            (
                "ImportPEKCertificate",
                pb.ImportPEKCertificateRequest(pek_cert=csr, oca_cert=csr),
                "wrong_usage",
            ),
            (
                "ImportPEKCertificate",
                pb.ImportPEKCertificateRequest(pek_cert=b"\xff" * CERT_SIZE, oca_cert=csr),
                None,
            ),
            ("FactoryReset", pb.FactoryResetRequest(confirm=False), "confirmation_required"),
        ]
        for method, request, reason in bad:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=10)
            info = error_info(err.value)
            assert info.code is grpc.StatusCode.INVALID_ARGUMENT, (method, info)
            if reason:
                assert info.reason == reason
        after = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10)
        assert _full(after) == _full(before)
        assert stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10) == status_before


def test_admin_commands_refused_while_a_guest_runs(
    start_platform: Any, tls_dir: Path, emulated_chip: Any
) -> None:
    running, _ = start_platform()
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        chain = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        session = create_session(SEVCertificate.from_bytes(chain.pdh_cert), 0)
        emulated_chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), 0)
        assert stub.GetPlatformStatus(pb.GetPlatformStatusRequest(), timeout=10).guest_count == 1
        for method, request in (
            ("FactoryReset", pb.FactoryResetRequest(confirm=True)),
            ("RotatePDH", pb.RotatePDHRequest()),
            ("GeneratePEK", pb.GeneratePEKRequest()),
        ):
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=10)
            info = error_info(err.value)
            assert info.code is grpc.StatusCode.FAILED_PRECONDITION, method
            assert info.metadata["firmware_status"] == "INVALID_PLATFORM_STATE"
            assert info.metadata["firmware_status_code"] == "1"
        # Nothing changed: the running guest's PDH is still the one served.
        again = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
        assert again.pdh_cert == chain.pdh_cert


class SlowExport:
    """The emulator with a slow PDH_CERT_EXPORT, so that concurrent callers really overlap it."""

    def __init__(self, emulator: Any, delay: float) -> None:
        self.emulator = emulator
        self.delay = delay
        self.exports = 0
        self._lock = threading.Lock()

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        with self._lock:
            self.exports += 1
        time.sleep(self.delay)
        result: tuple[bytes, bytes] = self.emulator.pdh_cert_export()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.emulator, name)


def test_concurrent_chain_requests_cost_one_firmware_export(
    start_platform: Any, tls_dir: Path, emulated_chip: Any
) -> None:
    slow = SlowExport(emulated_chip, delay=0.3)
    running, _ = start_platform(firmware=slow)

    async def storm() -> list[bytes]:
        async with secure_channel(running.address, tls_dir, "launcher") as ch:
            stub = platform_pb2_grpc.PlatformServiceStub(ch)
            await ch.channel_ready()
            replies = await asyncio.gather(
                *(stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=30) for _ in range(200))
            )
            return [_full(r) for r in replies]

    chains = asyncio.run(storm())
    assert len(chains) == 200 and len(set(chains)) == 1
    assert slow.exports == 1
    samples = _samples(running.metrics_url)
    assert (
        samples[
            ("sevlaunch_firmware_commands_total", (("command", "PDH_CERT_EXPORT"), ("status", "SUCCESS")))
        ]
        == 1
    )
    assert samples[("sevlaunch_chain_cache_misses_total", ())] == 1
    assert samples[("sevlaunch_chain_cache_hits_total", ())] == 199
    labels = (
        ("grpc_code", "OK"),
        ("grpc_method", "GetCertificateChain"),
        ("grpc_service", "sevlaunch.v1.PlatformService"),
        ("grpc_type", "unary"),
    )
    assert samples[("grpc_server_handled_total", labels)] == 200


def test_metrics_after_a_session_show_the_right_counts(start_platform: Any, tls_dir: Path) -> None:
    running, _ = start_platform()
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        for _ in range(3):
            stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10)
        stub.RotatePDH(pb.RotatePDHRequest(), timeout=10)
        stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.FactoryReset(pb.FactoryResetRequest(confirm=False), timeout=10)
    ch, stub = _stub(running.address, tls_dir, "owner")
    with ch, pytest.raises(grpc.RpcError):
        stub.GetIdentifier(pb.GetIdentifierRequest(), timeout=10)
    s = _samples(running.metrics_url)
    service = "sevlaunch.v1.PlatformService"

    def rpc(method: str, code: str) -> float:
        labels = (
            ("grpc_code", code),
            ("grpc_method", method),
            ("grpc_service", service),
            ("grpc_type", "unary"),
        )
        return s[("grpc_server_handled_total", labels)]

    assert rpc("GetCertificateChain", "OK") == 4
    assert rpc("RotatePDH", "OK") == 1
    assert rpc("FactoryReset", "INVALID_ARGUMENT") == 1
    assert rpc("GetIdentifier", "PERMISSION_DENIED") == 1
    latency = (("grpc_method", "GetCertificateChain"), ("grpc_service", service), ("grpc_type", "unary"))
    assert s[("grpc_server_handling_seconds_count", latency)] == 4
    # Two exports for the chain (before and after the rotation) and one by RotatePDH for its reply.
    fw = ("sevlaunch_firmware_commands_total", (("command", "PDH_CERT_EXPORT"), ("status", "SUCCESS")))
    assert s[fw] == 3
    assert s[("sevlaunch_firmware_commands_total", (("command", "PDH_GEN"), ("status", "SUCCESS")))] == 1
    assert s[("sevlaunch_firmware_command_duration_seconds_count", (("command", "PDH_GEN"),))] == 1
    assert s[("sevlaunch_chain_cache_misses_total", ())] == 2
    assert s[("sevlaunch_chain_cache_hits_total", ())] == 2
    # The FactoryReset refusal never reached the firmware.
    assert (
        "sevlaunch_firmware_commands_total",
        (("command", "FACTORY_RESET"), ("status", "SUCCESS")),
    ) not in s


def test_asid_gauges_follow_the_chips_guests(start_platform: Any, tls_dir: Path, emulated_chip: Any) -> None:
    """The per-host ASID pools of SevlaunchAsidsNearExhaustion, from the emulated chip the service runs
    on (16 SEV and 16 SEV-ES ASIDs by default), read on each scrape."""
    running, _ = start_platform()

    def asids() -> dict[tuple[str, str], float]:
        s = _samples(running.metrics_url)
        return {
            (name.removeprefix("sevlaunch_platform_asids_"), dict(labels)["kind"]): value
            for (name, labels), value in s.items()
            if name.startswith("sevlaunch_platform_asids_")
        }

    assert asids() == {
        ("capacity", "sev"): 16,
        ("capacity", "sev_es"): 16,
        ("in_use", "sev"): 0,
        ("in_use", "sev_es"): 0,
    }
    ch, stub = _stub(running.address, tls_dir, "platform-admin")
    with ch:
        chain = stub.GetCertificateChain(pb.GetCertificateChainRequest(), timeout=10).platform.chain
    pdh = SEVCertificate.from_bytes(chain.pdh_cert)
    for policy in (0, 0, 0x0007):  # two SEV guests, one SEV-ES guest
        session = create_session(pdh, policy)
        emulated_chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), policy)
    assert asids() == {
        ("capacity", "sev"): 16,
        ("capacity", "sev_es"): 16,
        ("in_use", "sev"): 2,
        ("in_use", "sev_es"): 1,
    }
