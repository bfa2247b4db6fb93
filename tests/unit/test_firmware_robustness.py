"""The emulated chip against a damaged state directory, odd guest handles and odd KDS requests.

A broken state directory (a truncated, garbage or foreign state file, a missing or unreadable key
file) is the emulator's equivalent of damaged SPI flash: every command then fails with a typed
`FirmwareError` (HWERROR_PLATFORM, the PSP's answer), never a traceback from json, base64 or the PEM
parser that the server shell would turn into INTERNAL. Opening such a directory fails the same way, and
the error is also a `ValueError`, so a server starting on it reports "cannot start".
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sevlaunch.firmware import EmulatedFirmware, EmulatedRoot, FirmwareError, StatusCode
from sevlaunch.firmware.emulator import EmulatorStateError
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.rpc import map_exception


@pytest.fixture(scope="module")
def template(emulated_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised chip (OCA, PEK, PDH) to copy per test."""
    path = tmp_path_factory.mktemp("robust") / "chip"
    EmulatedFirmware(path, root=emulated_root).pdh_cert_export()
    return path


def _copy(template: Path, tmp_path: Path) -> Path:
    chip = tmp_path / "chip"
    shutil.copytree(template, chip)
    return chip


def _edit_state(chip: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((chip / "state.json").read_bytes())
    edit(doc)
    (chip / "state.json").write_text(json.dumps(doc))


def _is_hwerror(exc: BaseException) -> bool:
    return isinstance(exc, FirmwareError) and exc.status is StatusCode.HWERROR_PLATFORM


STATE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": lambda c: (c / "state.json").write_bytes((c / "state.json").read_bytes()[:100]),
    "empty": lambda c: (c / "state.json").write_bytes(b""),
    "garbage": lambda c: (c / "state.json").write_bytes(bytes(range(256)) * 3),
    "json-list": lambda c: (c / "state.json").write_bytes(b"[1, 2]"),
    "deep-json": lambda c: (c / "state.json").write_bytes(b"[" * 200_000 + b"]" * 200_000),
    "other-format": lambda c: _edit_state(c, lambda d: d.update(format=99)),
    "missing-field": lambda c: _edit_state(c, lambda d: d.pop("guests")),
    "bad-hex": lambda c: _edit_state(c, lambda d: d.update(chip_id="zz")),
    "unknown-config": lambda c: _edit_state(c, lambda d: d["config"].update(bogus=1)),
    "bad-platform-state": lambda c: _edit_state(c, lambda d: d.update(platform_state=7)),
    "bad-base64": lambda c: _edit_state(c, lambda d: d["pdh"].update(cert="!!")),
    "state-is-a-directory": lambda c: ((c / "state.json").unlink(), (c / "state.json").mkdir()),
}


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_a_damaged_state_file_is_a_typed_error_at_open(template: Path, tmp_path: Path, damage: str) -> None:
    chip = _copy(template, tmp_path)
    STATE_DAMAGE[damage](chip)
    with pytest.raises(EmulatorStateError) as info:
        EmulatedFirmware(chip)
    assert _is_hwerror(info.value) and isinstance(info.value, ValueError)
    assert map_exception(info.value, "r").code.name == "FAILED_PRECONDITION"


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_a_state_file_damaged_under_a_running_emulator_fails_each_command_typed(
    template: Path, tmp_path: Path, damage: str
) -> None:
    chip = _copy(template, tmp_path)
    fw = EmulatedFirmware(chip)
    STATE_DAMAGE[damage](chip)
    for command in (fw.platform_status, fw.pdh_cert_export, fw.get_id, fw.pek_gen, fw.factory_reset):
        with pytest.raises(FirmwareError) as info:
            command()
        assert _is_hwerror(info.value)


@pytest.mark.parametrize("bad_key", ["not a pem", 17, "ünïcode"])
def test_a_private_key_in_the_state_that_does_not_parse_is_typed(
    template: Path, tmp_path: Path, bad_key: object
) -> None:
    chip = _copy(template, tmp_path)
    _edit_state(chip, lambda d: d["pek"].update(key=bad_key))
    fw = EmulatedFirmware(chip)
    with pytest.raises(FirmwareError) as info:
        fw.pdh_gen()  # signs the new PDH with the PEK's private key
    assert _is_hwerror(info.value)


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("cek.key", lambda fw: fw.pek_gen()),
        ("ask.key", lambda fw: fw.kds_cek()),
        ("ask_ark.cert", lambda fw: fw.ask_ark()),
    ],
)
def test_a_missing_or_garbled_key_file_is_typed(
    template: Path, tmp_path: Path, name: str, command: Callable[[EmulatedFirmware], Any]
) -> None:
    chip = _copy(template, tmp_path)
    (chip / name).unlink()
    with pytest.raises(FirmwareError) as info:
        command(EmulatedFirmware(chip))
    assert _is_hwerror(info.value)
    if name.endswith(".key"):
        (chip / name).write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        with pytest.raises(FirmwareError) as info:
            command(EmulatedFirmware(chip))
        assert _is_hwerror(info.value)


def test_the_state_error_survives_pickling() -> None:
    err = EmulatorStateError("state.json is not a readable chip state")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is EmulatorStateError and str(back) == str(err) and back.status is err.status


def test_a_leftover_temporary_is_swept_by_the_next_command(template: Path, tmp_path: Path) -> None:
    chip = _copy(template, tmp_path)
    (chip / ".state.json.crashed.tmp").write_bytes(b"half a state")
    fw = EmulatedFirmware(chip)
    before = fw.get_id()
    fw.pdh_gen()
    assert list(chip.glob(".*.tmp")) == [] and fw.get_id() == before


def test_an_unreadable_state_file_is_typed(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod 0 cannot stop root (CI runs as root), so the read fails the way a mode-0 file fails for
    # anyone else: with EACCES from the read itself.
    chip = _copy(template, tmp_path)
    fw = EmulatedFirmware(chip)
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "state.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(FirmwareError) as info:
        fw.platform_status()
    assert _is_hwerror(info.value)
    assert "Permission denied" in str(info.value)


def _open_and_report(path: str, queue: Any) -> None:
    queue.put(EmulatedFirmware(path).chip_id_hex())


def test_processes_opening_one_fresh_directory_create_one_chip(
    emulated_root: EmulatedRoot, tmp_path: Path
) -> None:
    """The initialisation race: every opener waits on the chip lock and finds the one chip made."""
    # The root is handed over as files, so no child spends seconds generating RSA-4096 keys.
    chip = tmp_path / "fresh"
    chip.mkdir()
    emulated_root.save(chip)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_and_report, args=(str(chip), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(ids) == 1 and ids == {EmulatedFirmware(chip).chip_id_hex()}


@pytest.mark.parametrize("handle", [0, -1, 2**31, 2**64, 2**200, 10**6])
def test_unknown_guest_handles_are_invalid_guest(template: Path, tmp_path: Path, handle: int) -> None:
    fw = EmulatedFirmware(_copy(template, tmp_path))
    for command in (
        lambda: fw.launch_update_data(handle, 0, b"\0" * 16),
        lambda: fw.launch_update_vmsa(handle, b"\0" * 4096),
        lambda: fw.launch_measure(handle),
        lambda: fw.launch_secret(handle, b"\0" * 52, b"\0" * 16, 0),
        lambda: fw.launch_finish(handle),
        lambda: fw.attestation(handle, b"\0" * 16),
        lambda: fw.decommission(handle),
        lambda: fw.guest_info(handle),
    ):
        with pytest.raises(FirmwareError) as info:
            command()
        assert info.value.status is StatusCode.INVALID_GUEST


@pytest.mark.parametrize(
    "path",
    [
        "/cek/id/../../etc/passwd",
        "/cek/id/..%2F..%2Fetc%2Fpasswd",
        "/cek/id/",
        "/cek/id/" + "ab" * 5000,
        "/cek/id/%00",
        "/cek/id//",
        "/CEK/ID/00",
        "/",
    ],
)
def test_kds_answers_odd_paths_with_404(template: Path, tmp_path: Path, path: str) -> None:
    fw = EmulatedFirmware(_copy(template, tmp_path))
    with KDSServer([fw]) as kds:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(kds.url + path, timeout=10)
        assert info.value.code == 404
        upper = kds.url + "/cek/id/" + fw.chip_id_hex().upper()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(upper, timeout=10)
        assert info.value.code == 404
        with urllib.request.urlopen(kds.url + "/cek/id/" + fw.chip_id_hex(), timeout=10) as reply:
            assert reply.status == 200 and len(reply.read()) == 0x824


def test_kds_answers_500_when_the_chip_cannot_sign(template: Path, tmp_path: Path) -> None:
    chip = _copy(template, tmp_path)
    fw = EmulatedFirmware(chip)
    with KDSServer([fw]) as kds:
        (chip / "ask.key").unlink()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(kds.url + "/cek/id/" + fw.chip_id_hex(), timeout=10)
        assert info.value.code == 500


def test_the_platform_server_on_a_damaged_chip_says_cannot_start(
    template: Path, tmp_path: Path, tls_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from platform_svc.server import main

    chip = _copy(template, tmp_path)
    STATE_DAMAGE["truncated"](chip)
    argv = [
        "--tls-dir",
        str(tls_dir),
        "--emulator",
        str(chip),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
    ]
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert '"cannot start"' in err and "HWERROR_PLATFORM" in err and "Traceback" not in err


@pytest.mark.parametrize(("gpa", "length"), [(2**64 - 16, 32), (-16, 16), (2**70, 16), (0, 0)])
def test_launch_update_data_outside_the_address_space_is_refused(
    template: Path, tmp_path: Path, gpa: int, length: int
) -> None:
    from sevlaunch.sev.cert import SEVCertificate
    from sevlaunch.sev.session import create_session

    fw = EmulatedFirmware(_copy(template, tmp_path))
    pdh, _ = fw.pdh_cert_export()
    session = create_session(SEVCertificate.from_bytes(pdh), 0x3)
    handle = fw.launch_start(session.godh.to_bytes(), session.blob.to_bytes(), 0x3)
    with pytest.raises(FirmwareError) as info:
        fw.launch_update_data(handle, gpa, bytes(length))
    expected = StatusCode.INVALID_LENGTH if length == 0 else StatusCode.INVALID_ADDRESS
    assert info.value.status is expected
    assert fw.guest_info(handle)["state"] == "LUPDATE"
    fw.decommission(handle)


@pytest.fixture(scope="module")
def guest_template(emulated_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chip with one measured guest (every guest field set) to copy per test."""
    from sevlaunch.sev.cert import SEVCertificate
    from sevlaunch.sev.session import create_session

    path = tmp_path_factory.mktemp("robust-guest") / "chip"
    fw = EmulatedFirmware(path, root=emulated_root)
    pdh, _ = fw.pdh_cert_export()
    s = create_session(SEVCertificate.from_bytes(pdh), 0x3)
    handle = fw.launch_start(s.godh.to_bytes(), s.blob.to_bytes(), 0x3)
    fw.launch_update_data(handle, 0x1000, bytes(32))
    fw.launch_measure(handle)
    return path


def _guest(d: dict[str, Any]) -> dict[str, Any]:
    guest = d["guests"][0]
    assert isinstance(guest, dict)
    return guest


# Well-formed JSON with the wrong types or out-of-range values: each must be refused when the state is
# read, as an EmulatorStateError, not surface later as a raw TypeError/ValueError (INTERNAL over gRPC).
WRONG_TYPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "next-handle-string": lambda d: d.update(next_handle="x"),
    "next-handle-float": lambda d: d.update(next_handle=2.5),
    "next-handle-bool": lambda d: d.update(next_handle=True),
    "next-handle-negative": lambda d: d.update(next_handle=-1),
    "next-handle-not-above-guests": lambda d: d.update(next_handle=_guest(d)["handle"]),
    "commands-string": lambda d: d.update(commands="7"),
    "owned-externally-string": lambda d: d.update(owned_externally="no"),
    "chip-id-short": lambda d: d.update(chip_id="00"),
    "config-api-float": lambda d: d["config"].update(api_major=1.5),
    "config-generation-int": lambda d: d["config"].update(generation=5),
    "config-not-object": lambda d: d.update(config=[1]),
    "guests-not-list": lambda d: d.update(guests={"1": _guest(d)}),
    "guest-is-list": lambda d: d.update(guests=[list(_guest(d).values())]),
    "guest-is-null": lambda d: d.update(guests=[None]),
    "guest-duplicate": lambda d: d.update(guests=[_guest(d), dict(_guest(d))]),
    "guest-handle-string": lambda d: _guest(d).update(handle="1"),
    "guest-handle-zero": lambda d: _guest(d).update(handle=0),
    "guest-asid-negative": lambda d: _guest(d).update(asid=-1),
    "guest-asid-zero": lambda d: _guest(d).update(asid=0),
    "guest-asid-beyond-pool": lambda d: _guest(d).update(asid=10_000),
    "guest-asid-string": lambda d: _guest(d).update(asid="1"),
    "guest-policy-negative": lambda d: _guest(d).update(policy=-1),
    "guest-policy-u64": lambda d: _guest(d).update(policy=2**40),
    "guest-gstate-bool": lambda d: _guest(d).update(gstate=True),
    "guest-tek-short": lambda d: _guest(d).update(tek="00"),
    "guest-tik-int": lambda d: _guest(d).update(tik=5),
    "guest-log-len-negative": lambda d: _guest(d).update(log_len=-1),
    "guest-vmsa-count-string": lambda d: _guest(d).update(vmsa_count="0"),
    "guest-region-strings": lambda d: _guest(d).update(regions=[["a", "b", "c"]]),
    "guest-region-short": lambda d: _guest(d).update(regions=[[1]]),
    "guest-region-negative": lambda d: _guest(d).update(regions=[[0x1000, -1, 32]]),
    "guest-secret-not-pair": lambda d: _guest(d).update(secrets=[["AAAA"]]),
    "guest-secret-gpa-string": lambda d: _guest(d).update(secrets=[["0", "AAAA"]]),
    "guest-digest-short": lambda d: _guest(d).update(launch_digest="00"),
    "guest-measure-int": lambda d: _guest(d).update(measure=3),
    "guest-mnonce-short": lambda d: _guest(d).update(mnonce="0011"),
    "keyed-cert-not-object": lambda d: d.update(pdh=["cert"]),
}


@pytest.mark.parametrize("corruption", sorted(WRONG_TYPES))
def test_a_state_file_with_wrong_field_types_is_a_typed_error(
    guest_template: Path, tmp_path: Path, corruption: str
) -> None:
    chip = _copy(guest_template, tmp_path)
    fw = EmulatedFirmware(chip)
    _edit_state(chip, WRONG_TYPES[corruption])
    with pytest.raises(EmulatorStateError) as info:
        EmulatedFirmware(chip)
    assert _is_hwerror(info.value) and isinstance(info.value, ValueError)
    # A running emulator reading the same state refuses every command the same way.
    for command in (fw.platform_status, fw.pdh_cert_export, fw.get_id, lambda: fw.launch_measure(1)):
        with pytest.raises(EmulatorStateError):
            command()


def test_the_guest_template_state_still_loads(guest_template: Path, tmp_path: Path) -> None:
    chip = _copy(guest_template, tmp_path)
    _edit_state(chip, lambda d: None)  # a JSON round trip changes nothing that matters
    fw = EmulatedFirmware(chip)
    assert fw.platform_status().guest_count == 1
