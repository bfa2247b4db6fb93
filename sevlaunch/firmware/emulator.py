"""A software model of the SEV firmware (the PSP), kept in a state directory.

It implements the SEV API (AMD publication 55766) with the real formats, the real crypto of
`sevlaunch.sev` and the real status codes:

* its own emulated AMD root (ARK and ASK, RSA-4096 in AMD's format), a CEK (ECDSA P-384) signed by
  that ASK, a self-signed OCA, a PEK signed by the OCA and the CEK, a PDH signed by the PEK, and a
  64-byte chip id;
* the platform state machine UNINIT/INIT/WORKING (55766 section 5.1.2) and the platform commands;
* guest contexts with handles and ASIDs from a bounded pool, in the guest state machine
  UNINIT/LUPDATE/LSECRET/RUNNING (55766 section 6.1.1), and the launch commands.

Like `/dev/sev` (Linux's ccp driver INITs the platform on demand) a command that needs an initialised
platform INITs it first; on INIT the firmware creates the OCA, PEK and PDH if none exist (after a
FACTORY_RESET, say).

Every command runs under the chip's exclusive file lock and reloads the state from disk, so several
`EmulatedFirmware` objects in several processes on one directory act as one chip (the platform service
and the launcher's emulated hypervisor share it), and every change is written atomically
(`sevlaunch.firmware.state`). Private keys live in 0600 files of the state directory, as the real ones
live in the PSP's flash; nothing secret appears in a repr, a log or an error.

Nothing trusts the emulated root unless told to: `ask_ark()` (also `<dir>/ask_ark.cert`) is what a
verifier must be given explicitly as an extra root.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevlaunch.firmware.interface import PlatformState, PlatformStatus
from sevlaunch.firmware.state import LaunchLog, atomic_write, chip_lock, remove_stale_temporaries
from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage, parse_ask_ark
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, Unsupported, VerificationFailed
from sevlaunch.sev.measurement import MEASURE_SIZE, compute_measure
from sevlaunch.sev.policy import GuestPolicy, PolicyFlags
from sevlaunch.sev.report import AttestationReport
from sevlaunch.sev.secret import SecretHeader, open_secret
from sevlaunch.sev.session import (
    SESSION_BLOB_SIZE,
    TEK_SIZE,
    TIK_SIZE,
    SessionBlob,
    TransportKeys,
    unwrap_session,
)
from sevlaunch.sev.types import ChipId, LaunchDigest, MNonce

STATE_FORMAT: Final = 1
CHIP_ID_SIZE: Final = 64
VMSA_SIZE: Final = 4096
SECRET_HEADER_SIZE: Final = 52
MNONCE_SIZE: Final = 16
LAUNCH_DIGEST_SIZE: Final = 32  # SHA-256
ATTESTATION_MIN_API: Final = (0, 23)  # 55766: ATTESTATION is defined from API 0.23
ROOT_RSA_BITS: Final = 4096  # Rome and later: RSA-4096 ARK/ASK, RSA-PSS with SHA-384

STATE_FILE: Final = "state.json"
ARK_KEY: Final = "ark.key"
ASK_KEY: Final = "ask.key"
ARK_CERT: Final = "ark.cert"
ASK_CERT: Final = "ask.cert"
ASK_ARK_CERT: Final = "ask_ark.cert"
CEK_KEY: Final = "cek.key"
#: The `command` of an `EmulatorStateError`: the failing step is reading the chip's state, whatever
#: command needed it.
STATE_COMMAND: Final = "EMULATOR_STATE"


class EmulatorStateError(FirmwareError, ValueError):
    """The state directory cannot be read: a truncated, garbage or foreign `state.json`, a missing or
    unreadable key file. The emulator's damaged SPI flash, so HWERROR_PLATFORM, the PSP's answer (a
    typed error the server shell maps, not a traceback from json or the PEM parser). Also a ValueError,
    like `MalformedInput`: a server opening such a directory at start reports "cannot start"."""

    def __init__(self, detail: str) -> None:
        super().__init__(StatusCode.HWERROR_PLATFORM, STATE_COMMAND, detail)

    def __reduce__(self) -> tuple[object, ...]:
        return (EmulatorStateError, (self._detail_only,))


# Every exception that decoding a damaged state can raise: json (ValueError, RecursionError for absurd
# nesting), bytes.fromhex/base64 (ValueError), missing keys, wrong JSON types, unknown enum values.
_DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError)
CEK_CERT: Final = "cek.cert"  # the ASK-signed CEK, as a KDS serves it
GUESTS_DIR: Final = "guests"


# -- configuration and the emulated AMD root -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChipConfig:
    """What distinguishes one emulated chip model from another.

    `max_guests` counts the SEV (non-ES) ASIDs and `max_es_guests` the SEV-ES ASIDs, as libvirt's
    `max-guests`/`max-es-guests` do: the hardware splits its ASID space at MIN_SEV_ASID, ES guests
    below it (CPUID 0x8000001F). SEV-ES is enabled (PLATFORM_STATUS CONFIG.ES) when ES ASIDs exist.
    """

    generation: str = "emulated"
    api_major: int = 0
    api_minor: int = 24
    build: int = 15
    max_guests: int = 16
    max_es_guests: int = 16

    def __post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"{name} must be 0..255")
        if self.max_guests < 0 or self.max_es_guests < 0 or self.max_guests + self.max_es_guests == 0:
            raise ValueError("the chip needs at least one ASID")
        if not self.generation or not self.generation.isprintable():
            raise ValueError("generation must be a printable label")

    @property
    def api_version(self) -> tuple[int, int]:
        return (self.api_major, self.api_minor)

    @property
    def es_enabled(self) -> bool:
        return self.max_es_guests > 0


class EmulatedRoot:
    """An emulated AMD root: ARK (self-signed) and ASK (signed by the ARK), RSA-4096, AMD's format.

    RSA-4096 key generation takes seconds, so tests and demos make one and give it to several chips.
    """

    def __init__(
        self,
        *,
        ark_key: rsa.RSAPrivateKey,
        ask_key: rsa.RSAPrivateKey,
        ark: AMDCertificate,
        ask: AMDCertificate,
    ) -> None:
        self._ark_key = ark_key
        self._ask_key = ask_key
        self.ark = ark
        self.ask = ask

    def __repr__(self) -> str:
        return f"EmulatedRoot(ark_key_id={self.ark.key_id.hex()}, ask_key_id={self.ask.key_id.hex()})"

    @property
    def ask_key(self) -> rsa.RSAPrivateKey:
        return self._ask_key

    @classmethod
    def generate(cls) -> EmulatedRoot:
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=ROOT_RSA_BITS)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=ROOT_RSA_BITS)
        ark_id, ask_id = uuid.uuid4().bytes, uuid.uuid4().bytes
        ark = AMDCertificate.create(
            key_id=ark_id,
            certifying_id=ark_id,
            key_usage=AMDKeyUsage.ARK,
            public_key=ark_key.public_key(),
            signer_private_key=ark_key,
        )
        ask = AMDCertificate.create(
            key_id=ask_id,
            certifying_id=ark_id,
            key_usage=AMDKeyUsage.ASK,
            public_key=ask_key.public_key(),
            signer_private_key=ark_key,
        )
        return cls(ark_key=ark_key, ask_key=ask_key, ark=ark, ask=ask)

    def ask_ark(self) -> bytes:
        """ASK‖ARK, the layout of AMD's `ask_ark_<gen>.cert`."""
        return self.ask.to_bytes() + self.ark.to_bytes()

    def save(self, directory: Path) -> None:
        atomic_write(directory / ARK_KEY, _pem(self._ark_key))
        atomic_write(directory / ASK_KEY, _pem(self._ask_key))
        atomic_write(directory / ARK_CERT, self.ark.to_bytes(), mode=0o644)
        atomic_write(directory / ASK_CERT, self.ask.to_bytes(), mode=0o644)
        atomic_write(directory / ASK_ARK_CERT, self.ask_ark(), mode=0o644)

    @classmethod
    def load(cls, directory: str | Path) -> EmulatedRoot:
        """Loads the root of an existing chip directory (or of a directory `save` wrote)."""
        directory = Path(directory)
        ask, ark = parse_ask_ark((directory / ASK_ARK_CERT).read_bytes())
        return cls(
            ark_key=_load_rsa((directory / ARK_KEY).read_bytes()),
            ask_key=_load_rsa((directory / ASK_KEY).read_bytes()),
            ark=ark,
            ask=ask,
        )


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_rsa(pem: bytes) -> rsa.RSAPrivateKey:
    # The emulator generated this key and keeps it in a 0600 file of its own state directory, so the
    # expensive RSA consistency check (~0.7 s for 4096 bits) guards against nothing here.
    try:
        key = serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)
    except (*_DECODE_ERRORS, UnsupportedAlgorithm):
        raise EmulatorStateError("an RSA private key of the chip does not parse") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise EmulatorStateError("expected an RSA private key")
    return key


def _load_ec(pem: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (*_DECODE_ERRORS, UnsupportedAlgorithm):
        raise EmulatorStateError("an EC private key of the chip does not parse") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EmulatorStateError("expected an EC private key")
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- typed reading of state.json: well-formed JSON with wrong types or ranges is a damaged state too ----

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1


def _bad(what: str) -> EmulatorStateError:
    return EmulatorStateError(f"{STATE_FILE}: {what}")


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} is not a list")
    return value


def _int(value: object, what: str, lo: int = 0, hi: int = U64_MAX) -> int:
    # bool is an int in Python, not in the state's schema.
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{what} is not an integer in {lo}..{hi}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{what} is not a boolean")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is not a string")
    return value


def _hex(value: object, what: str, size: int) -> bytes:
    try:
        data = bytes.fromhex(_str(value, what))
    except ValueError:
        raise _bad(f"{what} is not hex") from None
    if len(data) != size:
        raise _bad(f"{what} is {len(data)} bytes, not {size}")
    return data


def _opt_hex(value: object, what: str, size: int) -> bytes | None:
    return None if value is None else _hex(value, what, size)


def _b64_field(value: object, what: str) -> bytes:
    try:
        return _unb64(_str(value, what))
    except ValueError:
        raise _bad(f"{what} is not base64") from None


# -- persistent chip state -------------------------------------------------------------------------


class GuestState(IntEnum):
    """GSTATE (55766 section 6.1.1); the migration states SUPDATE/RUPDATE are not emulated."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3


@dataclass
class _KeyedCert:
    """A platform key pair and its certificate. `key` is None for an externally owned OCA: the owner
    keeps that private key, the firmware only its certificate."""

    cert: bytes
    key: str | None = field(default=None, repr=False)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        if self.key is None:
            raise RuntimeError("the firmware does not hold this private key")
        return _load_ec(self.key)

    def certificate(self) -> SEVCertificate:
        return SEVCertificate.from_bytes(self.cert)

    def to_json(self) -> dict[str, Any]:
        return {"cert": _b64(self.cert), "key": self.key}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> _KeyedCert | None:
        if data is None:
            return None
        data = _obj(data, "a platform key")
        cert = _b64_field(data["cert"], "a platform certificate")
        if len(cert) != CERT_SIZE:
            raise EmulatorStateError(f"a platform certificate in {STATE_FILE} is {len(cert)} bytes")
        # `key` is checked where it is used (`private_key`): a bad one fails the commands that sign.
        return cls(cert=cert, key=data["key"])


@dataclass
class _Guest:
    handle: int
    asid: int
    policy: int
    gstate: GuestState
    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)
    log_len: int = 0
    vmsa_count: int = 0
    # LAUNCH_UPDATE_DATA regions: (gpa, offset into the launch log, length).
    regions: list[tuple[int, int, int]] = field(default_factory=list)
    # LAUNCH_SECRET regions: (gpa, plaintext), in injection order.
    secrets: list[tuple[int, bytes]] = field(default_factory=list, repr=False)
    launch_digest: bytes | None = None
    measure: bytes | None = None
    mnonce: bytes | None = None

    @property
    def es(self) -> bool:
        return bool(self.policy & PolicyFlags.ES)

    @property
    def keys(self) -> TransportKeys:
        return TransportKeys(self.tek, self.tik)

    def to_json(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "asid": self.asid,
            "policy": self.policy,
            "gstate": int(self.gstate),
            "tek": self.tek.hex(),
            "tik": self.tik.hex(),
            "log_len": self.log_len,
            "vmsa_count": self.vmsa_count,
            "regions": [list(r) for r in self.regions],
            "secrets": [[gpa, _b64(data)] for gpa, data in self.secrets],
            "launch_digest": self.launch_digest.hex() if self.launch_digest is not None else None,
            "measure": self.measure.hex() if self.measure is not None else None,
            "mnonce": self.mnonce.hex() if self.mnonce is not None else None,
        }

    @classmethod
    def from_json(cls, data: object, config: ChipConfig) -> _Guest:
        """A guest entry, checked for types and ranges (a damaged one is an `EmulatorStateError`)."""
        doc = _obj(data, "a guest")
        handle = _int(doc["handle"], "a guest handle", 1, U32_MAX)
        what = f"guest {handle}"
        regions = []
        for r in _list(doc["regions"], f"{what} regions"):
            r = _list(r, f"a region of {what}")
            if len(r) != 3:
                raise _bad(f"a region of {what} is not [gpa, offset, length]")
            regions.append(
                (
                    _int(r[0], f"a region gpa of {what}"),
                    _int(r[1], f"a region offset of {what}"),
                    _int(r[2], f"a region length of {what}"),
                )
            )
        secrets_ = []
        for e in _list(doc["secrets"], f"{what} secrets"):
            e = _list(e, f"a secret of {what}")
            if len(e) != 2:
                raise _bad(f"a secret of {what} is not [gpa, data]")
            secrets_.append((_int(e[0], f"a secret gpa of {what}"), _b64_field(e[1], f"a secret of {what}")))
        return cls(
            handle=handle,
            asid=_int(doc["asid"], f"{what} ASID", 1, config.max_guests + config.max_es_guests),
            policy=_int(doc["policy"], f"{what} policy", 0, U32_MAX),
            gstate=GuestState(_int(doc["gstate"], f"{what} gstate", 0, max(GuestState))),
            tek=_hex(doc["tek"], f"{what} TEK", TEK_SIZE),
            tik=_hex(doc["tik"], f"{what} TIK", TIK_SIZE),
            log_len=_int(doc["log_len"], f"{what} log length"),
            vmsa_count=_int(doc["vmsa_count"], f"{what} VMSA count"),
            regions=regions,
            secrets=secrets_,
            launch_digest=_opt_hex(doc["launch_digest"], f"{what} launch digest", LAUNCH_DIGEST_SIZE),
            measure=_opt_hex(doc["measure"], f"{what} measure", MEASURE_SIZE),
            mnonce=_opt_hex(doc["mnonce"], f"{what} mnonce", MNONCE_SIZE),
        )


@dataclass
class _Chip:
    config: ChipConfig
    chip_id: bytes
    platform_state: PlatformState  # UNINIT or INIT; WORKING is derived from the guests
    owned_externally: bool
    oca: _KeyedCert | None
    pek: _KeyedCert | None
    pdh: _KeyedCert | None
    next_handle: int = 1
    commands: int = 0  # commands that changed the state, for diagnostics
    guests: dict[int, _Guest] = field(default_factory=dict)

    @property
    def state(self) -> PlatformState:
        if self.platform_state is PlatformState.INIT and self.guests:
            return PlatformState.WORKING
        return self.platform_state

    def to_json(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "chip_id": self.chip_id.hex(),
            "platform_state": int(self.platform_state),
            "owned_externally": self.owned_externally,
            "oca": self.oca.to_json() if self.oca else None,
            "pek": self.pek.to_json() if self.pek else None,
            "pdh": self.pdh.to_json() if self.pdh else None,
            "next_handle": self.next_handle,
            "commands": self.commands,
            "guests": [g.to_json() for g in self.guests.values()],
        }
        return json.dumps(doc, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> _Chip:
        """The chip of a `state.json`, checked for types and ranges: a damaged one (also well-formed JSON
        with a wrong type, a negative ASID, a duplicate handle) is an `EmulatorStateError` here, not a
        raw exception in some later command."""
        doc = _obj(json.loads(raw), STATE_FILE)
        if doc.get("format") != STATE_FORMAT:
            raise EmulatorStateError(f"{STATE_FILE} has format {doc.get('format')!r}, not {STATE_FORMAT}")
        config_doc = _obj(doc["config"], "config")
        for name, value in config_doc.items():
            if name == "generation":
                _str(value, "config generation")
            else:
                _int(value, f"config {name}", 0, U32_MAX)
        config = ChipConfig(**config_doc)
        guests: dict[int, _Guest] = {}
        asids: set[int] = set()
        for entry in _list(doc["guests"], "guests"):
            guest = _Guest.from_json(entry, config)
            if guest.handle in guests or guest.asid in asids:
                raise _bad(f"guest {guest.handle} or its ASID {guest.asid} appears twice")
            guests[guest.handle] = guest
            asids.add(guest.asid)
        next_handle = _int(doc["next_handle"], "next_handle", 1, U32_MAX + 1)
        if guests and next_handle <= max(guests):
            raise _bad(f"next_handle {next_handle} is not above every guest handle")
        return cls(
            config=config,
            chip_id=_hex(doc["chip_id"], "chip_id", CHIP_ID_SIZE),
            platform_state=PlatformState(
                _int(doc["platform_state"], "platform_state", PlatformState.UNINIT, PlatformState.INIT)
            ),
            owned_externally=_bool(doc["owned_externally"], "owned_externally"),
            oca=_KeyedCert.from_json(doc["oca"]),
            pek=_KeyedCert.from_json(doc["pek"]),
            pdh=_KeyedCert.from_json(doc["pdh"]),
            next_handle=next_handle,
            commands=_int(doc["commands"], "commands"),
            guests=guests,
        )


# -- the emulated firmware -------------------------------------------------------------------------


class EmulatedFirmware:
    """A software PSP implementing `LaunchFirmware`, persisted in `state_dir`.

    Opening a directory without a chip creates one (with `config`, and `root` when given, else a fresh
    emulated AMD root) unless `create=False`. Opening an existing chip with a different explicit
    `config` is an error.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        create: bool = True,
        config: ChipConfig | None = None,
        root: EmulatedRoot | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
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

    def __repr__(self) -> str:
        return f"EmulatedFirmware(state_dir={str(self.state_dir)!r}, generation={self.config.generation!r})"

    # -- creation and persistence ----------------------------------------------------------------

    def _create(self, config: ChipConfig, root: EmulatedRoot | None) -> None:
        """Makes a new chip. Files are written first, `state.json` last: the chip exists only once that
        commit point is on disk, so a crash here leaves a directory that the next open re-creates."""
        remove_stale_temporaries(self.state_dir)
        root = root or EmulatedRoot.generate()
        root.save(self.state_dir)
        cek_key = ec.generate_private_key(ec.SECP384R1())
        atomic_write(self.state_dir / CEK_KEY, _pem(cek_key))
        cek = self._cek_cert(cek_key, config).sign_with(Usage.ASK, Algorithm.RSA_SHA384, root.ask_key)
        atomic_write(self.state_dir / CEK_CERT, cek.to_bytes(), mode=0o644)
        self._guest_dir.mkdir(exist_ok=True, mode=0o700)
        chip = _Chip(
            config=config,
            chip_id=secrets.token_bytes(CHIP_ID_SIZE),
            platform_state=PlatformState.UNINIT,
            owned_externally=False,
            oca=None,
            pek=None,
            pdh=None,
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

    def _load(self) -> _Chip:
        raw = self._read(STATE_FILE)
        try:
            return _Chip.from_json(raw)
        except EmulatorStateError:
            raise
        except _DECODE_ERRORS as exc:
            raise EmulatorStateError(f"{STATE_FILE} is not a chip state ({type(exc).__name__})") from None

    def _save(self, chip: _Chip) -> None:
        # Under the lock no other writer is active: any temporary here is a crashed command's residue.
        remove_stale_temporaries(self.state_dir)
        chip.commands += 1
        atomic_write(self.state_dir / STATE_FILE, chip.to_json())

    @contextmanager
    def _command(self) -> Iterator[_Chip]:
        """One firmware command: exclusive lock, fresh state from disk. The command saves explicitly
        when it changes the state, after every check passed, so a refused command changes nothing."""
        with chip_lock(self.state_dir):
            yield self._load()

    def _cek(self) -> tuple[ec.EllipticCurvePrivateKey, SEVCertificate]:
        # The CEK never changes (55766: derived from chip-unique secrets), so it is cached.
        if self._cek_key is None or self._cek_unsigned is None:
            key = _load_ec(self._read(CEK_KEY).decode("ascii", "replace"))
            self._cek_key, self._cek_unsigned = key, self._cek_cert(key, self.config)
        return self._cek_key, self._cek_unsigned

    # -- key generation (55766 chapter 5) ----------------------------------------------------------

    def _new_oca(self, chip: _Chip) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = SEVCertificate.for_ec_key(
            usage=Usage.OCA,
            algorithm=Algorithm.ECDSA_SHA256,
            public_key=key.public_key(),
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
        ).sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, key)
        chip.oca = _KeyedCert(cert=cert.to_bytes(), key=_pem(key).decode("ascii"))
        chip.owned_externally = False

    def _new_pek(self, chip: _Chip) -> None:
        """A PEK signed by the OCA (slot 1) and the CEK (slot 2), as real chains carry them."""
        assert chip.oca is not None
        key = ec.generate_private_key(ec.SECP384R1())
        cek_key, _ = self._cek()
        cert = (
            self._unsigned(chip, Usage.PEK, Algorithm.ECDSA_SHA256, key)
            .sign_with(Usage.OCA, Algorithm.ECDSA_SHA256, chip.oca.private_key())
            .sign_with(Usage.CEK, Algorithm.ECDSA_SHA256, cek_key)
        )
        chip.pek = _KeyedCert(cert=cert.to_bytes(), key=_pem(key).decode("ascii"))

    def _new_pdh(self, chip: _Chip) -> None:
        assert chip.pek is not None
        key = ec.generate_private_key(ec.SECP384R1())
        cert = self._unsigned(chip, Usage.PDH, Algorithm.ECDH_SHA256, key).sign_with(
            Usage.PEK, Algorithm.ECDSA_SHA256, chip.pek.private_key()
        )
        chip.pdh = _KeyedCert(cert=cert.to_bytes(), key=_pem(key).decode("ascii"))

    @staticmethod
    def _unsigned(
        chip: _Chip, usage: Usage, algorithm: Algorithm, key: ec.EllipticCurvePrivateKey
    ) -> SEVCertificate:
        return SEVCertificate.for_ec_key(
            usage=usage,
            algorithm=algorithm,
            public_key=key.public_key(),
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
        )

    def _ensure_init(self, chip: _Chip) -> bool:
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
    def _require_idle(chip: _Chip, command: str) -> None:
        """PEK_GEN, PEK_CSR, PEK_CERT_IMPORT and PDH_GEN need the platform in INIT, not WORKING
        (55766 section 5.1.2; PROTOCOL.md section 9); FACTORY_RESET refuses a WORKING platform too."""
        if chip.state is PlatformState.WORKING:
            raise FirmwareError(
                StatusCode.INVALID_PLATFORM_STATE, command, f"{len(chip.guests)} guest(s) active"
            )

    # -- platform commands (Firmware protocol) -----------------------------------------------------

    def platform_status(self) -> PlatformStatus:
        with self._command() as chip:
            return self._status(chip)

    def _status(self, chip: _Chip) -> PlatformStatus:
        return PlatformStatus(
            api_major=chip.config.api_major,
            api_minor=chip.config.api_minor,
            state=chip.state,
            owned_externally=chip.owned_externally,
            es_enabled=chip.config.es_enabled,
            build=chip.config.build,
            guest_count=len(chip.guests),
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
            chip.pek = _KeyedCert(cert=signed.to_bytes(), key=chip.pek.key)
            chip.oca = _KeyedCert(cert=oca_cert.to_bytes(), key=None)
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

    # -- guest commands (LaunchFirmware protocol, 55766 chapter 6) -----------------------------------

    @staticmethod
    def _guest(chip: _Chip, handle: int, command: str, *states: GuestState) -> _Guest:
        guest = chip.guests.get(handle)
        if guest is None:
            raise FirmwareError(StatusCode.INVALID_GUEST, command, f"no guest with handle {handle}")
        if states and guest.gstate not in states:
            raise FirmwareError(
                StatusCode.INVALID_GUEST_STATE,
                command,
                f"guest {handle} is {guest.gstate.name}, needs {'/'.join(s.name for s in states)}",
            )
        return guest

    @staticmethod
    def _allocate_asid(chip: _Chip, es: bool) -> int:
        """ES guests take ASIDs 1..max_es_guests, SEV guests the ones above (MIN_SEV_ASID split)."""
        config = chip.config
        first, count = (1, config.max_es_guests) if es else (config.max_es_guests + 1, config.max_guests)
        used = {g.asid for g in chip.guests.values()}
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
            chip.guests[handle] = _Guest(
                handle=handle,
                asid=asid,
                policy=guest_policy.value,
                gstate=GuestState.LUPDATE,
                tek=keys.tek,
                tik=keys.tik,
            )
            self._save(chip)
            return handle

    def _log_path(self, handle: int) -> Path:
        return self._guest_dir / f"{handle}.log"

    def _sweep_logs(self, chip: _Chip) -> None:
        """Deletes launch logs of guests that no longer exist (a crash after DECOMMISSION committed)."""
        self._guest_dir.mkdir(exist_ok=True, mode=0o700)
        for path in self._guest_dir.glob("*.log"):
            stem = path.stem
            if not stem.isdigit() or int(stem) not in chip.guests:
                path.unlink(missing_ok=True)

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

    def _launch_digest(self, guest: _Guest) -> LaunchDigest:
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

    def kds_cek(self) -> bytes:
        """The CEK signed by the emulated ASK, as AMD's KDS serves it. Like the KDS each call signs
        afresh (RSA-PSS is randomised): the bytes differ, the key and the chain stay the same."""
        if self._ask_key is None:
            self._ask_key = _load_rsa(self._read(ASK_KEY))
        _, cek = self._cek()
        return cek.sign_with(Usage.ASK, Algorithm.RSA_SHA384, self._ask_key).to_bytes()

    def ask_ark(self) -> bytes:
        """The emulated ASK‖ARK (AMD's `ask_ark_<gen>.cert` layout): the root to trust explicitly."""
        return self._read(ASK_ARK_CERT)

    def chip_id_hex(self) -> str:
        return self.get_id().hex()

    def full_chain(self) -> bytes:
        """PDH‖PEK‖OCA‖CEK‖ASK‖ARK with the ASK-signed CEK (sevctl's `export --full` layout)."""
        pdh, chain = self.pdh_cert_export()
        return pdh + chain[: 2 * CERT_SIZE] + self.kds_cek() + self.ask_ark()


def _ec_public(cert: SEVCertificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise RuntimeError("platform keys are EC keys")
    return key


__all__ = [
    "ChipConfig",
    "EmulatedFirmware",
    "EmulatedRoot",
    "EmulatorStateError",
    "GuestState",
]
