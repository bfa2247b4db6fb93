"""The SEV-SNP platform commands (SNP ABI, publication 56860, chapter 8): SNP_INIT, SNP_PLATFORM_STATUS,
SNP_COMMIT, SNP_SET_CONFIG, SNP_VLEK_LOAD, the host's certificate table for extended guest requests, and
what only an emulator offers: a firmware update, and AMD's side of the keys (the VCEK/VLEK certificates
its KDS would issue, the emulated SNP root to trust explicitly).

TCB rules the firmware keeps (PROTOCOL.md section 11): reported <= committed <= current. A firmware update
changes the current TCB only and may not go below the committed one (BAD_SVN: anti-rollback); SNP_COMMIT
makes the current TCB (and firmware version) the committed and the reported one; SNP_SET_CONFIG may set
the reported TCB to any value not above the current one (INVALID_PARAM otherwise). The VCEK is derived
from the chip secret and the reported TCB, so it changes exactly when the reported TCB does.

`snp_platform_status` answers with the kernel's `SnpPlatformStatus` (`sevlaunch.firmware.devsev_snp`),
so a service holds the emulator or `DevSevSnp` alike; `snp_tcb_status` adds what only the firmware's
reports show (the committed TCB and versions).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevlaunch.firmware.devsev_snp import (
    WRAPPED_VLEK_HASHSTICK_SIZE,
    SnpConfig,
    SnpPlatformState,
    SnpPlatformStatus,
)
from sevlaunch.firmware.emulator.chip import ChipBase
from sevlaunch.firmware.emulator.codec import Chip
from sevlaunch.firmware.emulator.snp_keys import (
    derive_vcek,
    derive_vlek,
    has_snp_root,
    load_snp_root,
    save_snp_root,
    vek_cert_path,
)
from sevlaunch.firmware.emulator.snp_state import (
    CHIP_SECRET_SIZE,
    VLEK_SEED_SIZE,
    LoadedVlek,
    SnpPlatform,
)
from sevlaunch.firmware.state import atomic_write
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.errors import MalformedInput
from sevlaunch.snp.certs import TrustedRoot
from sevlaunch.snp.certtable import CertTable
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.tcb import Product, TcbVersion

# The emulated KDS wraps a VLEK for one chip: AES-256-GCM under a key only that chip derives. The layout is
# the emulator's own (AMD's hashstick is opaque); only its size is AMD's.
_HASHSTICK_HEAD = struct.Struct("<12sQ")  # nonce, TCB
_HASHSTICK_INFO = b"sevlaunch emulated VLEK wrapping key"
_CSP_ID_MAX = WRAPPED_VLEK_HASHSTICK_SIZE - _HASHSTICK_HEAD.size - VLEK_SEED_SIZE - 1 - 16


@dataclass(frozen=True)
class SnpTcbStatus:
    """The TCBs and versions of the emulated SNP firmware, decoded for its product."""

    product: Product
    current: TcbVersion
    committed: TcbVersion
    reported: TcbVersion
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]


class SnpPlatformCommands(ChipBase):
    """SNP platform commands and the emulated AMD side of the SNP keys."""

    # -- the SNP state and root ------------------------------------------------------------------

    def snp_product(self) -> Product:
        return self.config.snp_product

    def _snp(self, chip: Chip) -> SnpPlatform:
        """The chip's SNP state. A chip made before the emulator spoke SNP gets it on first use, saved at
        once (under the command's lock): its chip secret must never differ between two commands."""
        self._ensure_snp_root()
        if chip.snp is None:
            chip.snp = SnpPlatform.new(chip.config.snp_product, secrets.token_bytes(CHIP_SECRET_SIZE))
            self._save(chip)
        return chip.snp

    def _ensure_snp_root(self) -> EmulatedSnpRoot:
        # Under the chip lock: only one process creates the root. RSA-4096 key generation takes seconds,
        # so a chip gets its SNP root on first SNP use, or from `snp_root=` at construction.
        if self._snp_root is None:
            if not has_snp_root(self.state_dir):
                given = self._snp_root_given or EmulatedSnpRoot.generate(
                    self.config.snp_product, not_before=_start_of_day()
                )
                if given.product is not self.config.snp_product:
                    raise ValueError(f"an SNP root of {given.product.value} for a {self.config.product} chip")
                save_snp_root(self.state_dir, given)
            self._snp_root = load_snp_root(self.state_dir, self.config.snp_product)
        return self._snp_root

    def _tcb(self, raw: int) -> TcbVersion:
        return TcbVersion.from_raw(raw, self.config.snp_product)

    # -- SNP platform commands ----------------------------------------------------------------------

    def snp_init(self) -> None:
        """SNP_INIT (56860 section 8.8): UNINIT -> INIT; INVALID_PLATFORM_STATE if already initialised.
        Guest commands initialise SNP on demand, as Linux's ccp driver does at probe."""
        with self._command() as chip:
            snp = self._snp(chip)
            if snp.initialized:
                raise FirmwareError(
                    StatusCode.INVALID_PLATFORM_STATE, "SNP_INIT", "SNP is already initialised"
                )
            snp.initialized = True
            self._save(chip)

    def snp_platform_status(self) -> SnpPlatformStatus:
        """SNP_PLATFORM_STATUS (56860 section 8.3), in the kernel's `sev_user_data_snp_status` form."""
        with self._command() as chip:
            snp = self._snp(chip)
            return SnpPlatformStatus(
                api_major=snp.current_version[0],
                api_minor=snp.current_version[1],
                state=SnpPlatformState.INIT if snp.initialized else SnpPlatformState.UNINIT,
                is_rmp_initialized=snp.initialized,
                build_id=snp.current_version[2],
                mask_chip_id=snp.mask_chip_id,
                mask_chip_key=snp.mask_chip_key,
                vlek_en=snp.vlek is not None,
                feature_info=False,
                rapl_dis=False,
                ciphertext_hiding_cap=False,
                ciphertext_hiding_en=False,
                guest_count=len(snp.guests),
                current_tcb=snp.current_tcb,
                reported_tcb=snp.reported_tcb,
            )

    def snp_tcb_status(self) -> SnpTcbStatus:
        with self._command() as chip:
            snp = self._snp(chip)
            return SnpTcbStatus(
                product=chip.config.snp_product,
                current=self._tcb(snp.current_tcb),
                committed=self._tcb(snp.committed_tcb),
                reported=self._tcb(snp.reported_tcb),
                current_version=snp.current_version,
                committed_version=snp.committed_version,
            )

    def snp_commit(self) -> None:
        """SNP_COMMIT (56860 section 8.6): the current firmware and TCB become the committed ones (no
        rollback below them any more), and the reported TCB follows."""
        with self._command() as chip:
            snp = self._snp(chip)
            snp.committed_tcb = snp.reported_tcb = snp.current_tcb
            snp.committed_version = snp.current_version
            self._save(chip)

    def snp_set_config(self, config: SnpConfig | bytes) -> None:
        """SNP_SET_CONFIG (56860 section 8.7): the reported TCB and chip-id / chip-key masking.

        INVALID_PARAM for reserved bits, a TCB that is not this product's layout, or a reported TCB above
        the current one in any component."""
        command = "SNP_SET_CONFIG"
        try:
            cfg = config if isinstance(config, SnpConfig) else SnpConfig.from_bytes(bytes(config))
            reported = self._tcb(cfg.reported_tcb)
        except MalformedInput as exc:
            raise FirmwareError(StatusCode.INVALID_PARAM, command, exc.detail) from None
        with self._command() as chip:
            snp = self._snp(chip)
            above = _above(reported, self._tcb(snp.current_tcb))
            if above:
                raise FirmwareError(
                    StatusCode.INVALID_PARAM,
                    command,
                    f"reported TCB above the current one ({', '.join(above)})",
                )
            snp.reported_tcb = reported.raw
            snp.mask_chip_id, snp.mask_chip_key = cfg.mask_chip_id, cfg.mask_chip_key
            self._save(chip)

    def snp_firmware_update(self, tcb: TcbVersion, *, build: int | None = None) -> None:
        """An emulated firmware update (DOWNLOAD_FIRMWARE_EX): the current TCB and build change, the
        committed and reported TCBs stay until SNP_COMMIT. A TCB below the committed one in any component
        is refused with BAD_SVN (the firmware's anti-rollback), another product's TCB with INVALID_PARAM."""
        command = "DOWNLOAD_FIRMWARE_EX"
        if tcb.product is not self.config.snp_product:
            raise FirmwareError(
                StatusCode.INVALID_PARAM,
                command,
                f"a {tcb.product.value} TCB for a {self.config.product} chip",
            )
        if build is not None and not 0 <= build <= 0xFF:
            raise FirmwareError(StatusCode.INVALID_PARAM, command, "build must be 0..255")
        with self._command() as chip:
            snp = self._snp(chip)
            below = _above(self._tcb(snp.committed_tcb), tcb)
            if below:
                raise FirmwareError(
                    StatusCode.BAD_SVN, command, f"below the committed TCB ({', '.join(below)})"
                )
            major, minor, old_build = snp.current_version
            snp.current_tcb = tcb.raw
            snp.current_version = (major, minor, build if build is not None else (old_build + 1) & 0xFF)
            self._save(chip)

    def snp_vlek_load(self, wrapped_hashstick: bytes) -> None:
        """SNP_VLEK_LOAD (56860 section 8.x): a VLEK wrapped for this chip by the (emulated) KDS.
        INVALID_LENGTH for a wrong size, INVALID_KEY when it is not wrapped for this chip."""
        command = "SNP_VLEK_LOAD"
        if len(wrapped_hashstick) != WRAPPED_VLEK_HASHSTICK_SIZE:
            raise FirmwareError(
                StatusCode.INVALID_LENGTH, command, f"a hashstick is {WRAPPED_VLEK_HASHSTICK_SIZE} B"
            )
        with self._command() as chip:
            snp = self._snp(chip)
            nonce, tcb_raw = _HASHSTICK_HEAD.unpack_from(wrapped_hashstick)
            try:
                plain = AESGCM(_wrap_key(snp.chip_secret)).decrypt(
                    nonce,
                    wrapped_hashstick[_HASHSTICK_HEAD.size :],
                    wrapped_hashstick[: _HASHSTICK_HEAD.size],
                )
            except InvalidTag:
                raise FirmwareError(StatusCode.INVALID_KEY, command, "not wrapped for this chip") from None
            seed, csp_len = plain[:VLEK_SEED_SIZE], plain[VLEK_SEED_SIZE]
            csp_id = plain[VLEK_SEED_SIZE + 1 : VLEK_SEED_SIZE + 1 + csp_len].decode("ascii", "replace")
            snp.vlek = LoadedVlek(seed=seed, tcb=tcb_raw, csp_id=csp_id)
            self._save(chip)

    def snp_set_ext_config(self, cert_table: bytes | None) -> None:
        """The host's certificate table, given to guests with extended reports (what `snphost import`
        installs; Linux's SNP_SET_EXT_CONFIG before 6.11). Must parse as a certificate table
        (INVALID_PARAM otherwise); None removes it."""
        if cert_table is not None:
            try:
                CertTable.from_bytes(bytes(cert_table))
            except MalformedInput as exc:
                raise FirmwareError(StatusCode.INVALID_PARAM, "SNP_SET_EXT_CONFIG", exc.detail) from None
        with self._command() as chip:
            self._snp(chip).cert_table = None if cert_table is None else bytes(cert_table)
            self._save(chip)

    def snp_get_ext_config(self) -> bytes | None:
        with self._command() as chip:
            snp = chip.snp
            return snp.cert_table if snp is not None else None

    # -- AMD's side: what the KDS issues for this chip ------------------------------------------------

    def snp_root_pem(self) -> bytes:
        """The emulated ARK, ASK and ASVK (PEM): the root a verifier must be given explicitly."""
        root = self._ensure_root_locked()
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root.ark, root.ask, root.asvk))

    def snp_trusted_root(self) -> TrustedRoot:
        """The emulated root as `sevlaunch.snp` takes an explicit extra root."""
        return self._ensure_root_locked().trusted_root()

    def snp_cert_chain_pem(self, *, vlek: bool = False) -> bytes:
        """ASK (or ASVK) then ARK, PEM: what KDS's `cert_chain` serves."""
        return self._ensure_root_locked().chain_pem(vlek=vlek)

    def snp_crl_der(self) -> bytes:
        """The ARK's CRL (DER; nothing revoked), as KDS's `crl` serves it."""
        return self._ensure_root_locked().crl([]).public_bytes(serialization.Encoding.DER)

    def snp_hwid(self) -> bytes:
        """The chip id as KDS addresses this chip (8 bytes on Turin, else 64)."""
        chip_id = bytes(self._chip_id())
        return chip_id[:8] if self.config.snp_product is Product.TURIN else chip_id

    def snp_vcek_der(self, tcb: TcbVersion | None = None) -> bytes:
        """The chip's VCEK certificate (DER) for `tcb` (default: the reported TCB), issued by the
        emulated ASK with AMD's extensions, as KDS serves it; issued once per TCB and kept."""
        with self._command() as chip:
            snp = self._snp(chip)
            if tcb is None:
                tcb = self._tcb(snp.reported_tcb)
            if tcb.product is not chip.config.snp_product:
                raise ValueError(f"a {tcb.product.value} TCB for a {chip.config.product} chip")
            path = vek_cert_path(self.state_dir, "vcek", tcb.raw)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                pass
            key = derive_vcek(snp.chip_secret, chip.config.snp_product, tcb.raw)
            cert = self._ensure_snp_root().issue_vcek(
                key.public_key(), chip.chip_id, tcb, not_before=_start_of_day()
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            path.parent.mkdir(exist_ok=True, mode=0o755)
            atomic_write(path, der, mode=0o644)
            return der

    def snp_vlek_hashstick(self, csp_id: str, tcb: TcbVersion | None = None) -> bytes:
        """A VLEK for cloud provider `csp_id` at `tcb` (default: the reported TCB), wrapped for this chip:
        the emulated KDS's answer to a provider's VLEK request, for SNP_VLEK_LOAD."""
        raw_csp = csp_id.encode("ascii")
        if not 0 < len(raw_csp) <= _CSP_ID_MAX:
            raise ValueError(f"csp_id must be 1..{_CSP_ID_MAX} ASCII characters")
        with self._command() as chip:
            snp = self._snp(chip)
            tcb_raw = (tcb or self._tcb(snp.reported_tcb)).raw
            head = _HASHSTICK_HEAD.pack(secrets.token_bytes(12), tcb_raw)
            size = WRAPPED_VLEK_HASHSTICK_SIZE - _HASHSTICK_HEAD.size - 16
            plain = secrets.token_bytes(VLEK_SEED_SIZE) + bytes([len(raw_csp)]) + raw_csp
            plain += bytes(size - len(plain))
            sealed = AESGCM(_wrap_key(snp.chip_secret)).encrypt(head[:12], plain, head)
            return head + sealed

    def snp_vlek_der(self) -> bytes:
        """The certificate of the loaded VLEK (DER), issued by the emulated ASVK; ValueError if none."""
        with self._command() as chip:
            snp = self._snp(chip)
            if snp.vlek is None:
                raise ValueError("no VLEK is loaded")
            vlek = snp.vlek
            tcb = self._tcb(vlek.tcb)
            cert = self._ensure_snp_root().issue_vlek(
                derive_vlek(vlek.seed).public_key(), tcb, vlek.csp_id, not_before=_start_of_day()
            )
            return cert.public_bytes(serialization.Encoding.DER)

    def _ensure_root_locked(self) -> EmulatedSnpRoot:
        if self._snp_root is not None:
            return self._snp_root
        with self._command():
            return self._ensure_snp_root()

    def _chip_id(self) -> bytes:
        with self._command() as chip:
            return chip.chip_id


def _above(tcb: TcbVersion, limit: TcbVersion) -> list[str]:
    """The components of `tcb` above `limit`'s, as 'name value>limit' strings."""
    mine, theirs = tcb.components(), limit.components()
    return [f"{n} {mine[n]}>{theirs[n]}" for n in mine if mine[n] > theirs[n]]


def _wrap_key(chip_secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA384(), length=32, salt=None, info=_HASHSTICK_INFO).derive(chip_secret)


def _start_of_day() -> datetime:
    # A VEK's validity starts at the day it was first issued: every process issues the same window.
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


__all__ = ["SnpPlatformCommands", "SnpTcbStatus"]
