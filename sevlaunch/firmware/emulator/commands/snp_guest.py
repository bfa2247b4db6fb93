"""The SEV-SNP guest commands (SNP ABI, publication 56860, chapter 8 "Guest Management"): SNP_LAUNCH_START,
SNP_LAUNCH_UPDATE, SNP_LAUNCH_FINISH, SNP_DECOMMISSION, and the guest request for an attestation report
(MSG_REPORT_REQ / MSG_REPORT_RSP) that a guest sends through SNP_GUEST_REQUEST.

The launch digest is built as the firmware builds it, one PAGE_INFO per page (`sevlaunch.snp.gctx.extend`,
the protocol core's own step), and persisted after every command: the SHA-384 chain needs no log.

Not emulated: the guest message encryption (AES-256-GCM under the VMPCKs of the secrets page) and the
page-state changes of the RMP. An emulated guest calls `snp_guest_request` with the plaintext request, as
its kernel would hand it to the PSP after decryption.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware.emulator.chip import find_guest
from sevlaunch.firmware.emulator.codec import Chip
from sevlaunch.firmware.emulator.commands.snp import SnpPlatformCommands
from sevlaunch.firmware.emulator.snp_keys import derive_vcek, derive_vlek
from sevlaunch.firmware.emulator.snp_state import (
    HOST_DATA_SIZE,
    PRODUCTS,
    REPORT_ID_SIZE,
    SnpGuest,
    SnpGuestState,
    SnpPlatform,
)
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.guest.source import GuestReport
from sevlaunch.sev.errors import MalformedInput, Unsupported, VerificationFailed
from sevlaunch.snp.gctx import PAGE_SIZE, PageType, extend
from sevlaunch.snp.idblock import IdAuth, IdBlock
from sevlaunch.snp.policy import PlatformInfo, PolicyFlag, SnpGuestPolicy
from sevlaunch.snp.report import AttestationReport, SigningKey

#: MSG_REPORT_REQ (56860 table "MSG_REPORT_REQ Message Structure"): REPORT_DATA[64], VMPL u32, KEY_SEL in
#: bits 1:0 of the next u32 (the rest reserved), reserved to 0x60. Linux's `snp_report_req` is the same
#: 96 bytes with KEY_SEL inside its `rsvd`.
MSG_REPORT_REQ: Final = struct.Struct("<64sII24s")
MSG_REPORT_REQ_SIZE: Final = MSG_REPORT_REQ.size
KEY_SEL_AUTO: Final = 0  # the VLEK when one is loaded, else the VCEK
KEY_SEL_VCEK: Final = 1
KEY_SEL_VLEK: Final = 2
_KEY_SEL_MASK: Final = 0x3
_MAX_VMPL: Final = 3
# REPORT_ID_MA of a guest without a migration agent.
_NO_MA: Final = b"\xff" * REPORT_ID_SIZE


def encode_report_request(report_data: bytes, vmpl: int = 0, key_sel: int = KEY_SEL_AUTO) -> bytes:
    """A MSG_REPORT_REQ (what the guest sends)."""
    if len(report_data) != 64:
        raise ValueError("REPORT_DATA is 64 bytes")
    return MSG_REPORT_REQ.pack(report_data, vmpl, key_sel, bytes(24))


class SnpGuestCommands(SnpPlatformCommands):
    """SNP guest launch, the guest's report request, and SNP_DECOMMISSION."""

    def _snp_guest(self, chip: Chip, handle: int, command: str, *states: SnpGuestState) -> SnpGuest:
        return find_guest(self._snp(chip).guests, handle, command, states, what="SNP guest")

    # -- launch ---------------------------------------------------------------------------------------

    def snp_launch_start(self, policy: int) -> int:
        """SNP_LAUNCH_START (56860 section 8.16): a new guest context for the 64-bit guest `policy`.

        POLICY_FAILURE when the policy is malformed (bit 17 clear, a reserved bit set), asks for an ABI
        newer than this firmware, forbids SMT on a platform with SMT enabled, asks for a single socket on
        a multi-socket platform, or asks for a feature the platform lacks (AES-256-XTS before Turin, RAPL
        disabled, ciphertext hiding). RESOURCE_LIMIT when no SEV-ES/SNP ASID is free."""
        command = "SNP_LAUNCH_START"
        with self._command() as chip:
            snp = self._snp(chip)
            snp.initialized = True  # Linux initialises SNP before any guest exists
            try:
                guest_policy = SnpGuestPolicy.from_int(policy)
            except MalformedInput as exc:
                raise FirmwareError(StatusCode.POLICY_FAILURE, command, exc.detail) from None
            _check_policy(chip, snp, guest_policy, command)
            asid = _allocate_snp_asid(chip, command)
            handle = chip.next_handle
            chip.next_handle += 1
            snp.guests[handle] = SnpGuest(
                handle=handle,
                asid=asid,
                policy=policy,
                gstate=SnpGuestState.LAUNCH,
                launch_tcb=snp.current_tcb,
                report_id=secrets.token_bytes(REPORT_ID_SIZE),
            )
            self._save(chip)
            return handle

    def snp_launch_update(
        self, handle: int, gpa: int, page_type: PageType | int, data: bytes | None = None, *, length: int = 0
    ) -> None:
        """SNP_LAUNCH_UPDATE (56860 section 8.17) over whole pages from `gpa`, one PAGE_INFO per page.

        NORMAL and VMSA pages are measured by content and need `data`; ZERO, UNMEASURED, SECRETS and CPUID
        pages contribute zeros (their `data`, if any, is the host's and not measured: the firmware zeroes
        a ZERO page and writes the SECRETS page itself). `length` sizes a range given without data.
        INVALID_PARAM for an unknown page type or missing data, INVALID_LENGTH for a partial page,
        INVALID_ADDRESS for an unaligned address."""
        command = "SNP_LAUNCH_UPDATE"
        try:
            kind = PageType(page_type)
        except ValueError:
            raise FirmwareError(StatusCode.INVALID_PARAM, command, f"page type {page_type!r}") from None
        if kind.has_contents and data is None:
            raise FirmwareError(StatusCode.INVALID_PARAM, command, f"a {kind.name} page needs its contents")
        size = len(data) if data is not None else (length or PAGE_SIZE)
        if data is not None and length and length != len(data):
            raise FirmwareError(StatusCode.INVALID_LENGTH, command, "length disagrees with the data")
        if size <= 0 or size % PAGE_SIZE:
            raise FirmwareError(StatusCode.INVALID_LENGTH, command, f"{size:#x} bytes is not whole pages")
        if gpa < 0 or gpa % PAGE_SIZE or gpa + size > 1 << 64:
            raise FirmwareError(StatusCode.INVALID_ADDRESS, command, f"GPA {gpa:#x} is not a page address")
        with self._command() as chip:
            guest = self._snp_guest(chip, handle, command, SnpGuestState.LAUNCH)
            digest = guest.digest
            view = memoryview(data) if data is not None and kind.has_contents else None
            for index in range(size // PAGE_SIZE):
                at = index * PAGE_SIZE
                page = None if view is None else view[at : at + PAGE_SIZE]
                digest = extend(digest, kind, gpa + at, page)
            guest.digest = bytes(digest)
            guest.pages += size // PAGE_SIZE
            if kind is PageType.VMSA:
                guest.vmsa_count += size // PAGE_SIZE
            elif kind is PageType.SECRETS:
                guest.secrets_gpas.append(gpa)
            elif kind is PageType.CPUID:
                guest.cpuid_gpas.append(gpa)
            self._save(chip)

    def snp_launch_finish(
        self,
        handle: int,
        *,
        id_block: bytes | None = None,
        id_auth: bytes | None = None,
        host_data: bytes = bytes(HOST_DATA_SIZE),
        author_key_en: bool = False,
    ) -> None:
        """SNP_LAUNCH_FINISH (56860 section 8.18): LAUNCH -> RUNNING, with an optional ID block.

        With an ID block the firmware checks, in order: both blobs parse (INVALID_PARAM), the ID key signed
        the ID block and, with `author_key_en`, the author key signed the ID key (BAD_SIGNATURE); the ID
        block's digest is the launch digest (BAD_MEASUREMENT) and its policy the guest's (POLICY_FAILURE).
        Then the family and image ids, guest SVN and key digests are kept for the reports, as is
        HOST_DATA (32 bytes)."""
        command = "SNP_LAUNCH_FINISH"
        if len(host_data) != HOST_DATA_SIZE:
            raise FirmwareError(StatusCode.INVALID_LENGTH, command, "HOST_DATA is 32 bytes")
        if (id_block is None) != (id_auth is None):
            raise FirmwareError(StatusCode.INVALID_PARAM, command, "an ID block needs its ID auth and back")
        if author_key_en and id_block is None:
            raise FirmwareError(StatusCode.INVALID_PARAM, command, "AUTHOR_KEY_EN without an ID block")
        block: IdBlock | None = None
        auth: IdAuth | None = None
        if id_block is not None and id_auth is not None:
            try:
                block, auth = IdBlock.from_bytes(id_block), IdAuth.from_bytes(id_auth)
            except (MalformedInput, Unsupported) as exc:
                raise FirmwareError(StatusCode.INVALID_PARAM, command, exc.detail) from None
            try:
                auth.verify(block, author_key_enabled=author_key_en)
            except (VerificationFailed, MalformedInput, Unsupported) as exc:
                raise FirmwareError(StatusCode.BAD_SIGNATURE, command, exc.detail) from None
        with self._command() as chip:
            guest = self._snp_guest(chip, handle, command, SnpGuestState.LAUNCH)
            if block is not None and auth is not None:
                if not hmac.compare_digest(block.launch_digest, guest.digest):
                    raise FirmwareError(
                        StatusCode.BAD_MEASUREMENT, command, "the ID block's digest is not the launch digest"
                    )
                if block.policy != guest.policy:
                    raise FirmwareError(
                        StatusCode.POLICY_FAILURE,
                        command,
                        f"the ID block's policy {block.policy:#x} is not the guest's {guest.policy:#x}",
                    )
                guest.family_id, guest.image_id, guest.guest_svn = (
                    block.family_id,
                    block.image_id,
                    block.guest_svn,
                )
                guest.id_key_digest = auth.id_key_digest
                guest.author_key_digest = auth.author_key_digest if author_key_en else bytes(48)
                guest.author_key_en = author_key_en
            guest.host_data = bytes(host_data)
            guest.gstate = SnpGuestState.RUNNING
            self._save(chip)

    def snp_decommission(self, handle: int) -> None:
        """SNP_DECOMMISSION (56860 section 8.10): destroy the guest context and free its ASID."""
        with self._command() as chip:
            self._snp_guest(chip, handle, "SNP_DECOMMISSION")
            assert chip.snp is not None
            del chip.snp.guests[handle]
            self._save(chip)

    # -- the guest's report request --------------------------------------------------------------------

    def snp_guest_request(self, handle: int, request: bytes) -> bytes:
        """SNP_GUEST_REQUEST carrying MSG_REPORT_REQ: the MSG_REPORT_RSP (status, size, report), as the
        kernel's `snp_report_resp` lays it out. A request the firmware rejects (VMPL above 3, reserved
        bits, KEY_SEL 3) answers status INVALID_PARAM; a VLEK asked for and not usable, INVALID_KEY. The
        guest must be RUNNING (INVALID_GUEST_STATE)."""
        # Imported here: `sevlaunch.guest` imports `sevlaunch.firmware`, so a module-level import would make
        # `import sevlaunch.guest` (before anything imported the firmware package) a circular import.
        from sevlaunch.guest.devsevguest import encode_report_response

        command = "SNP_GUEST_REQUEST"
        if len(request) != MSG_REPORT_REQ_SIZE:
            raise FirmwareError(
                StatusCode.INVALID_LENGTH, command, f"MSG_REPORT_REQ is {MSG_REPORT_REQ_SIZE} B"
            )
        report_data, vmpl, key_word, reserved = MSG_REPORT_REQ.unpack(request)
        key_sel = key_word & _KEY_SEL_MASK
        if vmpl > _MAX_VMPL or key_word & ~_KEY_SEL_MASK or any(reserved) or key_sel == _KEY_SEL_MASK:
            return encode_report_response(b"", StatusCode.INVALID_PARAM)
        with self._command() as chip:
            guest = self._snp_guest(chip, handle, command, SnpGuestState.RUNNING)
            snp = self._snp(chip)
            vlek_ok = snp.vlek is not None and snp.vlek.tcb == snp.reported_tcb
            if key_sel == KEY_SEL_VLEK and not vlek_ok:
                return encode_report_response(b"", StatusCode.INVALID_KEY)
            use_vlek = key_sel == KEY_SEL_VLEK or (key_sel == KEY_SEL_AUTO and vlek_ok)
            report = self._report(chip, snp, guest, report_data, vmpl, use_vlek)
            return encode_report_response(report)

    def _report(
        self, chip: Chip, snp: SnpPlatform, guest: SnpGuest, report_data: bytes, vmpl: int, use_vlek: bool
    ) -> bytes:
        product = chip.config.snp_product
        model = PRODUCTS[product]
        cpuid = model.cpuid if model.report_version >= 3 else (None, None, None)
        signing = SigningKey.VLEK if use_vlek else SigningKey.VCEK
        if snp.mask_chip_key:
            signing = SigningKey.NONE
        report = AttestationReport(
            version=model.report_version,
            guest_svn=guest.guest_svn,
            policy=guest.policy,
            family_id=guest.family_id,
            image_id=guest.image_id,
            vmpl=vmpl,
            current_tcb=snp.current_tcb,
            platform_info=int(PlatformInfo.SMT_EN) if chip.config.smt else 0,
            author_key_en=guest.author_key_en,
            mask_chip_key=snp.mask_chip_key,
            signing_key=signing,
            report_data=bytes(report_data),
            measurement=guest.digest,
            host_data=guest.host_data,
            id_key_digest=guest.id_key_digest,
            author_key_digest=guest.author_key_digest,
            report_id=guest.report_id,
            report_id_ma=_NO_MA,
            reported_tcb=snp.reported_tcb,
            cpuid_fam_id=cpuid[0],
            cpuid_mod_id=cpuid[1],
            cpuid_step=cpuid[2],
            chip_id=bytes(64) if snp.mask_chip_id else chip.chip_id,
            committed_tcb=snp.committed_tcb,
            current_major=snp.current_version[0],
            current_minor=snp.current_version[1],
            current_build=snp.current_version[2],
            committed_major=snp.committed_version[0],
            committed_minor=snp.committed_version[1],
            committed_build=snp.committed_version[2],
            launch_tcb=guest.launch_tcb,
        )
        if signing is SigningKey.NONE:
            return report.to_bytes()  # MASK_CHIP_KEY: the signature stays zero
        key: ec.EllipticCurvePrivateKey
        if use_vlek:
            assert snp.vlek is not None
            key = derive_vlek(snp.vlek.seed)
        else:
            key = derive_vcek(snp.chip_secret, product, snp.reported_tcb)
        return report.signed(key).to_bytes()

    def snp_guest_report(
        self, handle: int, report_data: bytes, vmpl: int = 0, *, key_sel: int = KEY_SEL_AUTO
    ) -> bytes:
        """The 0x4A0-byte report for a guest request; a refused request is a `FirmwareError` with the
        MSG_REPORT_RSP status."""
        from sevlaunch.guest.devsevguest import decode_report_response  # see snp_guest_request

        response = self.snp_guest_request(handle, encode_report_request(report_data, vmpl, key_sel))
        return decode_report_response(response)

    def snp_ext_guest_report(
        self, handle: int, report_data: bytes, vmpl: int = 0, *, key_sel: int = KEY_SEL_AUTO
    ) -> GuestReport:
        """An extended report (SNP_GET_EXT_REPORT): the report and the host's certificate table, if any."""
        report = self.snp_guest_report(handle, report_data, vmpl, key_sel=key_sel)
        return GuestReport(report, self.snp_get_ext_config())

    # -- views ----------------------------------------------------------------------------------------

    def snp_guest_info(self, handle: int) -> dict[str, int | str]:
        """SNP_GUEST_STATUS-like view: handle, policy, ASID, state, pages and VMSAs measured."""
        with self._command() as chip:
            guest = self._snp_guest(chip, handle, "SNP_GUEST_STATUS")
            return {
                "handle": guest.handle,
                "policy": guest.policy,
                "asid": guest.asid,
                "state": guest.gstate.name,
                "pages": guest.pages,
                "vmsas": guest.vmsa_count,
            }

    def snp_guest_handles(self) -> list[int]:
        with self._command() as chip:
            return sorted(chip.snp.guests) if chip.snp is not None else []

    def snp_launch_digest(self, handle: int) -> bytes:
        """The guest's launch digest so far (its MEASUREMENT once finished)."""
        with self._command() as chip:
            return self._snp_guest(chip, handle, "SNP_GUEST_STATUS").digest


class EmulatedSnpGuest:
    """An SNP guest of an emulated chip as a `GuestReportSource`: the guest-request entry point an
    emulated guest agent calls (the extended form, with the host's certificate table)."""

    def __init__(self, firmware: SnpGuestCommands, handle: int) -> None:
        self.firmware = firmware
        self.handle = handle

    def __repr__(self) -> str:
        return f"EmulatedSnpGuest(handle={self.handle})"

    def get_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        return self.firmware.snp_ext_guest_report(self.handle, report_data, vmpl)


def _check_policy(chip: Chip, snp: SnpPlatform, policy: SnpGuestPolicy, command: str) -> None:
    config = chip.config
    api = snp.current_version[:2]
    refusals = []
    if policy.abi > api:
        refusals.append(f"ABI {policy.abi_major}.{policy.abi_minor} above the firmware's {api[0]}.{api[1]}")
    if not policy.smt and config.smt:
        refusals.append("SMT not allowed but enabled on the platform")
    if policy.single_socket and config.sockets > 1:
        refusals.append(f"single socket required on a {config.sockets}-socket platform")
    if PolicyFlag.MEM_AES_256_XTS in policy and not PRODUCTS[config.snp_product].aes_256_xts:
        refusals.append("AES-256-XTS is not supported")
    if PolicyFlag.RAPL_DIS in policy:
        refusals.append("RAPL is not disabled on the platform")
    if PolicyFlag.CIPHERTEXT_HIDING in policy:
        refusals.append("ciphertext hiding is not enabled on the platform")
    if refusals:
        raise FirmwareError(StatusCode.POLICY_FAILURE, command, "; ".join(refusals))


def _allocate_snp_asid(chip: Chip, command: str) -> int:
    """SNP guests take ASIDs of the SEV-ES range (1..max_es_guests), as SEV-ES guests do."""
    used = chip.used_asids()
    for asid in range(1, chip.config.max_es_guests + 1):
        if asid not in used:
            return asid
    raise FirmwareError(
        StatusCode.RESOURCE_LIMIT, command, f"all {chip.config.max_es_guests} SEV-ES/SNP ASIDs in use"
    )


__all__ = [
    "KEY_SEL_AUTO",
    "KEY_SEL_VCEK",
    "KEY_SEL_VLEK",
    "MSG_REPORT_REQ_SIZE",
    "EmulatedSnpGuest",
    "SnpGuestCommands",
    "encode_report_request",
]
