"""The platform commands (AMD publication 55766 chapter 5): the `Firmware` protocol."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware.emulator.chip import ChipBase
from sevlaunch.firmware.emulator.codec import Chip, KeyedCert
from sevlaunch.firmware.interface import PlatformState, PlatformStatus
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, VerificationFailed
from sevlaunch.sev.types import ChipId


class PlatformCommands(ChipBase):
    """PLATFORM_STATUS, PEK_GEN, PEK_CSR, PEK_CERT_IMPORT, PDH_GEN, PDH_CERT_EXPORT, GET_ID,
    FACTORY_RESET."""

    def platform_status(self) -> PlatformStatus:
        with self._command() as chip:
            return self._status(chip)

    def _status(self, chip: Chip) -> PlatformStatus:
        return PlatformStatus(
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
            state=chip.state,
            owned_externally=chip.owned_externally,
            es_enabled=chip.config.es_enabled,
            build=chip.config.build,
            guest_count=chip.guest_count,
        )

    def pek_gen(self) -> None:
        """PEK_GEN (55766 chapter 5): a new PEK, and with it a new self-signed OCA and a new PDH.

        The new PEK needs an OCA signature; the firmware never holds an external owner's OCA key, so
        PEK_GEN always leaves the platform self-owned with a fresh OCA (re-owning needs PEK_CSR and
        PEK_CERT_IMPORT again). The CEK and chip id do not change.
        """
        with self._command() as chip:
            self._require_idle(chip, "PEK_GEN")
            self._ensure_init(chip)
            self._new_oca(chip)
            self._new_pek(chip)
            self._new_pdh(chip)
            self._save(chip)

    def pek_csr(self) -> bytes:
        """PEK_CSR (55766 chapter 5): the current PEK as an unsigned certificate for the owner to sign."""
        with self._command() as chip:
            self._require_idle(chip, "PEK_CSR")
            changed = self._ensure_init(chip)
            assert chip.pek is not None
            pek = chip.pek.certificate()
            csr = SEVCertificate.for_ec_key(
                usage=Usage.PEK,
                algorithm=pek.algorithm,
                public_key=_ec_public(pek),
                api_major=pek.api_major,
                api_minor=pek.api_minor,
            )
            if changed:
                self._save(chip)
            return csr.to_bytes()

    def pek_cert_import(self, pek: bytes, oca: bytes) -> None:
        """PEK_CERT_IMPORT (55766 chapter 5): take ownership with the owner's OCA.

        Checks, in order: lengths (INVALID_LENGTH), both parse and have their slot's usage
        (INVALID_CERTIFICATE), the platform is not already owned externally (ALREADY_OWNED), the OCA is
        self-signed and signed the PEK (BAD_SIGNATURE), the PEK is this platform's PEK, i.e. the PEK_CSR
        (INVALID_CERTIFICATE). Then the firmware adds its CEK signature to the PEK, keeps the OCA
        certificate (not its key), regenerates the PDH, and sets "owned externally".
        """
        command = "PEK_CERT_IMPORT"
        with self._command() as chip:
            self._require_idle(chip, command)
            self._ensure_init(chip)
            if len(pek) != CERT_SIZE or len(oca) != CERT_SIZE:
                raise FirmwareError(StatusCode.INVALID_LENGTH, command, "certificates are 0x824 bytes")
            try:
                pek_cert, oca_cert = SEVCertificate.from_bytes(pek), SEVCertificate.from_bytes(oca)
            except MalformedInput as exc:
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, exc.reason.value) from None
            if pek_cert.usage is not Usage.PEK or oca_cert.usage is not Usage.OCA:
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, "expected a PEK and an OCA")
            if chip.owned_externally:
                raise FirmwareError(StatusCode.ALREADY_OWNED, command, "run PEK_GEN to return to self-owned")
            try:
                oca_cert.verify_signed_by(oca_cert)
                pek_cert.verify_signed_by(oca_cert)
            except (VerificationFailed, MalformedInput) as exc:
                raise FirmwareError(StatusCode.BAD_SIGNATURE, command, exc.reason.value) from None
            assert chip.pek is not None
            if pek_cert.public_key_bytes() != chip.pek.certificate().public_key_bytes():
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, "not this platform's PEK")
            if not (pek_cert.sig1.is_empty or pek_cert.sig2.is_empty):
                raise FirmwareError(StatusCode.INVALID_CERTIFICATE, command, "no free slot for the CEK")
            cek_key, _ = self._cek()
            signed = pek_cert.sign_with(Usage.CEK, Algorithm.ECDSA_SHA256, cek_key)
            chip.pek = KeyedCert(cert=signed.to_bytes(), key=chip.pek.key)
            chip.oca = KeyedCert(cert=oca_cert.to_bytes(), key=None)
            chip.owned_externally = True
            self._new_pdh(chip)
            self._save(chip)

    def pdh_gen(self) -> None:
        """PDH_GEN (55766 chapter 5): a new PDH signed by the current PEK; nothing else changes."""
        with self._command() as chip:
            self._require_idle(chip, "PDH_GEN")
            self._ensure_init(chip)
            self._new_pdh(chip)
            self._save(chip)

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT (55766 chapter 5): (PDH, PEK‖OCA‖CEK), the CEK without the ASK signature."""
        with self._command() as chip:
            if self._ensure_init(chip):
                self._save(chip)
            assert chip.pdh is not None and chip.pek is not None and chip.oca is not None
            _, cek = self._cek()
            return chip.pdh.cert, chip.pek.cert + chip.oca.cert + cek.to_bytes()

    def get_id(self) -> ChipId:
        """GET_ID (55766 chapter 5): the 64-byte chip id that AMD's KDS indexes CEKs by."""
        with self._command() as chip:
            return ChipId(chip.chip_id)

    def factory_reset(self) -> None:
        """FACTORY_RESET (55766 chapter 5 "PLATFORM_RESET"): delete the OCA, PEK and PDH and the
        ownership, leaving the CEK and chip id. The firmware needs UNINIT; like Linux (which SHUTDOWNs
        an INIT platform first) an idle INIT platform is reset, a WORKING one refused."""
        with self._command() as chip:
            self._require_idle(chip, "FACTORY_RESET")
            chip.oca = chip.pek = chip.pdh = None
            chip.owned_externally = False
            chip.platform_state = PlatformState.UNINIT
            self._save(chip)


def _ec_public(cert: SEVCertificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise RuntimeError("platform keys are EC keys")
    return key
