"""The emulated SNP firmware's TCB life cycle (update, commit, SET_CONFIG) and its VCEK, the state shared by
processes and refused when damaged, and the emulated KDS's SNP routes."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from sevlaunch.cli import main as cli_main
from sevlaunch.firmware.devsev_snp import SnpConfig
from sevlaunch.firmware.emulator import STATE_FILE, EmulatedFirmware, EmulatedRoot, EmulatorStateError
from sevlaunch.firmware.emulator.snp_keys import SNP_ROOT_PEM
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.snp.appraisal import verify_attestation
from sevlaunch.snp.certs import load_crl, vek_extensions, verify_vek_chain
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.gctx import PAGE_SIZE, PageType
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.kds import vcek_cert_chain_url, vcek_crl_url, vcek_url
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.tcb import Product, TcbVersion

PRODUCT = Product.GENOA


@pytest.fixture
def chip(tmp_path: Path, emulated_root: EmulatedRoot, emulated_snp_root: EmulatedSnpRoot) -> EmulatedFirmware:
    return EmulatedFirmware(tmp_path / "chip", root=emulated_root, snp_root=emulated_snp_root)


def _running_guest(fw: EmulatedFirmware) -> int:
    handle = fw.snp_launch_start(0x30000)
    fw.snp_launch_update(handle, 0x1000, PageType.NORMAL, b"\x90" * PAGE_SIZE)
    fw.snp_launch_finish(handle)
    return handle


def _vcek(fw: EmulatedFirmware, tcb: TcbVersion | None = None) -> x509.Certificate:
    return x509.load_der_x509_certificate(fw.snp_vcek_der(tcb))


def _verify(fw: EmulatedFirmware, report: bytes, vcek: x509.Certificate) -> AttestationReport:
    return verify_attestation(
        report, vcek, PRODUCT, at=datetime.now(UTC), extra_roots=[fw.snp_trusted_root()]
    )[0]


def _bump(tcb: TcbVersion, **changes: int) -> TcbVersion:
    return TcbVersion(tcb.product, **{**tcb.components(), **changes})


def test_an_update_then_commit_changes_the_reported_tcb_and_the_vcek(chip: EmulatedFirmware) -> None:
    handle = _running_guest(chip)
    before = chip.snp_tcb_status()
    old_vcek = _vcek(chip)
    old_report = chip.snp_guest_report(handle, bytes(64))

    newer = _bump(before.current, snp=before.current.snp + 1, microcode=before.current.microcode + 2)
    chip.snp_firmware_update(newer)
    updated = chip.snp_tcb_status()
    assert (updated.current, updated.committed, updated.reported) == (
        newer,
        before.committed,
        before.reported,
    )
    assert updated.current_version[2] == before.current_version[2] + 1
    assert updated.committed_version == before.committed_version
    # Until the commit the reported TCB, so the VCEK, stay: reports still verify with the old VCEK.
    assert _vcek(chip).public_key() == old_vcek.public_key()
    pending = _verify(chip, chip.snp_guest_report(handle, bytes(64)), old_vcek)
    assert pending.current_tcb == newer.raw and pending.reported_tcb == before.reported.raw

    chip.snp_commit()
    committed = chip.snp_tcb_status()
    assert committed.current == committed.committed == committed.reported == newer
    assert committed.committed_version == committed.current_version
    new_vcek = _vcek(chip)
    assert new_vcek.public_key() != old_vcek.public_key()
    assert vek_extensions(new_vcek).tcb(PRODUCT) == newer
    new_report = chip.snp_guest_report(handle, bytes(64))
    with pytest.raises(VerificationFailed) as stale:
        _verify(chip, new_report, old_vcek)
    assert stale.value.reason is SnpReason.BAD_REPORT_SIGNATURE
    verified = _verify(chip, new_report, new_vcek)
    assert verified.reported_tcb == verified.committed_tcb == newer.raw
    assert verified.launch_tcb == before.current.raw  # the TCB the guest was launched under
    # The old report stays valid under the old VCEK, and is refused under the new one.
    _verify(chip, old_report, old_vcek)
    with pytest.raises(VerificationFailed):
        _verify(chip, old_report, new_vcek)


def test_rollback_below_the_committed_tcb_is_bad_svn(chip: EmulatedFirmware) -> None:
    current = chip.snp_tcb_status().current
    chip.snp_firmware_update(_bump(current, snp=current.snp + 2))
    # Still above the committed TCB: a rollback to the old firmware is allowed before the commit.
    chip.snp_firmware_update(current)
    chip.snp_firmware_update(_bump(current, snp=current.snp + 2), build=99)
    chip.snp_commit()
    with pytest.raises(FirmwareError) as err:
        chip.snp_firmware_update(current)
    assert err.value.status is StatusCode.BAD_SVN and err.value.command == "DOWNLOAD_FIRMWARE_EX"
    assert chip.snp_tcb_status().current.snp == current.snp + 2
    assert chip.snp_platform_status().build_id == 99
    turin = TcbVersion(Product.TURIN, bootloader=1, tee=1, snp=1, microcode=1, fmc=1)
    with pytest.raises(FirmwareError) as wrong:
        chip.snp_firmware_update(turin)
    assert wrong.value.status is StatusCode.INVALID_PARAM


def test_set_config_lowers_the_reported_tcb_and_masks(chip: EmulatedFirmware) -> None:
    handle = _running_guest(chip)
    current = chip.snp_tcb_status().current
    lower = _bump(current, microcode=current.microcode - 1)
    chip.snp_set_config(SnpConfig(reported_tcb=lower.raw, mask_chip_id=True))
    status = chip.snp_platform_status()
    assert status.reported_tcb == lower.raw and status.mask_chip_id and not status.mask_chip_key
    report = AttestationReport.from_bytes(chip.snp_guest_report(handle, bytes(64)))
    assert report.reported_tcb == lower.raw and report.chip_id == bytes(64)
    # The VCEK of the lower TCB signed it. (sevlaunch.snp's verify_report insists on the chip id matching
    # the VCEK's hwID, which a masked chip id cannot: the signature is checked on its own here.)
    vcek = verify_vek_chain(_vcek(chip), PRODUCT, at=datetime.now(UTC), extra_roots=[chip.snp_trusted_root()])
    assert vcek.tcb == lower
    report.verify_signature(vcek.public_key)

    chip.snp_set_config(SnpConfig(reported_tcb=current.raw, mask_chip_key=True))
    masked = AttestationReport.from_bytes(chip.snp_guest_report(handle, bytes(64)))
    assert masked.mask_chip_key and masked.signature_r == masked.signature_s == 0
    for bad in (
        SnpConfig(reported_tcb=_bump(current, tee=current.tee + 1).raw),  # above the current TCB
        SnpConfig(reported_tcb=current.raw | 0xFF << 16),  # a reserved byte of Genoa's layout
    ):
        with pytest.raises(FirmwareError) as err:
            chip.snp_set_config(bad)
        assert err.value.status is StatusCode.INVALID_PARAM
    raw = bytearray(SnpConfig(reported_tcb=current.raw).to_bytes())
    raw[20] = 1  # reserved
    with pytest.raises(FirmwareError) as reserved:
        chip.snp_set_config(bytes(raw))
    assert reserved.value.status is StatusCode.INVALID_PARAM
    assert chip.snp_platform_status().mask_chip_key  # refused commands changed nothing


def test_snp_init_once(chip: EmulatedFirmware) -> None:
    assert not chip.snp_platform_status().is_rmp_initialized
    chip.snp_init()
    with pytest.raises(FirmwareError) as err:
        chip.snp_init()
    assert err.value.status is StatusCode.INVALID_PLATFORM_STATE


# -- state shared across instances and processes, refused when damaged ----------------------------------


def test_two_instances_and_another_process_share_one_chip(chip: EmulatedFirmware) -> None:
    other = EmulatedFirmware(chip.state_dir, create=False)
    handle = other.snp_launch_start(0x30000)
    chip.snp_launch_update(handle, 0x2000, PageType.NORMAL, b"\x01" * PAGE_SIZE)
    other.snp_launch_update(handle, 0x3000, PageType.ZERO)
    assert chip.snp_launch_digest(handle) == other.snp_launch_digest(handle)
    other.snp_launch_finish(handle, host_data=b"h" * 32)
    current = chip.snp_tcb_status().current
    script = (
        "import sys; from sevlaunch.firmware.emulator import EmulatedFirmware; "
        "from sevlaunch.snp.tcb import TcbVersion, Product; "
        "fw = EmulatedFirmware(sys.argv[1], create=False); "
        f"fw.snp_firmware_update(TcbVersion(Product.GENOA, bootloader={current.bootloader}, tee=0, "
        f"snp={current.snp + 1}, microcode={current.microcode})); fw.snp_commit(); "
        "print(fw.snp_vcek_der().hex())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(chip.state_dir)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert bytes.fromhex(done.stdout.strip()) == chip.snp_vcek_der()  # issued once, kept on disk
    report = _verify(chip, other.snp_guest_report(handle, bytes(64)), _vcek(chip))
    assert report.reported_tcb == chip.snp_platform_status().reported_tcb
    assert report.host_data == b"h" * 32


def _damage(fw: EmulatedFirmware, change: object) -> None:
    path = fw.state_dir / STATE_FILE
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.update(snp=[]), id="snp-not-an-object"),
        pytest.param(lambda d: d["snp"].update(chip_secret="00"), id="short-chip-secret"),
        pytest.param(lambda d: d["snp"].update(reported_tcb=0xFF << 16), id="tcb-reserved-byte"),
        pytest.param(lambda d: d["snp"].update(current_tcb=-1), id="negative-tcb"),
        pytest.param(lambda d: d["snp"].update(mask_chip_id=1), id="mask-not-bool"),
        pytest.param(lambda d: d["snp"].update(current_version=[1, 55]), id="version-short"),
        pytest.param(lambda d: d["snp"]["guests"][0].update(gstate=7), id="unknown-gstate"),
        pytest.param(lambda d: d["snp"]["guests"][0].update(digest="zz"), id="digest-not-hex"),
        pytest.param(lambda d: d["snp"]["guests"].append(d["snp"]["guests"][0]), id="duplicate-guest"),
        pytest.param(lambda d: d["snp"].pop("vlek"), id="missing-key"),
        pytest.param(lambda d: d["snp"].update(cert_table="!!"), id="cert-table-not-base64"),
        pytest.param(lambda d: d["config"].update(product="rome"), id="unknown-product"),
    ],
)
def test_a_damaged_snp_state_is_a_typed_error(chip: EmulatedFirmware, change: object) -> None:
    _running_guest(chip)
    _damage(chip, change)
    for command in (
        chip.snp_platform_status,
        chip.platform_status,
        lambda: chip.snp_guest_report(1, bytes(64)),
    ):
        with pytest.raises(EmulatorStateError) as err:
            command()
        assert err.value.status is StatusCode.HWERROR_PLATFORM


def test_a_damaged_snp_root_is_a_typed_error(chip: EmulatedFirmware) -> None:
    chip.snp_platform_status()
    (chip.state_dir / SNP_ROOT_PEM).write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    with pytest.raises(EmulatorStateError):
        EmulatedFirmware(chip.state_dir, create=False).snp_vcek_der()


def test_a_chip_made_before_snp_gets_its_snp_state_on_first_use(chip: EmulatedFirmware) -> None:
    _damage(chip, lambda d: d.update(snp=None))
    status = EmulatedFirmware(chip.state_dir, create=False).snp_platform_status()
    assert status.current_tcb == status.reported_tcb and status.guest_count == 0


# -- the emulated KDS -------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", dict(exc.headers)


def test_the_emulated_kds_serves_vceks_by_hwid_and_tcb_the_chain_and_a_signed_crl(
    chip: EmulatedFirmware,
) -> None:
    tcb = chip.snp_tcb_status().reported
    hwid = chip.snp_hwid()
    with KDSServer([chip]) as kds:
        status, der, _ = _get(vcek_url(hwid, tcb, base_url=kds.url))
        assert status == 200 and der == chip.snp_vcek_der()
        older = _bump(tcb, snp=tcb.snp - 1)
        status, der_old, _ = _get(vcek_url(hwid, older, base_url=kds.url))
        assert status == 200 and vek_extensions(x509.load_der_x509_certificate(der_old)).tcb(PRODUCT) == older
        status, pem, _ = _get(vcek_cert_chain_url(PRODUCT, base_url=kds.url))
        chain = x509.load_pem_x509_certificates(pem)
        assert status == 200 and [c.subject.rfc4514_string().split(",")[-1] for c in chain] == [
            "CN=SEV-Genoa",
            "CN=ARK-Genoa",
        ]
        status, crl, _ = _get(vcek_crl_url(PRODUCT, base_url=kds.url))
        verify_vek_chain(
            x509.load_der_x509_certificate(der), PRODUCT, at=datetime.now(UTC), chain=chain,
            extra_roots=[chip.snp_trusted_root()], crls=[load_crl(crl)],
        )  # fmt: skip
        base = vcek_url(hwid, tcb, base_url=kds.url)
        for url, code in (
            (base.replace(hwid.hex(), "ab" * 64), 404),
            (base.replace("Genoa", "Milan"), 404),
            (base.replace("Genoa", "Rome"), 404),
            (base.replace("&ucodeSPL=", "&ucodeSPL=x"), 400),
            (base.replace("&ucodeSPL=", "&fmcSPL=1&ucodeSPL="), 400),
            (base.split("?")[0], 400),
        ):
            assert _get(url)[0] == code, url
        assert (kds.count("vcek"), kds.count("unknown"), kds.count("crl")) == (6, 2, 1)


def test_the_emulated_kds_rate_limits_when_told(chip: EmulatedFirmware) -> None:
    url = vcek_url(chip.snp_hwid(), chip.snp_tcb_status().reported)
    with KDSServer([chip]) as kds:
        url = url.replace("https://kdsintf.amd.com", kds.url)
        kds.throttle(2, retry_after=7)
        assert [(s, h.get("Retry-After")) for s, _, h in (_get(url), _get(url))] == [(429, "7"), (429, "7")]
        assert _get(url)[0] == 200
        kds.rate_limit(1, window=60, retry_after=3)
        first, second = _get(url), _get(url)
        assert (first[0], second[0], second[2].get("Retry-After")) == (200, 429, "3")
        kds.rate_limit(None)
        assert _get(url)[0] == 200
        assert kds.count("rate_limited") == 3


def test_emulator_cli_update_and_commit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "turin"
    assert cli_main(["emulator", "init", "--state", str(state), "--product", "turin"]) == 0
    fw = EmulatedFirmware(state, create=False)
    before = fw.snp_tcb_status()
    assert before.product is Product.TURIN and before.current.fmc is not None
    assert cli_main(["emulator", "update", "--state", str(state), "--tcb", "fmc=4,snp=9"]) == 0
    after = fw.snp_tcb_status()
    assert (after.current.fmc, after.current.snp, after.current.bootloader) == (
        4,
        9,
        before.current.bootloader,
    )
    assert after.reported == before.reported
    assert cli_main(["emulator", "commit", "--state", str(state)]) == 0
    assert fw.snp_tcb_status().reported == after.current
    assert "reported tcb:   fmc=4" in capsys.readouterr().out
    assert cli_main(["emulator", "update", "--state", str(state), "--tcb", "snp=1"]) != 0  # BAD_SVN
    assert cli_main(["emulator", "update", "--state", str(state), "--tcb", "nope=1"]) != 0


def test_a_pre_snp_chip_keeps_one_chip_secret_from_its_first_read(chip: EmulatedFirmware) -> None:
    _damage(chip, lambda d: d.update(snp=None))
    fresh = EmulatedFirmware(chip.state_dir, create=False)
    first = fresh.snp_tcb_status()  # a read-only command is the first to touch SNP
    assert EmulatedFirmware(chip.state_dir, create=False).snp_vcek_der() == fresh.snp_vcek_der()
    assert json.loads((chip.state_dir / STATE_FILE).read_text())["snp"]["reported_tcb"] == first.reported.raw
