"""EmulatedFirmware: the platform state machine, key changes, guest launches and their status codes.

The session's emulated AMD root (tests/conftest.py); every test gets its own chip in its own directory.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware import (
    ChipConfig,
    EmulatedFirmware,
    EmulatedRoot,
    FirmwareError,
    LaunchFirmware,
    PlatformState,
    StatusCode,
)
from sevlaunch.sev.amd_cert import parse_ask_ark
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.sev.measurement import LaunchMeasurement, compute_measure, verify_measurement
from sevlaunch.sev.policy import GuestPolicy, PolicyFlags
from sevlaunch.sev.report import AttestationReport
from sevlaunch.sev.secret import SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import LaunchSession, SessionBlob, TransportKeys, create_session

SEV_POLICY = 0x0003
ES_POLICY = 0x0007
SECRET_GPA = 0x80_0000


@pytest.fixture
def make_chip(emulated_root: EmulatedRoot, tmp_path: Path) -> Callable[..., EmulatedFirmware]:
    count = 0

    def make(**config: object) -> EmulatedFirmware:
        nonlocal count
        count += 1
        return EmulatedFirmware(tmp_path / f"chip{count}", config=ChipConfig(**config), root=emulated_root)  # type: ignore[arg-type]

    return make


@pytest.fixture
def chip(make_chip: Callable[..., EmulatedFirmware]) -> EmulatedFirmware:
    return make_chip()


def certs(fw: EmulatedFirmware) -> dict[str, SEVCertificate]:
    pdh, chain = fw.pdh_cert_export()
    parts = [chain[i * CERT_SIZE : (i + 1) * CERT_SIZE] for i in range(3)]
    return {
        "pdh": SEVCertificate.from_bytes(pdh),
        "pek": SEVCertificate.from_bytes(parts[0]),
        "oca": SEVCertificate.from_bytes(parts[1]),
        "cek": SEVCertificate.from_bytes(parts[2]),
    }


def session_for(fw: EmulatedFirmware, policy: int = SEV_POLICY, **kwargs: object) -> LaunchSession:
    return create_session(certs(fw)["pdh"], policy, **kwargs)  # type: ignore[arg-type]


def start(fw: EmulatedFirmware, policy: int = SEV_POLICY) -> tuple[int, LaunchSession]:
    session = session_for(fw, policy)
    return fw.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), policy), session


def expect(status: StatusCode, call: Callable[[], object]) -> FirmwareError:
    with pytest.raises(FirmwareError) as exc:
        call()
    assert exc.value.status is status, str(exc.value)
    return exc.value


def measured(fw: EmulatedFirmware, data: bytes = bytes(range(256)) * 4) -> tuple[int, LaunchSession, bytes]:
    handle, session = start(fw)
    fw.launch_update_data(handle, 0x10_0000, data)
    return handle, session, fw.launch_measure(handle)


# -- the chip and its keys -----------------------------------------------------------------------------


def test_fresh_chip(chip: EmulatedFirmware, emulated_root: EmulatedRoot) -> None:
    assert isinstance(chip, LaunchFirmware)
    status = chip.platform_status()
    assert status.state is PlatformState.UNINIT
    assert (status.api_major, status.api_minor, status.build) == (0, 24, 15)
    assert status.es_enabled and not status.owned_externally and status.guest_count == 0
    assert chip.config.generation == "emulated"
    assert len(chip.get_id()) == 64
    assert chip.ask_ark() == emulated_root.ask_ark()
    assert (chip.state_dir / "ask_ark.cert").read_bytes() == emulated_root.ask_ark()


def test_key_files_are_private(chip: EmulatedFirmware) -> None:
    chip.pdh_cert_export()  # INIT writes OCA, PEK and PDH keys into the state
    for name in ("ark.key", "ask.key", "cek.key", "state.json"):
        mode = stat.S_IMODE(os.stat(chip.state_dir / name).st_mode)
        assert mode == 0o600, name
    assert "BEGIN PRIVATE KEY" in (chip.state_dir / "state.json").read_text()


def test_exported_chain_is_signed_as_on_real_chips(
    chip: EmulatedFirmware, emulated_root: EmulatedRoot
) -> None:
    c = certs(chip)
    assert chip.platform_status().state is PlatformState.INIT  # PDH_CERT_EXPORT INITs, like Linux
    assert [c[k].usage for k in ("pdh", "pek", "oca", "cek")] == [Usage.PDH, Usage.PEK, Usage.OCA, Usage.CEK]
    c["oca"].verify_signed_by(c["oca"])
    c["pek"].verify_signed_by(c["oca"])
    c["pek"].verify_signed_by(c["cek"])
    c["pdh"].verify_signed_by(c["pek"])
    # PDH_CERT_EXPORT gives the CEK without the ASK signature ...
    assert c["cek"].sig1.is_empty and c["cek"].sig2.is_empty
    with pytest.raises(VerificationFailed):
        c["cek"].verify_signed_by(emulated_root.ask)
    # ... the KDS serves it signed, freshly each time: other bytes, same key.
    kds1, kds2 = SEVCertificate.from_bytes(chip.kds_cek()), SEVCertificate.from_bytes(chip.kds_cek())
    kds1.verify_signed_by(emulated_root.ask)
    assert kds1.to_bytes() != kds2.to_bytes()
    assert kds1.public_key_bytes() == kds2.public_key_bytes() == c["cek"].public_key_bytes()
    ask, ark = parse_ask_ark(chip.ask_ark())
    ask.verify_signed_by(ark)


def fingerprints(fw: EmulatedFirmware) -> dict[str, str]:
    return {name: cert.fingerprint() for name, cert in certs(fw).items()}


def test_pek_gen_replaces_oca_pek_and_pdh(chip: EmulatedFirmware) -> None:
    before, chip_id = fingerprints(chip), chip.get_id()
    chip.pek_gen()
    after = fingerprints(chip)
    assert {k for k in before if before[k] != after[k]} == {"oca", "pek", "pdh"}
    assert chip.get_id() == chip_id
    c = certs(chip)
    c["pek"].verify_signed_by(c["oca"])
    c["pek"].verify_signed_by(c["cek"])
    c["pdh"].verify_signed_by(c["pek"])


def test_pdh_gen_replaces_only_the_pdh(chip: EmulatedFirmware) -> None:
    before = fingerprints(chip)
    chip.pdh_gen()
    after = fingerprints(chip)
    assert {k for k in before if before[k] != after[k]} == {"pdh"}
    c = certs(chip)
    c["pdh"].verify_signed_by(c["pek"])


def test_factory_reset_keeps_only_cek_and_chip_id(chip: EmulatedFirmware) -> None:
    before, chip_id = fingerprints(chip), chip.get_id()
    chip.factory_reset()
    assert chip.platform_status().state is PlatformState.UNINIT
    after = fingerprints(chip)  # export INITs again, which creates new OCA, PEK and PDH
    assert {k for k in before if before[k] != after[k]} == {"oca", "pek", "pdh"}
    assert chip.get_id() == chip_id


def owner_provision(
    fw: EmulatedFirmware,
) -> tuple[ec.EllipticCurvePrivateKey, SEVCertificate, SEVCertificate]:
    """The platform owner's side of PEK_CSR / PEK_CERT_IMPORT: sign the CSR with its own OCA."""
    oca_key = ec.generate_private_key(ec.SECP384R1())
    oca = SEVCertificate.for_ec_key(
        usage=Usage.OCA,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=oca_key.public_key(),
        api_major=0,
        api_minor=24,
    ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    csr = SEVCertificate.from_bytes(fw.pek_csr())
    assert csr.sig1.is_empty and csr.sig2.is_empty and csr.usage is Usage.PEK
    pek = csr.sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    return oca_key, oca, pek


def test_pek_cert_import_takes_ownership(chip: EmulatedFirmware) -> None:
    before = fingerprints(chip)
    _, oca, pek = owner_provision(chip)
    chip.pek_cert_import(pek.to_bytes(), oca.to_bytes())
    assert chip.platform_status().owned_externally
    c = certs(chip)
    assert c["oca"].to_bytes() == oca.to_bytes()
    assert c["pek"].public_key_bytes() == pek.public_key_bytes()  # same PEK key, now CEK-signed too
    c["pek"].verify_signed_by(oca)
    c["pek"].verify_signed_by(c["cek"])
    c["pdh"].verify_signed_by(c["pek"])
    assert c["pdh"].fingerprint() != before["pdh"]  # a new PDH

    # A second owner cannot take over: ALREADY_OWNED, until PEK_GEN makes the platform self-owned.
    _, oca2, pek2 = owner_provision(chip)
    expect(StatusCode.ALREADY_OWNED, lambda: chip.pek_cert_import(pek2.to_bytes(), oca2.to_bytes()))
    chip.pek_gen()
    assert not chip.platform_status().owned_externally
    c = certs(chip)
    assert c["oca"].fingerprint() not in (oca.fingerprint(), before["oca"])
    c["oca"].verify_signed_by(c["oca"])


def test_pek_cert_import_refusals(chip: EmulatedFirmware) -> None:
    oca_key, oca, pek = owner_provision(chip)
    # Wrong slots: an OCA where the PEK goes.
    expect(StatusCode.INVALID_CERTIFICATE, lambda: chip.pek_cert_import(oca.to_bytes(), oca.to_bytes()))
    expect(StatusCode.INVALID_LENGTH, lambda: chip.pek_cert_import(pek.to_bytes()[:-1], oca.to_bytes()))
    # The PEK signed by another OCA than the one given.
    other_key = ec.generate_private_key(ec.SECP384R1())
    other_pek = SEVCertificate.from_bytes(chip.pek_csr()).sign_with(
        Usage.OCA, Algorithm.ECDSA_SHA256, other_key
    )
    expect(StatusCode.BAD_SIGNATURE, lambda: chip.pek_cert_import(other_pek.to_bytes(), oca.to_bytes()))
    # A properly signed PEK that is not this platform's PEK.
    stranger = SEVCertificate.for_ec_key(
        usage=Usage.PEK,
        algorithm=Algorithm.ECDSA_SHA256,
        public_key=ec.generate_private_key(ec.SECP384R1()).public_key(),
        api_major=0,
        api_minor=24,
    ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, oca_key)
    expect(StatusCode.INVALID_CERTIFICATE, lambda: chip.pek_cert_import(stranger.to_bytes(), oca.to_bytes()))
    assert not chip.platform_status().owned_externally
    chip.pek_cert_import(pek.to_bytes(), oca.to_bytes())
    assert chip.platform_status().owned_externally


def test_platform_commands_refused_while_guests_are_active(chip: EmulatedFirmware) -> None:
    handle, _ = start(chip)
    status = chip.platform_status()
    assert status.state is PlatformState.WORKING and status.guest_count == 1
    before = fingerprints(chip)  # PDH_CERT_EXPORT works in WORKING
    for name, call in (
        ("PEK_GEN", chip.pek_gen),
        ("PDH_GEN", chip.pdh_gen),
        ("PEK_CSR", chip.pek_csr),
        ("FACTORY_RESET", chip.factory_reset),
        ("PEK_CERT_IMPORT", lambda: chip.pek_cert_import(bytes(CERT_SIZE), bytes(CERT_SIZE))),
    ):
        err = expect(StatusCode.INVALID_PLATFORM_STATE, call)
        assert err.command == name
    assert fingerprints(chip) == before  # nothing changed
    chip.decommission(handle)
    assert chip.platform_status().state is PlatformState.INIT
    chip.pdh_gen()
    assert fingerprints(chip)["pdh"] != before["pdh"]


# -- launches ------------------------------------------------------------------------------------------


def test_launch_digest_and_measurement(chip: EmulatedFirmware) -> None:
    blocks = [secrets.token_bytes(4096), secrets.token_bytes(176), secrets.token_bytes(32)]
    handle, session = start(chip)
    for i, block in enumerate(blocks):
        chip.launch_update_data(handle, 0x1000_0000 * (i + 1), block)
    measurement = LaunchMeasurement.from_bytes(chip.launch_measure(handle))
    digest = hashlib.sha256(b"".join(blocks)).digest()
    matched = verify_measurement(
        session.keys.tik,
        measurement,
        api_major=0,
        api_minor=24,
        build_id=15,
        policy=SEV_POLICY,
        launch_digests=[hashlib.sha256(b"x").digest(), digest],
    )
    assert matched == digest
    # Memory holds what was loaded; unwritten memory reads as zeros.
    assert chip.read_guest_memory(handle, 0x2000_0000, 176) == blocks[1]
    assert chip.read_guest_memory(handle, 0x1000_0000 - 8, 16) == bytes(8) + blocks[0][:8]


def test_mnonce_is_fresh_per_launch(chip: EmulatedFirmware) -> None:
    _, _, m1 = measured(chip)
    _, _, m2 = measured(chip)
    assert m1[32:] != m2[32:] and len(m1) == len(m2) == 48


def test_secret_lands_in_guest_memory(chip: EmulatedFirmware) -> None:
    handle, session, raw = measured(chip)
    measure = raw[:32]
    table = SecretTable.of([SecretEntry.disk_passphrase(b"correct horse battery staple")])
    header, payload = package_secret(session.keys, measure, table.to_bytes())
    chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    # A second secret before LAUNCH_FINISH is allowed (LSECRET), at another address.
    header2, payload2 = package_secret(session.keys, measure, b"B" * 32)
    chip.launch_secret(handle, header2.to_bytes(), payload2, SECRET_GPA + 0x1000)
    chip.launch_finish(handle)
    seen = SecretTable.from_bytes(chip.read_guest_memory(handle, SECRET_GPA, len(payload)))
    assert seen == table
    assert chip.read_guest_memory(handle, SECRET_GPA + 0x1000, 32) == b"B" * 32
    assert chip.guest_info(handle)["state"] == "RUNNING"


def test_session_blob_tampering_is_bad_measurement(chip: EmulatedFirmware) -> None:
    session = session_for(chip)
    blob = session.blob
    tampered = SessionBlob.from_bytes(
        blob.to_bytes()[:0x10] + bytes([blob.wrap_tk[0] ^ 1]) + blob.to_bytes()[0x11:]
    )
    expect(
        StatusCode.BAD_MEASUREMENT,
        lambda: chip.launch_start(session.godh.to_bytes(), tampered.to_bytes(), SEV_POLICY),
    )
    assert chip.platform_status().guest_count == 0


def test_session_for_another_pdh_is_bad_measurement(
    chip: EmulatedFirmware, make_chip: Callable[..., EmulatedFirmware]
) -> None:
    other = session_for(make_chip())
    expect(
        StatusCode.BAD_MEASUREMENT,
        lambda: chip.launch_start(other.godh.to_bytes(), other.blob.to_bytes(), SEV_POLICY),
    )
    # A PDH_GEN after the owner fetched the PDH has the same effect.
    session = session_for(chip)
    chip.pdh_gen()
    expect(
        StatusCode.BAD_MEASUREMENT,
        lambda: chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), SEV_POLICY),
    )


def test_policy_checks_at_launch_start(make_chip: Callable[..., EmulatedFirmware]) -> None:
    chip = make_chip()
    session = session_for(chip, SEV_POLICY)
    # The host swaps the owner's policy: policy_mac no longer matches.
    err = expect(
        StatusCode.POLICY_FAILURE,
        lambda: chip.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), 0x1),
    )
    assert err.command == "LAUNCH_START"
    # The owner asks for a newer firmware than this one.
    newer = GuestPolicy.from_flags(
        PolicyFlags.NODBG | PolicyFlags.NOKS, api_major_min=1, api_minor_min=0
    ).value
    s2 = session_for(chip, newer)
    expect(
        StatusCode.POLICY_FAILURE, lambda: chip.launch_start(s2.godh.to_bytes(), s2.blob.to_bytes(), newer)
    )
    # SEV-ES on a chip without SEV-ES ASIDs.
    no_es = make_chip(max_es_guests=0)
    assert not no_es.platform_status().es_enabled
    s3 = session_for(no_es, ES_POLICY)
    expect(
        StatusCode.POLICY_FAILURE,
        lambda: no_es.launch_start(s3.godh.to_bytes(), s3.blob.to_bytes(), ES_POLICY),
    )
    expect(
        StatusCode.INVALID_LENGTH, lambda: chip.launch_start(b"\0" * 10, session.blob.to_bytes(), SEV_POLICY)
    )
    assert chip.platform_status().guest_count == 0


def test_secret_with_wrong_tik_or_other_measurement(chip: EmulatedFirmware) -> None:
    handle, session, raw = measured(chip)
    table = SecretTable.of([SecretEntry.disk_passphrase(b"pw")]).to_bytes()
    # Built with keys that are not this launch's (a wrong TIK).
    header, payload = package_secret(TransportKeys.generate(), raw[:32], table)
    expect(
        StatusCode.BAD_MEASUREMENT, lambda: chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    )
    # Built with the right keys for another launch's measurement.
    other_handle, _, other_raw = measured(chip)
    header, payload = package_secret(session.keys, other_raw[:32], table)
    expect(
        StatusCode.BAD_MEASUREMENT, lambda: chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    )
    assert chip.read_guest_memory(handle, SECRET_GPA, 16) == bytes(16)  # nothing injected
    # The right one still works.
    header, payload = package_secret(session.keys, raw[:32], table)
    chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    chip.decommission(other_handle)


def test_commands_out_of_order(chip: EmulatedFirmware) -> None:
    handle, session = start(chip)
    header, payload = package_secret(session.keys, bytes(32), b"x" * 16)
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.launch_secret(handle, header.to_bytes(), payload, 0))
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.launch_finish(handle))
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.attestation(handle, bytes(16)))
    chip.launch_update_data(handle, 0, bytes(16))
    raw = chip.launch_measure(handle)
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.launch_update_data(handle, 0, bytes(16)))
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.launch_measure(handle))
    header, payload = package_secret(session.keys, raw[:32], b"s" * 16)
    chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    chip.launch_finish(handle)
    # The second LAUNCH_SECRET after LAUNCH_FINISH is refused: the guest runs.
    header, payload = package_secret(session.keys, raw[:32], b"t" * 16)
    err = expect(
        StatusCode.INVALID_GUEST_STATE,
        lambda: chip.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA),
    )
    assert err.command == "LAUNCH_SECRET"
    expect(StatusCode.INVALID_GUEST_STATE, lambda: chip.launch_finish(handle))
    assert chip.read_guest_memory(handle, SECRET_GPA, 16) == b"s" * 16
    chip.decommission(handle)
    expect(StatusCode.INVALID_GUEST, lambda: chip.launch_measure(handle))
    expect(StatusCode.INVALID_GUEST, lambda: chip.decommission(handle))


def test_update_argument_checks(chip: EmulatedFirmware) -> None:
    handle, _ = start(chip)
    expect(StatusCode.INVALID_LENGTH, lambda: chip.launch_update_data(handle, 0, bytes(15)))
    expect(StatusCode.INVALID_LENGTH, lambda: chip.launch_update_data(handle, 0, b""))
    expect(StatusCode.INVALID_ADDRESS, lambda: chip.launch_update_data(handle, 8, bytes(16)))
    # LAUNCH_UPDATE_VMSA is for SEV-ES guests only.
    expect(StatusCode.POLICY_FAILURE, lambda: chip.launch_update_vmsa(handle, bytes(4096)))
    es_handle, _ = start(chip, ES_POLICY)
    expect(StatusCode.INVALID_LENGTH, lambda: chip.launch_update_vmsa(es_handle, bytes(4095)))
    chip.launch_update_vmsa(es_handle, bytes(4096))


def test_asid_pool_is_bounded_and_es_counted_apart(make_chip: Callable[..., EmulatedFirmware]) -> None:
    chip = make_chip(max_guests=2, max_es_guests=1)
    a, _ = start(chip)
    b, _ = start(chip)
    err = expect(StatusCode.RESOURCE_LIMIT, lambda: start(chip))
    assert err.command == "LAUNCH_START"
    es, _ = start(chip, ES_POLICY)  # the ES pool is separate
    expect(StatusCode.RESOURCE_LIMIT, lambda: start(chip, ES_POLICY))
    asids = {h: int(chip.guest_info(h)["asid"]) for h in (a, b, es)}
    assert asids[es] == 1 and sorted((asids[a], asids[b])) == [2, 3]  # ES ASIDs below MIN_SEV_ASID
    assert chip.platform_status().guest_count == 3
    chip.decommission(a)  # DECOMMISSION frees the ASID
    c, _ = start(chip)
    assert int(chip.guest_info(c)["asid"]) == asids[a]
    assert len({a, b, c, es}) == 4  # handles are never reused


def test_attestation_report(chip: EmulatedFirmware) -> None:
    data = secrets.token_bytes(64)
    handle, _ = start(chip)
    chip.launch_update_data(handle, 0, data)
    chip.launch_measure(handle)
    mnonce = secrets.token_bytes(16)
    report = AttestationReport.from_bytes(chip.attestation(handle, mnonce))
    report.verify(certs(chip)["pek"])
    assert report.mnonce == mnonce
    assert report.launch_digest == hashlib.sha256(data).digest()
    assert report.policy == SEV_POLICY
    expect(StatusCode.INVALID_LENGTH, lambda: chip.attestation(handle, bytes(15)))


def test_attestation_needs_api_0_23(make_chip: Callable[..., EmulatedFirmware]) -> None:
    old = make_chip(api_major=0, api_minor=22, build=4)
    handle, session, raw = measured(old)
    expect(StatusCode.INVALID_COMMAND, lambda: old.attestation(handle, bytes(16)))
    # The measurement of an older chip carries its own version and build.
    verify_measurement(
        session.keys.tik,
        LaunchMeasurement.from_bytes(raw),
        api_major=0,
        api_minor=22,
        build_id=4,
        policy=SEV_POLICY,
        launch_digests=[hashlib.sha256(bytes(range(256)) * 4).digest()],
    )


def test_measure_matches_the_formula_for_the_chip_version(make_chip: Callable[..., EmulatedFirmware]) -> None:
    chip = make_chip(api_major=1, api_minor=55, build=21)
    handle, session = start(chip)
    chip.launch_update_data(handle, 0, bytes(32))
    raw = chip.launch_measure(handle)
    expected = compute_measure(
        session.keys.tik,
        api_major=1,
        api_minor=55,
        build_id=21,
        policy=SEV_POLICY,
        launch_digest=hashlib.sha256(bytes(32)).digest(),
        mnonce=raw[32:],
    )
    assert raw[:32] == expected


def test_two_objects_on_one_directory_are_one_chip(chip: EmulatedFirmware) -> None:
    twin = EmulatedFirmware(chip.state_dir, create=False)
    handle, session = start(chip)
    assert twin.platform_status().guest_count == 1
    twin.launch_update_data(handle, 0, bytes(64))  # the other object continues the launch
    raw = chip.launch_measure(handle)
    assert twin.guest_info(handle)["state"] == "LSECRET"
    twin_pdh, _ = twin.pdh_cert_export()
    assert twin_pdh == chip.pdh_cert_export()[0] and twin.get_id() == chip.get_id()
    header, payload = package_secret(session.keys, raw[:32], b"k" * 16)
    twin.launch_secret(handle, header.to_bytes(), payload, SECRET_GPA)
    assert chip.read_guest_memory(handle, SECRET_GPA, 16) == b"k" * 16


def test_opening_rules(chip: EmulatedFirmware, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        EmulatedFirmware(tmp_path / "nothing", create=False)
    with pytest.raises(ValueError, match="another configuration"):
        EmulatedFirmware(chip.state_dir, config=ChipConfig(build=99))
    assert EmulatedFirmware(chip.state_dir, config=ChipConfig()).get_id() == chip.get_id()
    with pytest.raises(ValueError):
        ChipConfig(max_guests=0, max_es_guests=0)


def test_no_secret_in_reprs_or_errors(chip: EmulatedFirmware, emulated_root: EmulatedRoot) -> None:
    handle, session, raw = measured(chip)
    header, payload = package_secret(TransportKeys.generate(), raw[:32], b"z" * 16)
    err = expect(
        StatusCode.BAD_MEASUREMENT, lambda: chip.launch_secret(handle, header.to_bytes(), payload, 0)
    )
    state = (chip.state_dir / "state.json").read_text()
    tik_hex = session.keys.tik.hex()
    assert tik_hex in state  # the firmware keeps it (0600 file) ...
    for text in (str(err), repr(err), repr(chip), repr(emulated_root)):  # ... but never shows it
        assert tik_hex not in text and "PRIVATE KEY" not in text


#: What `sevlaunch.firmware.emulator` defined when it was one module; the package keeps every name.
SINGLE_MODULE_NAMES = (
    "ARK_CERT ARK_KEY ASK_ARK_CERT ASK_CERT ASK_KEY ATTESTATION_MIN_API CEK_CERT CEK_KEY CHIP_ID_SIZE "
    "GUESTS_DIR LAUNCH_DIGEST_SIZE MNONCE_SIZE ROOT_RSA_BITS SECRET_HEADER_SIZE STATE_COMMAND STATE_FILE "
    "STATE_FORMAT U32_MAX U64_MAX VMSA_SIZE ChipConfig EmulatedFirmware EmulatedRoot EmulatorStateError "
    "GuestState"
).split()


def test_the_emulator_package_keeps_the_single_modules_names() -> None:
    import sevlaunch.firmware as firmware
    import sevlaunch.firmware.emulator as emulator

    assert sorted(emulator.__all__) == sorted(SINGLE_MODULE_NAMES)
    for name in SINGLE_MODULE_NAMES:
        assert getattr(emulator, name) is not None, name
    # The values the old module held, now taken from the protocol library where it defines them.
    assert (emulator.STATE_FILE, emulator.ASK_ARK_CERT, emulator.STATE_COMMAND) == (
        "state.json", "ask_ark.cert", "EMULATOR_STATE"
    )
    assert (emulator.VMSA_SIZE, emulator.SECRET_HEADER_SIZE, emulator.MNONCE_SIZE) == (4096, 52, 16)
    assert (emulator.LAUNCH_DIGEST_SIZE, emulator.CHIP_ID_SIZE, emulator.ROOT_RSA_BITS) == (32, 64, 4096)
    assert firmware.EmulatedFirmware is emulator.EmulatedFirmware
    assert issubclass(emulator.EmulatorStateError, firmware.FirmwareError)
    assert issubclass(emulator.EmulatorStateError, ValueError)


def test_every_emulator_module_reads_in_one_sitting() -> None:
    package = Path(__file__).parents[2] / "sevlaunch" / "firmware" / "emulator"
    files = package.rglob("*.py")
    sizes = {p.relative_to(package).as_posix(): len(p.read_text().splitlines()) for p in files}
    modules = {"layout.py", "root.py", "codec.py", "chip.py", "commands/platform.py", "commands/sev.py"}
    assert modules <= set(sizes)
    assert max(sizes.values()) <= 600, sizes
