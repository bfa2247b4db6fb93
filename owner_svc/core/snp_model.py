"""A workload's SEV-SNP rules and the owner's SNP records: pure data, validated on construction.

The rules say which SNP launches the owner authorises (AuthorizeSnpLaunch) and which reports it accepts
(Attest): the products and their minimum TCBs, the 64-bit guest policies, the launch configurations
(vCPU counts and types, guest features, VMM types) and what the reference values must vouch for (family
and image id, a guest SVN floor). Deny by default: no debug, no migration agent, VCEKs only, committed
firmware only, and every allow-list non-empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from owner_svc.core.reasons import Reason
from sevlaunch.errors import InvalidArgument
from sevlaunch.refvalues import SNP_MAX_VCPUS, SNP_VMM_TYPES
from sevlaunch.sev.errors import MalformedInput, SevError
from sevlaunch.snp.appraisal import DEFAULT_ALLOWED_POLICY_FLAGS, MinimumTcb
from sevlaunch.snp.policy import PolicyFlag, SnpGuestPolicy
from sevlaunch.snp.tcb import Product, TcbVersion

ID_SIZE = 16
MAX_LIST = 64
VCPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
AUTHORIZATION_ID_RE = re.compile(r"snp-[0-9a-f]{32}")
TCB_KINDS = ("reported", "committed", "launch")


def _bad(detail: str) -> InvalidArgument:
    return InvalidArgument(Reason.BAD_WORKLOAD, f"snp.{detail}")


def check_snp_policy(value: int, *, allow_debug: bool, allow_migration_agent: bool) -> SnpGuestPolicy:
    """A 64-bit guest policy the rules may allow: well-formed, and DEBUG / MIGRATE_MA only when the
    workload says so explicitly (so a typo cannot open the guest's memory to the host)."""
    try:
        policy = SnpGuestPolicy.from_int(value)
    except (MalformedInput, TypeError) as exc:
        raise InvalidArgument(Reason.BAD_POLICY, f"SNP policy: {exc}") from None
    if policy.debug and not allow_debug:
        raise _bad(f"policies: {value:#x} allows debugging; set allow_debug")
    if policy.migrate_ma and not allow_migration_agent:
        raise _bad(f"policies: {value:#x} allows a migration agent; set allow_migration_agent")
    return policy


@dataclass(frozen=True)
class SnpTcbFloor:
    """The least reported, committed and launch TCB of one product (None: no floor of that kind)."""

    product: Product
    reported: TcbVersion | None = None
    committed: TcbVersion | None = None
    launch: TcbVersion | None = None

    def __post_init__(self) -> None:
        for kind in TCB_KINDS:
            tcb = getattr(self, kind)
            if tcb is not None and tcb.product is not self.product:
                raise _bad(f"min_tcb.{self.product.value}.{kind}: a {tcb.product.value} TCB")
        if all(getattr(self, kind) is None for kind in TCB_KINDS):
            raise _bad(f"min_tcb.{self.product.value}: names no TCB")

    def minimum(self) -> MinimumTcb:
        return MinimumTcb(reported=self.reported, committed=self.committed, launch=self.launch)

    def to_obj(self) -> dict[str, Any]:
        return {k: getattr(self, k).raw for k in TCB_KINDS if getattr(self, k) is not None}

    @classmethod
    def from_obj(cls, product: Product, o: dict[str, Any]) -> SnpTcbFloor:
        return cls(
            product,
            **{k: _tcb(o[k], product, k) for k in TCB_KINDS if o.get(k) is not None},
        )


def _tcb(raw: object, product: Product, kind: str) -> TcbVersion:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise _bad(f"min_tcb.{product.value}.{kind}: a raw TCB_VERSION (u64)")
    try:
        return TcbVersion.from_raw(raw, product, field=f"min_tcb.{product.value}.{kind}")
    except SevError as exc:
        raise _bad(exc.detail) from None


@dataclass(frozen=True)
class SnpRules:
    """What SEV-SNP launches of a workload the owner authorises and attests."""

    products: tuple[Product, ...]
    #: The 64-bit guest policies allowed; the first is the one authorised when the launcher names none.
    policies: tuple[int, ...]
    vcpu_counts: tuple[int, ...]
    #: SEV_FEATURES values (the VMSA's, bit 0 SNPActive) a launch may use.
    guest_features: tuple[int, ...]
    vmm_types: tuple[str, ...] = ("QEMU",)
    #: vCPU types allowed; empty: whatever the reference digests were computed for.
    vcpu_types: tuple[str, ...] = ()
    min_tcb: tuple[SnpTcbFloor, ...] = ()
    allow_provisional_firmware: bool = False
    allow_debug: bool = False
    allow_migration_agent: bool = False
    allow_vlek: bool = False
    #: Pins on the reference values' family and image id (None: the manifest's, whatever they are).
    family_id: bytes | None = field(default=None)
    image_id: bytes | None = field(default=None)
    #: The least guest SVN a reference value may vouch for (an older, vulnerable build is not authorised).
    min_guest_svn: int = 0
    #: Sign the ID key with the workload's author key (AUTHOR_KEY_EN): the report then names both keys.
    use_author_key: bool = True

    def __post_init__(self) -> None:
        for flag in (
            "allow_provisional_firmware",
            "allow_debug",
            "allow_migration_agent",
            "allow_vlek",
            "use_author_key",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(f"{flag} must be true or false")
        if not self.products or not all(isinstance(p, Product) for p in self.products):
            raise _bad("products: at least one of milan, genoa, turin")
        if len(set(self.products)) != len(self.products):
            raise _bad("products: listed twice")
        if not self.policies or len(self.policies) > MAX_LIST:
            raise _bad(f"policies: 1..{MAX_LIST} 64-bit guest policies")
        for p in self.policies:
            check_snp_policy(
                p, allow_debug=self.allow_debug, allow_migration_agent=self.allow_migration_agent
            )
        if not self.vcpu_counts or len(self.vcpu_counts) > MAX_LIST:
            raise _bad(f"vcpu_counts: 1..{MAX_LIST} counts")
        if any(isinstance(n, bool) or not 1 <= n <= SNP_MAX_VCPUS for n in self.vcpu_counts):
            raise _bad(f"vcpu_counts: each 1..{SNP_MAX_VCPUS}")
        if not self.guest_features or len(self.guest_features) > MAX_LIST:
            raise _bad(f"guest_features: 1..{MAX_LIST} SEV_FEATURES values")
        if any(isinstance(f, bool) or not 0 <= f < 1 << 64 or not f & 1 for f in self.guest_features):
            raise _bad("guest_features: each a u64 with bit 0 (SNPActive) set")
        if not self.vmm_types or any(v not in SNP_VMM_TYPES for v in self.vmm_types):
            raise _bad(f"vmm_types: one or more of {', '.join(SNP_VMM_TYPES)}")
        if len(self.vcpu_types) > MAX_LIST or any(not VCPU_TYPE_RE.fullmatch(t) for t in self.vcpu_types):
            raise _bad("vcpu_types: CPU model names such as 'EPYC-v4'")
        floors = [f.product for f in self.min_tcb]
        if len(set(floors)) != len(floors):
            raise _bad("min_tcb: a product twice")
        if not set(floors) <= set(self.products):
            raise _bad("min_tcb: a floor for a product that is not allowed")
        for name in ("family_id", "image_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or len(value) != ID_SIZE):
                raise _bad(f"{name}: {ID_SIZE} bytes")
        if isinstance(self.min_guest_svn, bool) or not 0 <= self.min_guest_svn < 1 << 32:
            raise _bad("min_guest_svn: a u32")

    @property
    def allowed_policy_flags(self) -> PolicyFlag:
        flags = DEFAULT_ALLOWED_POLICY_FLAGS
        if self.allow_debug:
            flags |= PolicyFlag.DEBUG
        if self.allow_migration_agent:
            flags |= PolicyFlag.MIGRATE_MA
        return flags

    def floor(self, product: Product) -> SnpTcbFloor | None:
        return next((f for f in self.min_tcb if f.product is product), None)

    def to_obj(self) -> dict[str, Any]:
        return {
            "products": [p.value for p in self.products],
            "policies": list(self.policies),
            "vcpu_counts": list(self.vcpu_counts),
            "guest_features": list(self.guest_features),
            "vmm_types": list(self.vmm_types),
            "vcpu_types": list(self.vcpu_types),
            "min_tcb": {f.product.value: f.to_obj() for f in self.min_tcb},
            "allow_provisional_firmware": self.allow_provisional_firmware,
            "allow_debug": self.allow_debug,
            "allow_migration_agent": self.allow_migration_agent,
            "allow_vlek": self.allow_vlek,
            "family_id": None if self.family_id is None else self.family_id.hex(),
            "image_id": None if self.image_id is None else self.image_id.hex(),
            "min_guest_svn": self.min_guest_svn,
            "use_author_key": self.use_author_key,
        }

    @classmethod
    def from_obj(cls, o: dict[str, Any]) -> SnpRules:
        try:
            products = tuple(Product.parse(p) for p in o["products"])
        except SevError as exc:
            raise _bad(f"products: {exc.detail}") from None
        return cls(
            products=products,
            policies=tuple(o["policies"]),
            vcpu_counts=tuple(o["vcpu_counts"]),
            guest_features=tuple(o["guest_features"]),
            vmm_types=tuple(o["vmm_types"]),
            vcpu_types=tuple(o["vcpu_types"]),
            min_tcb=tuple(SnpTcbFloor.from_obj(Product.parse(k), v) for k, v in o["min_tcb"].items()),
            allow_provisional_firmware=o["allow_provisional_firmware"],
            allow_debug=o["allow_debug"],
            allow_migration_agent=o["allow_migration_agent"],
            allow_vlek=o["allow_vlek"],
            family_id=None if o["family_id"] is None else bytes.fromhex(o["family_id"]),
            image_id=None if o["image_id"] is None else bytes.fromhex(o["image_id"]),
            min_guest_svn=o["min_guest_svn"],
            use_author_key=o["use_author_key"],
        )


# ------------------------------------------------------------------------------------ records


class SnpKeyKind(StrEnum):
    ID = "id"  # signs the ID block; its digest is the report's ID_KEY_DIGEST
    AUTHOR = "author"  # signs the ID key; its digest is the report's AUTHOR_KEY_DIGEST


@dataclass(frozen=True)
class SnpKeyRecord:
    """One stored ID or author key: `sealed` is its PKCS#8 DER sealed under the KEK (never clear)."""

    workload_id: str
    kind: SnpKeyKind
    version: int
    public_digest: str  # SHA-384 of the AMD public key blob, hex: what a report shows
    sealed: bytes = field(repr=False)
    created_at: float
    retired_at: float | None = None
    source: str = "generated"  # or "imported"


class AuthorizationState(StrEnum):
    AUTHORIZED = "authorized"
    RELEASED = "released"
    #: A report of this very launch (authentic, its HOST_DATA authorised, its REPORT_DATA binding a
    #: challenge issued for it) was refused on the merits: the launch is abandoned, as an SEV session is.
    REFUSED = "refused"
    REVOKED = "revoked"


@dataclass(frozen=True)
class SnpAuthorization:
    """An authorised SNP launch: what the ID block and HOST_DATA committed to. Nothing here is secret."""

    authorization_id: str
    workload_id: str
    caller: str
    product: str
    policy: int
    vcpus: int
    launch_digest: str
    manifest_id: str
    host_data: str
    id_key_digest: str
    author_key_digest: str  # "" without an author key
    id_key_version: int
    init_data: bytes
    vek_cert: bytes  # DER: the VCEK/VLEK the platform was authorised with, for an Attest without one
    created_at: float
    expires_at: float
    state: AuthorizationState = AuthorizationState.AUTHORIZED
    finished_at: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class SnpChallengeRecord:
    authorization_id: str
    challenge: str  # hex; a public nonce, single use
    issued_at: float
    expires_at: float
    used_at: float | None = None


def check_authorization_id(value: str) -> str:
    if not isinstance(value, str) or not AUTHORIZATION_ID_RE.fullmatch(value):
        raise InvalidArgument(Reason.BAD_AUTHORIZATION_ID, "authorization id is 'snp-' and 32 lower-hex")
    return value


def snp_key_aad(workload_id: str, kind: SnpKeyKind, version: int) -> bytes:
    """The AAD sealing an ID or author key: it opens only in its own row."""
    return f"sevlaunch-owner/v1/snp-key/{workload_id}/{kind.value}/{version}".encode()
