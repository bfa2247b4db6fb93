"""The chip's persistent state and its `state.json` codec.

`Chip` and `Guest` are what a command loads under the chip lock, changes, and saves. Reading is typed:
well-formed JSON with a wrong type, an out-of-range number or a duplicate handle is a damaged state, an
`EmulatorStateError` here, never a raw exception in some later command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.firmware.emulator.fields import (
    _b64,
    _b64_field,
    _bad,
    _bool,
    _hex,
    _int,
    _list,
    _obj,
    _opt_hex,
    _str,
)
from sevlaunch.firmware.emulator.layout import (
    CHIP_ID_SIZE,
    LAUNCH_DIGEST_SIZE,
    MNONCE_SIZE,
    STATE_FILE,
    STATE_FORMAT,
    U32_MAX,
    EmulatorStateError,
)
from sevlaunch.firmware.emulator.root import load_ec
from sevlaunch.firmware.emulator.snp_state import SnpPlatform
from sevlaunch.firmware.interface import PlatformState
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate
from sevlaunch.sev.measurement import MEASURE_SIZE
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.session import TEK_SIZE, TIK_SIZE, TransportKeys
from sevlaunch.snp.tcb import Product

# -- configuration ----------------------------------------------------------------------------------


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
    # SEV-SNP: the product decides the report version and the TCB layout; SMT and the socket count are
    # what the SMT and SINGLE_SOCKET guest policy bits are checked against.
    product: str = Product.GENOA.value
    smt: bool = True
    sockets: int = 1

    def __post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"{name} must be 0..255")
        if self.max_guests < 0 or self.max_es_guests < 0 or self.max_guests + self.max_es_guests == 0:
            raise ValueError("the chip needs at least one ASID")
        if not self.generation or not self.generation.isprintable():
            raise ValueError("generation must be a printable label")
        if self.product not in {p.value for p in Product}:
            raise ValueError(f"product must be one of {', '.join(p.value for p in Product)}")
        if not 1 <= self.sockets <= 8:
            raise ValueError("sockets must be 1..8")

    @property
    def snp_product(self) -> Product:
        return Product(self.product)

    @property
    def api_version(self) -> tuple[int, int]:
        return (self.api_major, self.api_minor)

    @property
    def es_enabled(self) -> bool:
        return self.max_es_guests > 0


# -- persistent chip state -------------------------------------------------------------------------


class GuestState(IntEnum):
    """GSTATE (55766 section 6.1.1); the migration states SUPDATE/RUPDATE are not emulated."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3


@dataclass
class KeyedCert:
    """A platform key pair and its certificate. `key` is None for an externally owned OCA: the owner
    keeps that private key, the firmware only its certificate."""

    cert: bytes
    key: str | None = field(default=None, repr=False)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        if self.key is None:
            raise RuntimeError("the firmware does not hold this private key")
        return load_ec(self.key)

    def certificate(self) -> SEVCertificate:
        return SEVCertificate.from_bytes(self.cert)

    def to_json(self) -> dict[str, Any]:
        return {"cert": _b64(self.cert), "key": self.key}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> KeyedCert | None:
        if data is None:
            return None
        data = _obj(data, "a platform key")
        cert = _b64_field(data["cert"], "a platform certificate")
        if len(cert) != CERT_SIZE:
            raise EmulatorStateError(f"a platform certificate in {STATE_FILE} is {len(cert)} bytes")
        # `key` is checked where it is used (`private_key`): a bad one fails the commands that sign.
        return cls(cert=cert, key=data["key"])


@dataclass
class Guest:
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
    def from_json(cls, data: object, config: ChipConfig) -> Guest:
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
class Chip:
    config: ChipConfig
    chip_id: bytes
    platform_state: PlatformState  # UNINIT or INIT; WORKING is derived from the guests
    owned_externally: bool
    oca: KeyedCert | None
    pek: KeyedCert | None
    pdh: KeyedCert | None
    next_handle: int = 1
    commands: int = 0  # commands that changed the state, for diagnostics
    guests: dict[int, Guest] = field(default_factory=dict)
    snp: SnpPlatform | None = None

    @property
    def guest_count(self) -> int:
        """SEV, SEV-ES and SEV-SNP guests: all hold an ASID of this chip."""
        return len(self.guests) + (len(self.snp.guests) if self.snp is not None else 0)

    def used_asids(self) -> set[int]:
        used = {g.asid for g in self.guests.values()}
        if self.snp is not None:
            used |= {g.asid for g in self.snp.guests.values()}
        return used

    @property
    def state(self) -> PlatformState:
        if self.platform_state is PlatformState.INIT and self.guest_count:
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
            "snp": self.snp.to_json() if self.snp is not None else None,
        }
        return json.dumps(doc, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Chip:
        """The chip of a `state.json`, checked for types and ranges: a damaged one (also well-formed JSON
        with a wrong type, a negative ASID, a duplicate handle) is an `EmulatorStateError` here, not a
        raw exception in some later command."""
        doc = _obj(json.loads(raw), STATE_FILE)
        if doc.get("format") != STATE_FORMAT:
            raise EmulatorStateError(f"{STATE_FILE} has format {doc.get('format')!r}, not {STATE_FORMAT}")
        config_doc = _obj(doc["config"], "config")
        for name, value in config_doc.items():
            if name in ("generation", "product"):
                _str(value, f"config {name}")
            elif name == "smt":
                _bool(value, "config smt")
            else:
                _int(value, f"config {name}", 0, U32_MAX)
        try:
            config = ChipConfig(**config_doc)
        except (TypeError, ValueError) as exc:
            raise _bad(f"config: {exc}") from None
        guests: dict[int, Guest] = {}
        asids: set[int] = set()
        for entry in _list(doc["guests"], "guests"):
            guest = Guest.from_json(entry, config)
            if guest.handle in guests or guest.asid in asids:
                raise _bad(f"guest {guest.handle} or its ASID {guest.asid} appears twice")
            guests[guest.handle] = guest
            asids.add(guest.asid)
        snp = SnpPlatform.from_json(doc.get("snp"), config.snp_product)
        for snp_guest in snp.guests.values() if snp is not None else ():
            if snp_guest.handle in guests or snp_guest.asid in asids:
                raise _bad(f"SNP guest {snp_guest.handle} or its ASID {snp_guest.asid} appears twice")
            asids.add(snp_guest.asid)
        handles = set(guests) | (set(snp.guests) if snp is not None else set())
        next_handle = _int(doc["next_handle"], "next_handle", 1, U32_MAX + 1)
        if handles and next_handle <= max(handles):
            raise _bad(f"next_handle {next_handle} is not above every guest handle")
        return cls(
            config=config,
            chip_id=_hex(doc["chip_id"], "chip_id", CHIP_ID_SIZE),
            platform_state=PlatformState(
                _int(doc["platform_state"], "platform_state", PlatformState.UNINIT, PlatformState.INIT)
            ),
            owned_externally=_bool(doc["owned_externally"], "owned_externally"),
            oca=KeyedCert.from_json(doc["oca"]),
            pek=KeyedCert.from_json(doc["pek"]),
            pdh=KeyedCert.from_json(doc["pdh"]),
            next_handle=next_handle,
            commands=_int(doc["commands"], "commands"),
            guests=guests,
            snp=snp,
        )
