"""The chip itself: its state directory, the command discipline, its keys and guest storage.

`ChipBase` holds what every command group needs; the groups (`commands.platform`, `commands.sev`, and
the SEV-SNP one beside them) are mixins over it, and `EmulatedFirmware` combines them.

Every command runs under the chip's exclusive file lock and reloads the state from disk, so several
`EmulatedFirmware` objects in several processes on one directory act as one chip, and every change is
written atomically (`sevlaunch.firmware.state`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevlaunch.firmware.emulator.codec import Chip, ChipConfig, Guest, GuestState, KeyedCert
from sevlaunch.firmware.emulator.layout import (
    CEK_CERT,
    CEK_KEY,
    CHIP_ID_SIZE,
    DECODE_ERRORS,
    GUESTS_DIR,
    STATE_FILE,
    EmulatorStateError,
)
from sevlaunch.firmware.emulator.root import EmulatedRoot, load_ec, pem
from sevlaunch.firmware.emulator.snp_keys import save_snp_root
from sevlaunch.firmware.emulator.snp_state import CHIP_SECRET_SIZE, SnpPlatform
from sevlaunch.firmware.interface import PlatformState
from sevlaunch.firmware.state import atomic_write, chip_lock, remove_stale_temporaries
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage
from sevlaunch.snp.issue import EmulatedSnpRoot


class _InState(Protocol):
    @property
    def gstate(self) -> Enum: ...


G = TypeVar("G", bound=_InState)


def find_guest(
    guests: Mapping[int, G], handle: int, command: str, states: tuple[Enum, ...], what: str = "guest"
) -> G:
    """The guest context `handle`: INVALID_GUEST when there is none, INVALID_GUEST_STATE when it is in
    none of `states` (any state when none are given)."""
    guest = guests.get(handle)
    if guest is None:
        raise FirmwareError(StatusCode.INVALID_GUEST, command, f"no {what} with handle {handle}")
    if states and guest.gstate not in states:
        raise FirmwareError(
            StatusCode.INVALID_GUEST_STATE,
            command,
            f"guest {handle} is {guest.gstate.name}, needs {'/'.join(s.name for s in states)}",
        )
    return guest


class ChipBase:
    """A software PSP persisted in `state_dir`: creation, loading, the locked command, keys.

    Opening a directory without a chip creates one (with `config`, and `root` when given, else a fresh
    emulated AMD root) unless `create=False`. Opening an existing chip with a different explicit
    `config` is an error. `snp_root` is the emulated AMD SNP root of the chip's product, used when the
    chip has none yet.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        create: bool = True,
        config: ChipConfig | None = None,
        root: EmulatedRoot | None = None,
        snp_root: EmulatedSnpRoot | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        # The SEV-SNP root (X.509, per product): saved with a new chip when given, else generated on the
        # chip's first SNP command (three RSA-4096 keys: seconds).
        self._snp_root_given = snp_root
        self._snp_root: EmulatedSnpRoot | None = None
        self._guest_dir = self.state_dir / GUESTS_DIR
        self._cek_key: ec.EllipticCurvePrivateKey | None = None
        self._cek_unsigned: SEVCertificate | None = None
        self._ask_key: rsa.RSAPrivateKey | None = None
        if not (self.state_dir / STATE_FILE).exists():
            if not create:
                raise FileNotFoundError(f"no emulated chip in {self.state_dir}")
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with chip_lock(self.state_dir):
            if not (self.state_dir / STATE_FILE).exists():
                self._create(config or ChipConfig(), root)
            chip = self._load()
        if config is not None and config != chip.config:
            raise ValueError(f"{self.state_dir} holds a chip with another configuration: {chip.config}")
        self.config = chip.config

    # -- creation and persistence ----------------------------------------------------------------

    def _create(self, config: ChipConfig, root: EmulatedRoot | None) -> None:
        """Makes a new chip. Files are written first, `state.json` last: the chip exists only once that
        commit point is on disk, so a crash here leaves a directory that the next open re-creates."""
        remove_stale_temporaries(self.state_dir)
        root = root or EmulatedRoot.generate()
        root.save(self.state_dir)
        cek_key = ec.generate_private_key(ec.SECP384R1())
        atomic_write(self.state_dir / CEK_KEY, pem(cek_key))
        cek = self._cek_cert(cek_key, config).sign_with(Usage.ASK, Algorithm.RSA_SHA384, root.ask_key)
        atomic_write(self.state_dir / CEK_CERT, cek.to_bytes(), mode=0o644)
        self._guest_dir.mkdir(exist_ok=True, mode=0o700)
        if self._snp_root_given is not None:
            if self._snp_root_given.product is not config.snp_product:
                raise ValueError(
                    f"an SNP root of {self._snp_root_given.product.value} for a {config.product} chip"
                )
            save_snp_root(self.state_dir, self._snp_root_given)
        chip = Chip(
            config=config,
            chip_id=secrets.token_bytes(CHIP_ID_SIZE),
            platform_state=PlatformState.UNINIT,
            owned_externally=False,
            oca=None,
            pek=None,
            pdh=None,
            snp=SnpPlatform.new(config.snp_product, secrets.token_bytes(CHIP_SECRET_SIZE)),
        )
        self._save(chip)

    @staticmethod
    def _cek_cert(cek_key: ec.EllipticCurvePrivateKey, config: ChipConfig) -> SEVCertificate:
        # The CEK as the firmware exports it: unsigned (the ASK signature comes from AMD's KDS).
        return SEVCertificate.for_ec_key(
            usage=Usage.CEK,
            algorithm=Algorithm.ECDSA_SHA256,
            public_key=cek_key.public_key(),
            api_major=config.api_major,
            api_minor=config.api_minor,
        )

    def _read(self, name: str) -> bytes:
        """A file of the state directory; a missing or unreadable one is an `EmulatorStateError`."""
        try:
            return (self.state_dir / name).read_bytes()
        except OSError as exc:
            raise EmulatorStateError(f"cannot read {name}: {exc.strerror or type(exc).__name__}") from None

    def _load(self) -> Chip:
        raw = self._read(STATE_FILE)
        try:
            return Chip.from_json(raw)
        except EmulatorStateError:
            raise
        except DECODE_ERRORS as exc:
            raise EmulatorStateError(f"{STATE_FILE} is not a chip state ({type(exc).__name__})") from None

    def _save(self, chip: Chip) -> None:
        # Under the lock no other writer is active: any temporary here is a crashed command's residue.
        remove_stale_temporaries(self.state_dir)
        chip.commands += 1
        atomic_write(self.state_dir / STATE_FILE, chip.to_json())

    @contextmanager
    def _command(self) -> Iterator[Chip]:
        """One firmware command: exclusive lock, fresh state from disk. The command saves explicitly
        when it changes the state, after every check passed, so a refused command changes nothing."""
        with chip_lock(self.state_dir):
            yield self._load()

    def _cek(self) -> tuple[ec.EllipticCurvePrivateKey, SEVCertificate]:
        # The CEK never changes (55766: derived from chip-unique secrets), so it is cached.
        if self._cek_key is None or self._cek_unsigned is None:
            key = load_ec(self._read(CEK_KEY).decode("ascii", "replace"))
            self._cek_key, self._cek_unsigned = key, self._cek_cert(key, self.config)
        return self._cek_key, self._cek_unsigned

    # -- key generation (55766 chapter 5) ----------------------------------------------------------

    def _new_oca(self, chip: Chip) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = SEVCertificate.for_ec_key(
            usage=Usage.OCA,
            algorithm=Algorithm.ECDSA_SHA256,
            public_key=key.public_key(),
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
        ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, key)
        chip.oca = KeyedCert(cert=cert.to_bytes(), key=pem(key).decode("ascii"))
        chip.owned_externally = False

    def _new_pek(self, chip: Chip) -> None:
        """A PEK signed by the OCA (slot 1) and the CEK (slot 2), as real chains carry them."""
        assert chip.oca is not None
        key = ec.generate_private_key(ec.SECP384R1())
        cek_key, _ = self._cek()
        cert = (
            self._unsigned(chip, Usage.PEK, Algorithm.ECDSA_SHA256, key)
            .sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, chip.oca.private_key())
            .sign_with(Usage.CEK, Algorithm.ECDSA_SHA256, cek_key)
        )
        chip.pek = KeyedCert(cert=cert.to_bytes(), key=pem(key).decode("ascii"))

    def _new_pdh(self, chip: Chip) -> None:
        assert chip.pek is not None
        key = ec.generate_private_key(ec.SECP384R1())
        cert = self._unsigned(chip, Usage.PDH, Algorithm.ECDH_SHA256, key).sign_with(
            Usage.PEK, Algorithm.ECDSA_SHA256, chip.pek.private_key()
        )
        chip.pdh = KeyedCert(cert=cert.to_bytes(), key=pem(key).decode("ascii"))

    @staticmethod
    def _unsigned(
        chip: Chip, usage: Usage, algorithm: Algorithm, key: ec.EllipticCurvePrivateKey
    ) -> SEVCertificate:
        return SEVCertificate.for_ec_key(
            usage=usage,
            algorithm=algorithm,
            public_key=key.public_key(),
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
        )

    def _ensure_init(self, chip: Chip) -> bool:
        """INIT (55766 section 5 "INIT") when the platform is UNINIT, as Linux does before a command
        that needs it. INIT creates the OCA, PEK and PDH that do not exist yet. True if it changed."""
        if chip.platform_state is not PlatformState.UNINIT:
            return False
        if chip.oca is None:
            self._new_oca(chip)
        if chip.pek is None:
            self._new_pek(chip)
        if chip.pdh is None:
            self._new_pdh(chip)
        chip.platform_state = PlatformState.INIT
        return True

    @staticmethod
    def _require_idle(chip: Chip, command: str) -> None:
        """PEK_GEN, PEK_CSR, PEK_CERT_IMPORT and PDH_GEN need the platform in INIT, not WORKING
        (55766 section 5.1.2; PROTOCOL.md section 9); FACTORY_RESET refuses a WORKING platform too."""
        if chip.state is PlatformState.WORKING:
            raise FirmwareError(
                StatusCode.INVALID_PLATFORM_STATE, command, f"{chip.guest_count} guest(s) active"
            )

    # -- guest contexts, whatever the launch technology --------------------------------------------

    @staticmethod
    def _guest(chip: Chip, handle: int, command: str, *states: GuestState) -> Guest:
        return find_guest(chip.guests, handle, command, states)

    def _log_path(self, handle: int) -> Path:
        return self._guest_dir / f"{handle}.log"

    def _sweep_logs(self, chip: Chip) -> None:
        """Deletes launch logs of guests that no longer exist (a crash after DECOMMISSION committed)."""
        self._guest_dir.mkdir(exist_ok=True, mode=0o700)
        for path in self._guest_dir.glob("*.log"):
            stem = path.stem
            if not stem.isdigit() or int(stem) not in chip.guests:
                path.unlink(missing_ok=True)
