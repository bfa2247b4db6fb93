"""The launcher's platform port for SEV-SNP against a real platform_svc (an emulated SNP chip behind it,
its emulated KDS in front): `snp_evidence` is the platform's SNP status and the VCEK chain of the
reported TCB, carried as sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from launcher_svc.adapters.grpc_clients import PlatformClient
from launcher_svc.core.ports import SnpPlatformEvidence
from sevlaunch.firmware.emulator import EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.snp.issue import EmulatedSnpRoot


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


def _public(der: bytes) -> bytes:
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_snp_evidence_is_the_platforms_status_and_vcek_chain(
    start_platform: Any, tls_dir: Path, snp_chip: EmulatedFirmware, kds: KDSServer
) -> None:
    running, _ = start_platform(firmware=snp_chip, emulator=snp_chip.state_dir, kds_url=kds.url)

    async def fetch() -> SnpPlatformEvidence:
        client = PlatformClient(running.address, tls_dir)
        try:
            return await client.snp_evidence()
        finally:
            await client.close()

    evidence = asyncio.run(fetch())
    tcbs = snp_chip.snp_tcb_status()
    st = evidence.status
    assert (st.product, st.api_major, st.api_minor) == ("Genoa", 1, 55)
    assert (st.current_tcb, st.reported_tcb, st.committed_tcb) == (
        tcbs.current.raw,
        tcbs.reported.raw,
        tcbs.committed.raw,
    )
    assert st.hwid == snp_chip.snp_hwid().hex() and not st.mask_chip_id
    assert evidence.vek_type == "vcek" and evidence.vek_tcb == tcbs.reported.raw
    assert _public(evidence.vek_der) == _public(snp_chip.snp_vcek_der())
    ask = x509.load_der_x509_certificate(evidence.ask_der)
    ark = x509.load_der_x509_certificate(evidence.ark_der)
    assert (
        x509.load_der_x509_certificate(evidence.vek_der).issuer == ask.subject and ask.issuer == ark.subject
    )
