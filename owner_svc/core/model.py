"""The owner's domain objects: workloads, sessions, audit events. Pure data, validated on construction.

Validation here is the one place a malformed admin request is refused (INVALID_ARGUMENT), before anything
is written. Allow-lists are never empty: an empty list is a mistake, never "allow all" (STYLE.md rule 4).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from owner_svc.core.reasons import Reason
from owner_svc.core.snp_model import SnpRules
from sevlaunch.errors import InvalidArgument
from sevlaunch.sev.errors import MalformedInput
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import VMSALayout

#: PROTOCOL.md §6: OVMF's secret area is 3072 bytes unless the firmware image says otherwise.
DEFAULT_SECRET_AREA_SIZE = 3072
MAX_SECRET_AREA_SIZE = 1 << 20
WORKLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SESSION_ID_RE = re.compile(r"[0-9a-f]{32}")
KNOWN_GENERATION_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VCPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_SECRET_ENTRIES = 64


def check_workload_id(value: str) -> str:
    if not isinstance(value, str) or not WORKLOAD_ID_RE.fullmatch(value):
        raise InvalidArgument(
            Reason.BAD_WORKLOAD_ID, "workload id must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
        )
    return value


def check_session_id(value: str) -> str:
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise InvalidArgument(Reason.BAD_SESSION_ID, "session id must be 32 lower-hex characters")
    return value


def check_guid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(Reason.BAD_GUID, "secret entry GUID is not a GUID") from None


def check_policy(value: int, what: str = "policy") -> GuestPolicy:
    try:
        return GuestPolicy(value)
    except (MalformedInput, TypeError) as exc:
        raise InvalidArgument(Reason.BAD_POLICY, f"{what}: {exc}") from None


@dataclass(frozen=True)
class FirmwareMinimum:
    """Lowest acceptable firmware, compared as the tuple (api_major, api_minor, build_id)."""

    api_major: int = 0
    api_minor: int = 0
    build_id: int = 0

    def __post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
                raise InvalidArgument(Reason.BAD_FIRMWARE_MINIMUM, f"{name} must be 0..255")

    def api_ok(self, api_major: int, api_minor: int) -> bool:
        return (api_major, api_minor) >= (self.api_major, self.api_minor)

    def ok(self, api_major: int, api_minor: int, build_id: int) -> bool:
        return (api_major, api_minor, build_id) >= (self.api_major, self.api_minor, self.build_id)


class KernelHashesRule(StrEnum):
    """Whether a workload accepts launch digests that measure kernel hashes (QEMU's `kernel-hashes=on`:
    kernel, initrd and command line given to QEMU, their hashes measured in OVMF's hashes table)."""

    #: Only plain firmware boots (no kernel hashes): the default, so a workload that says nothing about
    #: kernels is not opened to every kernel and command line a publisher ever listed.
    FORBIDDEN = "forbidden"
    #: Only digests with kernel hashes: the guest boots exactly the kernel, initrd and command line listed.
    REQUIRED = "required"
    #: Either.
    ANY = "any"


def _bad_selector(field: str, text: str) -> InvalidArgument:
    """A selector refusal naming its field (ErrorInfo metadata `field`), so the admin knows what to fix."""
    return InvalidArgument(Reason.BAD_SELECTOR, text, metadata={"field": field})


@dataclass(frozen=True)
class RefSelector:
    """Which launch digests from the trusted manifests a workload accepts.

    A digest is accepted when its manifest names this firmware, its version is in [version_min,
    version_max] (an empty bound is open), its mode is listed, its kernel hashes satisfy `kernel_hashes`,
    and (SEV-ES) its vCPU count is listed and its vCPU type and VMSA layout equal the pins, if set.
    """

    firmware_name: str
    modes: tuple[Technology, ...]
    version_min: str = ""
    version_max: str = ""
    sev_es_vcpus: tuple[int, ...] = ()
    kernel_hashes: KernelHashesRule = KernelHashesRule.FORBIDDEN
    #: SEV-ES only; "" = any. Exact match with the manifest's `vcpu_type` (e.g. "EPYC-Milan").
    vcpu_type: str = ""
    #: SEV-ES only; "" = any. One of `sevlaunch.sev.vmsa.VMSALayout` ("init2", "legacy").
    vmsa_layout: str = ""

    def __post_init__(self) -> None:
        if not self.firmware_name or len(self.firmware_name) > 256:
            raise _bad_selector("firmware_name", "a reference value selector needs a firmware name")
        if not self.modes:
            raise _bad_selector("modes", "a reference value selector needs at least one mode")
        if Technology.SEV_ES in self.modes and not self.sev_es_vcpus:
            raise _bad_selector("sev_es_vcpus", "an SEV-ES selector needs its allowed vCPU counts")
        if any(isinstance(n, bool) or not 1 <= n <= 512 for n in self.sev_es_vcpus):
            raise _bad_selector("sev_es_vcpus", "SEV-ES vCPU counts are 1..512")
        if len(self.version_min) > 128 or len(self.version_max) > 128:
            raise _bad_selector("version_min/version_max", "version bounds are at most 128 characters")
        if not isinstance(self.kernel_hashes, KernelHashesRule):
            raise _bad_selector("kernel_hashes", "kernel_hashes is forbidden, required or any")
        if (self.vcpu_type or self.vmsa_layout) and Technology.SEV_ES not in self.modes:
            raise _bad_selector("modes", "vcpu_type and vmsa_layout pins need the SEV-ES mode")
        if self.vcpu_type and not VCPU_TYPE_RE.fullmatch(self.vcpu_type):
            raise _bad_selector("vcpu_type", "vcpu_type is a CPU model name such as 'EPYC-Milan'")
        if self.vmsa_layout and self.vmsa_layout not in {v.value for v in VMSALayout}:
            layouts = ", ".join(v.value for v in VMSALayout)
            raise _bad_selector("vmsa_layout", f"vmsa_layout is one of {layouts}")

    def to_obj(self) -> dict[str, Any]:
        return {
            "firmware_name": self.firmware_name,
            "modes": [m.value for m in self.modes],
            "version_min": self.version_min,
            "version_max": self.version_max,
            "sev_es_vcpus": list(self.sev_es_vcpus),
            "kernel_hashes": self.kernel_hashes.value,
            "vcpu_type": self.vcpu_type,
            "vmsa_layout": self.vmsa_layout,
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> RefSelector:
        return cls(
            firmware_name=o["firmware_name"],
            modes=tuple(Technology(m) for m in o["modes"]),
            version_min=o.get("version_min", ""),
            version_max=o.get("version_max", ""),
            sev_es_vcpus=tuple(o.get("sev_es_vcpus", ())),
            # A row written before the rule existed gets the safe default.
            kernel_hashes=KernelHashesRule(o.get("kernel_hashes", KernelHashesRule.FORBIDDEN.value)),
            vcpu_type=o.get("vcpu_type", ""),
            vmsa_layout=o.get("vmsa_layout", ""),
        )


@dataclass(frozen=True)
class Workload:
    workload_id: str
    allowed_policies: tuple[int, ...]
    generations: tuple[str, ...]
    selectors: tuple[RefSelector, ...]
    firmware_minimum: FirmwareMinimum = field(default_factory=FirmwareMinimum)
    allow_debug: bool = False
    allow_key_sharing: bool = False
    secret_area_size: int = DEFAULT_SECRET_AREA_SIZE
    #: The owner consents to a launch whose measurement matched but that gets no secret (the workload
    #: has no secret table): ReleaseSecret then succeeds with `no_secret`. Off: such a release is refused.
    allow_launch_without_secret: bool = False
    #: Firmware older than API 0.17 leaves its API version and build out of the measurement, so what the
    #: host reports for them is unchecked and `firmware_minimum` cannot be enforced. Off: a release for
    #: such firmware is refused (`firmware_too_old`).
    allow_pre_0_17: bool = False
    #: SEV-SNP launches of this workload (`snp_model`); None: the owner authorises none.
    snp: SnpRules | None = None

    def __post_init__(self) -> None:
        check_workload_id(self.workload_id)
        if self.snp is not None and not isinstance(self.snp, SnpRules):
            raise InvalidArgument(Reason.BAD_WORKLOAD, "snp must be SNP rules")
        for flag in ("allow_debug", "allow_key_sharing", "allow_launch_without_secret", "allow_pre_0_17"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidArgument(Reason.BAD_WORKLOAD, f"{flag} must be true or false")
        if not self.allowed_policies:
            raise InvalidArgument(
                "bad_workload", "allowed_policies is empty: no launch could ever be allowed"
            )
        for p in self.allowed_policies:
            policy = check_policy(p, "allowed policy")
            # A debug or key-sharing policy in the list is refused unless the owner said so explicitly,
            # so a typo (0x0 for 0x3) cannot silently open the guest's memory to the host.
            if policy.allows_debug and not self.allow_debug:
                raise InvalidArgument(Reason.BAD_WORKLOAD, f"policy {p:#x} allows debugging; set allow_debug")
            if policy.allows_key_sharing and not self.allow_key_sharing:
                raise InvalidArgument(
                    "bad_workload", f"policy {p:#x} allows key sharing; set allow_key_sharing"
                )
        if not self.generations:
            raise InvalidArgument(
                Reason.BAD_WORKLOAD, "generations is empty: no platform could ever be trusted"
            )
        for g in self.generations:
            if not isinstance(g, str) or not KNOWN_GENERATION_RE.fullmatch(g):
                raise InvalidArgument(
                    "bad_workload", "a generation is a lower-case root name such as 'milan'"
                )
        if not self.selectors:
            raise InvalidArgument(
                Reason.BAD_WORKLOAD, "a workload needs at least one reference value selector"
            )
        if isinstance(self.secret_area_size, bool) or not 52 <= self.secret_area_size <= MAX_SECRET_AREA_SIZE:
            raise InvalidArgument(Reason.BAD_WORKLOAD, f"secret_area_size must be 52..{MAX_SECRET_AREA_SIZE}")

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "workload_id": self.workload_id,
            "allowed_policies": list(self.allowed_policies),
            "generations": list(self.generations),
            "selectors": [s.to_obj() for s in self.selectors],
            "firmware_minimum": [
                self.firmware_minimum.api_major,
                self.firmware_minimum.api_minor,
                self.firmware_minimum.build_id,
            ],
            "allow_debug": self.allow_debug,
            "allow_key_sharing": self.allow_key_sharing,
            "secret_area_size": self.secret_area_size,
            "allow_launch_without_secret": self.allow_launch_without_secret,
            "allow_pre_0_17": self.allow_pre_0_17,
        }
        # Only when set: a workload without SNP rules keeps the JSON (and the row MAC) it always had.
        if self.snp is not None:
            obj["snp"] = self.snp.to_obj()
        return json.dumps(obj, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Workload:
        o = json.loads(text)
        return cls(
            workload_id=o["workload_id"],
            allowed_policies=tuple(o["allowed_policies"]),
            generations=tuple(o["generations"]),
            selectors=tuple(RefSelector.from_obj(s) for s in o["selectors"]),
            firmware_minimum=FirmwareMinimum(*o["firmware_minimum"]),
            allow_debug=o["allow_debug"],
            allow_key_sharing=o["allow_key_sharing"],
            secret_area_size=o["secret_area_size"],
            # Rows written before these flags existed: the safe defaults.
            allow_launch_without_secret=o.get("allow_launch_without_secret", False),
            allow_pre_0_17=o.get("allow_pre_0_17", False),
            snp=SnpRules.from_obj(o["snp"]) if o.get("snp") is not None else None,
        )


@dataclass(frozen=True)
class SecretEntry:
    guid: uuid.UUID
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"SecretEntry(guid={self.guid}, data=<{len(self.data)} bytes hidden>)"


class SessionState(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    REFUSED = "refused"  # a release was refused on the merits: the launch it was for is abandoned
    REVOKED = "revoked"


class SessionStatus(StrEnum):
    """A session's state as shown at a given time: a stored OPEN session past its expiry is EXPIRED."""

    OPEN = "open"
    EXPIRED = "expired"
    RELEASED = "released"
    REFUSED = "refused"
    REVOKED = "revoked"


@dataclass(frozen=True)
class SessionRecord:
    """A stored session. `sealed_keys` is TEK‖TIK sealed under the KEK; the record never holds them clear."""

    session_id: str
    workload_id: str
    caller: str
    policy: int
    generation: str
    cek_fingerprint: str
    godh_cert: bytes
    session_blob: bytes
    sealed_keys: bytes = field(repr=False)
    created_at: float
    expires_at: float
    state: SessionState = SessionState.OPEN
    finished_at: float | None = None
    matched_digest: str = ""
    reason: str = ""

    def status(self, now: float) -> SessionStatus:
        if self.state is SessionState.OPEN and now >= self.expires_at:
            return SessionStatus.EXPIRED
        return SessionStatus(self.state.value)


@dataclass(frozen=True)
class AuditEvent:
    """One decision, before it is chained. Never holds a key or a secret: ids, names and reasons only."""

    actor: str
    action: str
    outcome: str  # "allowed" | "refused"
    workload_id: str = ""
    session_id: str = ""
    cek_fingerprint: str = ""
    reason: str = ""
    digest: str = ""
    detail: str = ""
    # The launcher's launch id for this decision (x-sevlaunch-launch-id), so one launch's records can be
    # found beside the launcher's and platform's log lines. Left out of the canonical text when empty,
    # so records written before it existed keep their hashes.
    launch_id: str = ""


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    event: AuditEvent
    prev_hash: str
    hash: str
    mac: str


def keys_aad(session_id: str) -> bytes:
    """The AAD sealing a session's TEK‖TIK: the sealed keys open only in their own row."""
    return f"sevlaunch-owner/v1/session-keys/{session_id}".encode()


def secret_aad(workload_id: str) -> bytes:
    """The AAD sealing a workload's secret table."""
    return f"sevlaunch-owner/v1/secret/{workload_id}".encode()
