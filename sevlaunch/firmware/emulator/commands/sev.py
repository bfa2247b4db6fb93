"""The SEV and SEV-ES guest commands (AMD publication 55766 chapter 6): the `LaunchFirmware` protocol,
and the emulator's views of such a guest (its memory, its status)."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.hazmat.primitives import hashes

from sevlaunch.firmware.emulator.chip import ChipBase
from sevlaunch.firmware.emulator.codec import Chip, Guest, GuestState
from sevlaunch.firmware.emulator.layout import (
    ATTESTATION_MIN_API,
    MNONCE_SIZE,
    SECRET_HEADER_SIZE,
    VMSA_SIZE,
)
from sevlaunch.firmware.state import LaunchLog
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported, VerificationFailed
from sevlaunch.sev.measurement import compute_measure
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.report import AttestationReport
from sevlaunch.sev.secret import SecretHeader, open_secret
from sevlaunch.sev.session import SESSION_BLOB_SIZE, SessionBlob, unwrap_session
from sevlaunch.sev.types import LaunchDigest, MNonce


class SevGuestCommands(ChipBase):
    """LAUNCH_START .. LAUNCH_FINISH, ATTESTATION and DECOMMISSION for SEV and SEV-ES guests."""

    @staticmethod
    def _allocate_asid(chip: Chip, es: bool) -> int:
        """ES guests take ASIDs 1..max_es_guests, SEV guests the ones above (MIN_SEV_ASID split)."""
        config = chip.config
        first, count = (1, config.max_es_guests) if es else (config.max_es_guests + 1, config.max_guests)
        used = chip.used_asids()
        for asid in range(first, first + count):
            if asid not in used:
                return asid
        kind = "SEV-ES" if es else "SEV"
        raise FirmwareError(StatusCode.RESOURCE_LIMIT, "LAUNCH_START", f"all {count} {kind} ASIDs in use")

    def launch_start(self, godh: bytes, session: bytes, policy: int) -> int:
        """LAUNCH_START (55766 chapter 6): a new guest context from the owner's GODH and session blob.

        Policy checks first (POLICY_FAILURE: reserved bits, a minimum API above this firmware, ES on a
        platform without SEV-ES), then an ASID (RESOURCE_LIMIT when the pool is exhausted), then the
        session: ECDH with the PDH, the KDF, wrap_mac (a mismatch is BAD_MEASUREMENT) and policy_mac
        (a mismatch is POLICY_FAILURE: the host changed the owner's policy).
        """
        command = "LAUNCH_START"
        with self._command() as chip:
            self._ensure_init(chip)
            try:
                guest_policy = GuestPolicy(policy)
            except MalformedInput:
                raise FirmwareError(StatusCode.POLICY_FAILURE, command, "reserved policy bits") from None
            if not guest_policy.firmware_allowed(chip.config.api_major, chip.config.api_minor):
                raise FirmwareError(
                    StatusCode.POLICY_FAILURE,
                    command,
                    f"policy needs API {guest_policy.api_major_min}.{guest_policy.api_minor_min}",
                )
            if guest_policy.requires_es and not chip.config.es_enabled:
                raise FirmwareError(StatusCode.POLICY_FAILURE, command, "SEV-ES is not enabled")
            if len(godh) != CERT_SIZE or len(session) != SESSION_BLOB_SIZE:
                raise FirmwareError(StatusCode.INVALID_LENGTH, command, "GODH is 0x824 B, session 128 B")
            asid = self._allocate_asid(chip, guest_policy.requires_es)
            try:
                godh_cert = SEVCertificate.from_bytes(godh)
                blob = SessionBlob.from_bytes(session)
            except MalformedInput as exc:
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, exc.reason.value) from None
            assert chip.pdh is not None
            try:
                keys = unwrap_session(chip.pdh.private_key(), godh_cert, blob, guest_policy)
            except MalformedInput as exc:
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, exc.reason.value) from None
            except VerificationFailed as exc:
                if exc.reason is Reason.BAD_POLICY_MAC:
                    raise FirmwareError(StatusCode.POLICY_FAILURE, command, "policy_mac mismatch") from None
                raise FirmwareError(StatusCode.BAD_MEASUREMENT, command, "wrap_mac mismatch") from None
            handle = chip.next_handle
            chip.next_handle += 1
            self._sweep_logs(chip)
            LaunchLog(self._log_path(handle)).delete()
            chip.guests[handle] = Guest(
                handle=handle,
                asid=asid,
                policy=guest_policy.value,
                gstate=GuestState.LUPDATE,
                tek=keys.tek,
                tik=keys.tik,
            )
            self._save(chip)
            return handle

    @staticmethod
    def _check_block(command: str, gpa: int, length: int) -> None:
        # The firmware works in 16-byte AES blocks: lengths and addresses must be 16-byte aligned.
        if length == 0 or length % 16:
            raise FirmwareError(
                StatusCode.INVALID_LENGTH, command, f"length {length} is not a multiple of 16"
            )
        if gpa < 0 or gpa % 16 or gpa + length > 1 << 64:
            raise FirmwareError(
                StatusCode.INVALID_ADDRESS, command, f"address {gpa:#x} is not 16-byte aligned"
            )

    def launch_update_data(self, handle: int, gpa: int, data: bytes) -> None:
        """LAUNCH_UPDATE_DATA (55766 chapter 6): encrypt `data` into guest memory at `gpa` and extend
        the launch digest with the plaintext. Only in LUPDATE."""
        command = "LAUNCH_UPDATE_DATA"
        with self._command() as chip:
            guest = self._guest(chip, handle, command, GuestState.LUPDATE)
            self._check_block(command, gpa, len(data))
            offset = guest.log_len
            guest.log_len = LaunchLog(self._log_path(handle)).append(offset, bytes(data))
            guest.regions.append((gpa, offset, len(data)))
            self._save(chip)

    def launch_update_vmsa(self, handle: int, data: bytes) -> None:
        """LAUNCH_UPDATE_VMSA (55766 chapter 6): encrypt a vCPU's VMSA page and extend the launch digest
        with it. Only for an SEV-ES guest (policy ES, else POLICY_FAILURE) in LUPDATE."""
        command = "LAUNCH_UPDATE_VMSA"
        with self._command() as chip:
            guest = self._guest(chip, handle, command, GuestState.LUPDATE)
            if not guest.es:
                raise FirmwareError(StatusCode.POLICY_FAILURE, command, "the guest policy is not SEV-ES")
            if len(data) != VMSA_SIZE:
                raise FirmwareError(StatusCode.INVALID_LENGTH, command, f"a VMSA is {VMSA_SIZE} bytes")
            guest.log_len = LaunchLog(self._log_path(handle)).append(guest.log_len, bytes(data))
            guest.vmsa_count += 1
            self._save(chip)

    def _launch_digest(self, guest: Guest) -> LaunchDigest:
        """SHA-256 over every LAUNCH_UPDATE_DATA/VMSA plaintext in order (PROTOCOL.md section 5). The
        firmware extends it per command; the emulator replays the committed log into the same hash so
        that the digest survives process boundaries."""
        hasher = hashes.Hash(hashes.SHA256())
        for chunk in LaunchLog(self._log_path(guest.handle)).chunks(guest.log_len):
            hasher.update(chunk)
        return LaunchDigest(hasher.finalize())

    def launch_measure(self, handle: int) -> bytes:
        """LAUNCH_MEASURE (55766 chapter 6): measure ‖ mnonce with a fresh mnonce, LUPDATE → LSECRET.

        measure = HMAC-SHA256(TIK, 0x04 ‖ api ‖ build ‖ policy ‖ launch digest ‖ mnonce)."""
        command = "LAUNCH_MEASURE"
        with self._command() as chip:
            guest = self._guest(chip, handle, command, GuestState.LUPDATE)
            digest = self._launch_digest(guest)
            mnonce = secrets.token_bytes(MNONCE_SIZE)
            measure = compute_measure(
                guest.tik,
                api_major=chip.config.api_major,
                api_minor=chip.config.api_minor,
                build_id=chip.config.build,
                policy=guest.policy,
                launch_digest=digest,
                mnonce=mnonce,
            )
            guest.launch_digest, guest.measure, guest.mnonce = bytes(digest), bytes(measure), mnonce
            guest.gstate = GuestState.LSECRET
            self._save(chip)
            return bytes(measure) + mnonce

    def launch_secret(self, handle: int, header: bytes, payload: bytes, gpa: int) -> None:
        """LAUNCH_SECRET (55766 chapter 6): check the header MAC, which binds the secret to this
        launch's measure (a mismatch is BAD_MEASUREMENT), then decrypt with the TEK into guest memory at
        `gpa`. Only in LSECRET: after LAUNCH_FINISH the guest runs and no secret can be injected."""
        command = "LAUNCH_SECRET"
        with self._command() as chip:
            guest = self._guest(chip, handle, command, GuestState.LSECRET)
            if len(header) != SECRET_HEADER_SIZE:
                raise FirmwareError(StatusCode.INVALID_LENGTH, command, "the header is 52 bytes")
            self._check_block(command, gpa, len(payload))
            assert guest.measure is not None
            try:
                plaintext = open_secret(
                    guest.keys,
                    guest.measure,
                    SecretHeader.from_bytes(header),
                    bytes(payload),
                    api_major=chip.config.api_major,
                    api_minor=chip.config.api_minor,
                )
            except VerificationFailed:
                raise FirmwareError(StatusCode.BAD_MEASUREMENT, command, "secret MAC mismatch") from None
            except (Unsupported, MalformedInput) as exc:
                raise FirmwareError(StatusCode.INVALID_PARAM, command, exc.reason.value) from None
            guest.secrets.append((gpa, plaintext))
            self._save(chip)

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH (55766 chapter 6): LSECRET → RUNNING; the launch can no longer change."""
        with self._command() as chip:
            guest = self._guest(chip, handle, "LAUNCH_FINISH", GuestState.LSECRET)
            guest.gstate = GuestState.RUNNING
            self._save(chip)

    def attestation(self, handle: int, mnonce: bytes) -> bytes:
        """ATTESTATION (55766, API 0.23 and later): a report of the launch digest and policy with the
        caller's mnonce, signed by the PEK (PROTOCOL.md section 10). INVALID_COMMAND before API 0.23."""
        command = "ATTESTATION"
        with self._command() as chip:
            if chip.config.api_version < ATTESTATION_MIN_API:
                raise FirmwareError(StatusCode.INVALID_COMMAND, command, "needs firmware API 0.23")
            guest = self._guest(chip, handle, command, GuestState.LSECRET, GuestState.RUNNING)
            if len(mnonce) != MNONCE_SIZE:
                raise FirmwareError(StatusCode.INVALID_LENGTH, command, "mnonce is 16 bytes")
            assert guest.launch_digest is not None and chip.pek is not None
            report = AttestationReport(
                mnonce=MNonce(bytes(mnonce)),
                launch_digest=LaunchDigest(guest.launch_digest),
                policy=guest.policy,
            ).sign(chip.pek.private_key())
            return report.to_bytes()

    def decommission(self, handle: int) -> None:
        """DECOMMISSION (55766 chapter 6): destroy the guest context and free its ASID. The state commit
        comes first; a crash before the log is deleted leaves an orphan the next LAUNCH_START sweeps."""
        with self._command() as chip:
            self._guest(chip, handle, "DECOMMISSION")
            del chip.guests[handle]
            self._save(chip)
            LaunchLog(self._log_path(handle)).delete()

    # -- emulator only -------------------------------------------------------------------------------

    def read_guest_memory(self, handle: int, gpa: int, length: int) -> bytes:
        """What the guest would read at [gpa, gpa+length): LAUNCH_UPDATE_DATA and LAUNCH_SECRET regions
        in the order they were written, zeros elsewhere. For tests and the emulated hypervisor."""
        if length < 0 or gpa < 0:
            raise ValueError("gpa and length must be non-negative")
        with self._command() as chip:
            guest = self._guest(chip, handle, "READ_GUEST_MEMORY")
            out = bytearray(length)
            log = LaunchLog(self._log_path(handle))
            writes: list[tuple[int, int, Any]] = [(r[0], r[2], (r[1],)) for r in guest.regions]
            writes += [(s_gpa, len(data), data) for s_gpa, data in guest.secrets]
            # Data regions were all written before any secret (LUPDATE precedes LSECRET).
            for start, size, source in writes:
                lo, hi = max(start, gpa), min(start + size, gpa + length)
                if lo >= hi:
                    continue
                if isinstance(source, bytes):
                    chunk = source[lo - start : hi - start]
                else:
                    chunk = log.read(source[0] + (lo - start), hi - lo)
                out[lo - gpa : hi - gpa] = chunk
            return bytes(out)

    def guest_info(self, handle: int) -> dict[str, int | str]:
        """GUEST_STATUS-like view (55766 chapter 6 "GUEST_STATUS"): handle, policy, ASID, state."""
        with self._command() as chip:
            guest = self._guest(chip, handle, "GUEST_STATUS")
            return {
                "handle": guest.handle,
                "policy": guest.policy,
                "asid": guest.asid,
                "state": guest.gstate.name,
            }

    def guest_handles(self) -> list[int]:
        with self._command() as chip:
            return sorted(chip.guests)
