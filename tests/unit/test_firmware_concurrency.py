"""One chip directory, several processes: commands serialise, and a killed process leaves a working chip."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from sevlaunch.firmware import (
    ChipConfig,
    EmulatedFirmware,
    EmulatedRoot,
    FirmwareError,
    PlatformState,
    StatusCode,
)
from sevlaunch.firmware import state as state_module
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate
from sevlaunch.sev.measurement import LaunchMeasurement, verify_measurement
from sevlaunch.sev.secret import package_secret
from sevlaunch.sev.session import create_session

POLICY = 0x0003
CTX = multiprocessing.get_context("fork")


def launch_once(fw: EmulatedFirmware, rng: random.Random) -> int:
    """A complete small launch with verification; returns the number of firmware commands issued."""
    ops = 0
    while True:
        pdh, _ = fw.pdh_cert_export()
        session = create_session(SEVCertificate.from_bytes(pdh), POLICY)
        try:
            handle = fw.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), POLICY)
            ops += 2
            break
        except FirmwareError as exc:
            # The other process ran PDH_GEN/PEK_GEN between our export and LAUNCH_START: the session
            # was wrapped to a PDH that no longer exists, exactly as on real hardware. Fetch again.
            if exc.status is not StatusCode.BAD_MEASUREMENT:
                raise
            ops += 2
    blocks = [rng.randbytes(16 * rng.randint(1, 64)) for _ in range(rng.randint(1, 4))]
    for i, block in enumerate(blocks):
        fw.launch_update_data(handle, 0x1000 * (i + 1) * 64, block)
    raw = fw.launch_measure(handle)
    verify_measurement(
        session.keys.tik,
        LaunchMeasurement.from_bytes(raw),
        api_major=0,
        api_minor=24,
        build_id=15,
        policy=POLICY,
        launch_digests=[hashlib.sha256(b"".join(blocks)).digest()],
    )
    secret = rng.randbytes(48)
    header, payload = package_secret(session.keys, raw[:32], secret)
    fw.launch_secret(handle, header.to_bytes(), payload, 0x80_0000)
    fw.launch_finish(handle)
    assert fw.read_guest_memory(handle, 0x80_0000, 48) == secret
    fw.decommission(handle)
    return ops + len(blocks) + 5


def hammer(state_dir: str, seed: int, target: int, results: Any) -> None:
    rng = random.Random(seed)
    fw = EmulatedFirmware(state_dir, create=False)
    ops, handles, refused = 0, 0, 0
    try:
        while ops < target:
            choice = rng.random()
            if choice < 0.5:
                ops += launch_once(fw, rng)
                handles += 1
            elif choice < 0.7:
                status = fw.platform_status()
                assert status.state in (PlatformState.INIT, PlatformState.WORKING)
                pdh, chain = fw.pdh_cert_export()
                # Every export is a consistent snapshot: the PDH is signed by the PEK beside it.
                SEVCertificate.from_bytes(pdh).verify_signed_by(SEVCertificate.from_bytes(chain[:CERT_SIZE]))
                ops += 2
            else:
                try:
                    (fw.pdh_gen if choice < 0.9 else fw.pek_gen)()
                except FirmwareError as exc:
                    # Refused only because the other process has a guest right now.
                    if exc.status is not StatusCode.INVALID_PLATFORM_STATE:
                        raise
                    refused += 1
                ops += 1
        results.put(("ok", seed, ops, handles, refused))
    except BaseException as exc:  # report everything to the parent
        results.put(("error", seed, repr(exc), 0, 0))


def test_two_processes_hammering_one_chip(emulated_root: EmulatedRoot, tmp_path: Path) -> None:
    state = tmp_path / "chip"
    fw = EmulatedFirmware(state, config=ChipConfig(max_guests=4, max_es_guests=2), root=emulated_root)
    fw.pdh_cert_export()
    results = CTX.Queue()
    workers = [CTX.Process(target=hammer, args=(str(state), seed, 150, results)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert all(o[0] == "ok" for o in outcomes), outcomes
    assert sum(o[2] for o in outcomes) >= 300
    assert all(o[3] > 0 for o in outcomes)
    # Consistent afterwards: no guest left, a valid chain, and the chip still launches.
    status = fw.platform_status()
    assert status.guest_count == 0 and status.state is PlatformState.INIT
    pdh, chain = fw.pdh_cert_export()
    pek, oca, cek = (SEVCertificate.from_bytes(chain[i * CERT_SIZE : (i + 1) * CERT_SIZE]) for i in range(3))
    SEVCertificate.from_bytes(pdh).verify_signed_by(pek)
    pek.verify_signed_by(oca)
    pek.verify_signed_by(cek)
    assert launch_once(fw, random.Random(3)) > 0
    assert list((state / "guests").iterdir()) == []
    assert not list(state.glob(".*.tmp"))


# -- crashes -------------------------------------------------------------------------------------------


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_during_state_rename(state_dir: str) -> None:
    """PEK_GEN dies after the new state is written and fsync'ed but before it replaces the old one."""
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("state.json"):
            _die()
        real_replace(src, dst)

    os.replace = replace  # type: ignore[assignment]  # this child process only
    EmulatedFirmware(state_dir, create=False).pek_gen()


def crash_after_log_append(state_dir: str, handle: int) -> None:
    """LAUNCH_UPDATE_DATA dies after appending to the launch log, before committing the new length."""
    real_append = state_module.LaunchLog.append

    def append(self: Any, committed: int, data: bytes) -> int:
        real_append(self, committed, data)
        _die()
        return 0  # pragma: no cover

    state_module.LaunchLog.append = append  # type: ignore[method-assign]  # this child process only
    EmulatedFirmware(state_dir, create=False).launch_update_data(handle, 0x2000, b"\xee" * 64)


def run_and_expect_kill(target: Any, *args: Any) -> None:
    proc = CTX.Process(target=target, args=args)
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL


def chain_fingerprints(fw: EmulatedFirmware) -> list[str]:
    pdh, chain = fw.pdh_cert_export()
    return [
        SEVCertificate.from_bytes(c).fingerprint()
        for c in (pdh, chain[:CERT_SIZE], chain[CERT_SIZE : 2 * CERT_SIZE])
    ]


def test_kill_mid_state_write_keeps_the_old_state(emulated_root: EmulatedRoot, tmp_path: Path) -> None:
    fw = EmulatedFirmware(tmp_path / "chip", root=emulated_root)
    before = chain_fingerprints(fw)
    run_and_expect_kill(crash_during_state_rename, str(fw.state_dir))
    assert list(fw.state_dir.glob(".state.json.*.tmp"))  # the crashed command's residue
    assert chain_fingerprints(fw) == before  # PEK_GEN did not happen, not even half
    fw.pek_gen()  # and the chip works
    assert chain_fingerprints(fw) != before
    assert not list(fw.state_dir.glob(".*.tmp"))
    assert launch_once(fw, random.Random(5)) > 0


def test_kill_mid_launch_update_leaves_the_digest_clean(emulated_root: EmulatedRoot, tmp_path: Path) -> None:
    fw = EmulatedFirmware(tmp_path / "chip", root=emulated_root)
    pdh, _ = fw.pdh_cert_export()
    session = create_session(SEVCertificate.from_bytes(pdh), POLICY)
    handle = fw.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), POLICY)
    first = b"\x11" * 32
    fw.launch_update_data(handle, 0x1000, first)
    run_and_expect_kill(crash_after_log_append, str(fw.state_dir), handle)
    second = b"\x22" * 48
    fw.launch_update_data(handle, 0x3000, second)  # overwrites the uncommitted residue
    raw = fw.launch_measure(handle)
    verify_measurement(
        session.keys.tik,
        LaunchMeasurement.from_bytes(raw),
        api_major=0,
        api_minor=24,
        build_id=15,
        policy=POLICY,
        launch_digests=[hashlib.sha256(first + second).digest()],
    )
    assert fw.read_guest_memory(handle, 0x2000, 64) == bytes(64)  # the crashed update never happened


def busy_loop(state_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    fw = EmulatedFirmware(state_dir, create=False)
    while True:
        launch_once(fw, rng)
        fw.pdh_gen()


def test_random_sigkill_leaves_a_chip_that_loads_and_works(
    emulated_root: EmulatedRoot, tmp_path: Path
) -> None:
    config = ChipConfig(max_guests=3, max_es_guests=1)
    fw = EmulatedFirmware(tmp_path / "chip", config=config, root=emulated_root)
    fw.pdh_cert_export()
    rng = random.Random(7)
    for round_no in range(4):
        proc = CTX.Process(target=busy_loop, args=(str(fw.state_dir), round_no))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(timeout=10)
        assert proc.exitcode == -signal.SIGKILL
        reopened = EmulatedFirmware(fw.state_dir, create=False)
        status = reopened.platform_status()
        # The killed process may have left one guest mid-launch; the host decommissions it (as KVM
        # does when QEMU dies) and the chip carries on.
        for handle in reopened.guest_handles():
            reopened.decommission(handle)
        assert status.guest_count <= 1
        assert launch_once(reopened, rng) > 0
    assert fw.platform_status().guest_count == 0
