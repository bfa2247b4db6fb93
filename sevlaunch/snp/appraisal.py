"""Verifying an SEV-SNP attestation report against its VCEK/VLEK, then appraising it against the owner's
policy (PROTOCOL.md section 11).

Two steps, both raising typed errors whose detail names the field or check refused:

* `verify_report(report, vek)`: the report is authentic. `vek` is a `VerifiedVek` (its chain verified once
  by `certs.verify_vek_chain` and kept), so per report this is: parse, SIGNING_KEY against the certificate
  kind, the ECDSA P-384 signature over 0x000-0x29F, the product, REPORTED_TCB against the certificate's
  SPL extensions and CHIP_ID against its hwID (VCEK; a VLEK is not chip-bound, its chip id may be masked).
* `appraise(report, policy)`: the authentic report is acceptable: report version, signing key kind, VMPL,
  guest policy bits (DEBUG and MIGRATE_MA refused unless allowed), platform info, TCB order and minimums
  (reported, committed, launch: the host can set the reported TCB lower, so the committed and launch TCBs
  matter), provisional firmware, chip ids, guest SVN and the expected measurement, host data, report data,
  key digests and image ids. Deny by default: the default policy refuses debug, migration agents, VLEKs,
  VMPL > 0 and provisional firmware.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from sevlaunch.sev.errors import MalformedInput, VerificationFailed
from sevlaunch.snp.certs import CertKind, TrustedRoot, VerifiedVek, verify_vek_chain
from sevlaunch.snp.errors import SnpReason
from sevlaunch.snp.policy import (
    PLATFORM_INFO_NAMES,
    POLICY_FLAG_NAMES,
    PlatformInfo,
    PolicyFlag,
    SnpGuestPolicy,
)
from sevlaunch.snp.report import SUPPORTED_VERSIONS, AttestationReport, SigningKey
from sevlaunch.snp.tcb import Product, TcbVersion

_KIND_OF_KEY = {SigningKey.VCEK: CertKind.VCEK, SigningKey.VLEK: CertKind.VLEK}


def verify_report(
    report: AttestationReport | bytes,
    vek: VerifiedVek,
    *,
    product: Product | None = None,
    at: datetime | None = None,
) -> AttestationReport:
    """The parsed report, once it is proven signed by `vek` and consistent with it; raises otherwise.

    `product` (optional) must agree with the VEK's and, on v3+, with the report's CPUID. `at` re-checks the
    VEK's validity at another time than the chain was verified at.
    """
    if not isinstance(report, AttestationReport):
        report = AttestationReport.from_bytes(report)
    if _KIND_OF_KEY.get(report.signing_key) is not vek.kind:
        raise VerificationFailed(
            SnpReason.SIGNING_KEY_MISMATCH,
            f"signing_key: the report says {report.signing_key.name}, "
            f"the certificate is a {vek.kind.value.upper()}",
        )
    report.verify_signature(vek.public_key)
    if product is not None and product is not vek.product:
        raise VerificationFailed(
            SnpReason.PRODUCT_MISMATCH,
            f"product: {product.value} asked, the {vek.kind.value} is {vek.product.value}",
        )
    resolved = report.product(vek.product)
    if at is not None:
        vek.check_validity(at)
    reported = TcbVersion.from_raw(report.reported_tcb, resolved, field="reported_tcb")
    if reported != vek.tcb:
        mine, theirs = reported.components(), vek.tcb.components()
        diff = ", ".join(f"{n} {mine[n]} vs {theirs[n]}" for n in mine if mine[n] != theirs[n])
        raise VerificationFailed(
            SnpReason.TCB_MISMATCH,
            f"reported_tcb: differs from the {vek.kind.value}'s SPL extensions ({diff})",
        )
    if vek.kind is CertKind.VCEK:
        hwid = vek.extensions.hwid
        if hwid is None or not hmac.compare_digest(hwid, report.hwid(resolved)):
            raise VerificationFailed(SnpReason.CHIP_ID_MISMATCH, "chip_id: differs from the VCEK's hwID")
    return report


def verify_attestation(
    report: bytes,
    vek: x509.Certificate,
    product: Product,
    *,
    at: datetime,
    chain: Sequence[x509.Certificate] = (),
    extra_roots: Iterable[TrustedRoot] = (),
    crls: Iterable[x509.CertificateRevocationList] = (),
) -> tuple[AttestationReport, VerifiedVek]:
    """The cold path: the VEK's chain, then the report. Cache the VerifiedVek to verify more reports."""
    verified = verify_vek_chain(vek, product, at=at, chain=chain, extra_roots=extra_roots, crls=crls)
    return verify_report(report, verified, product=product), verified


# --------------------------------------------------------------------------------------------- policy

NO_POLICY_FLAGS = PolicyFlag(0)
NO_PLATFORM_INFO = PlatformInfo(0)
DEFAULT_ALLOWED_POLICY_FLAGS = PolicyFlag(sum(f.value for f in PolicyFlag)) & ~(
    PolicyFlag.DEBUG | PolicyFlag.MIGRATE_MA
)
_EXPECTED_FIELDS = {
    "measurement": 48,
    "host_data": 32,
    "report_data": 64,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "family_id": 16,
    "image_id": 16,
}


@dataclass(frozen=True)
class MinimumTcb:
    """Minimum TCB versions of one product; None: no minimum."""

    reported: TcbVersion | None = None
    committed: TcbVersion | None = None
    launch: TcbVersion | None = None


@dataclass(frozen=True)
class AppraisalPolicy:
    """What an owner accepts. Defaults deny: no debug, no migration agent, VCEK only, VMPL 0, no
    provisional firmware. Expected byte fields (measurement, ...) are checked only when set."""

    report_versions: frozenset[int] = frozenset(SUPPORTED_VERSIONS)
    signing_keys: frozenset[SigningKey] = frozenset({SigningKey.VCEK})
    max_vmpl: int = 0
    allowed_policy_flags: PolicyFlag = DEFAULT_ALLOWED_POLICY_FLAGS
    required_policy_flags: PolicyFlag = NO_POLICY_FLAGS
    min_abi: tuple[int, int] = (0, 0)
    required_platform_info: PlatformInfo = NO_PLATFORM_INFO
    refused_platform_info: PlatformInfo = NO_PLATFORM_INFO
    min_tcb: Mapping[Product, MinimumTcb] = field(default_factory=dict)
    allow_provisional_firmware: bool = False
    min_firmware: tuple[int, int, int] | None = None  # (major, minor, build) of the committed firmware
    chip_ids: frozenset[bytes] | None = None  # None: any chip; 64-byte chip ids or Turin's 8-byte hwIDs
    min_guest_svn: int = 0
    measurement: bytes | None = None
    host_data: bytes | None = None
    report_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    family_id: bytes | None = None
    image_id: bytes | None = None

    def __post_init__(self) -> None:
        for name, size in _EXPECTED_FIELDS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or len(value) != size):
                raise MalformedInput(SnpReason.BAD_APPRAISAL_POLICY, f"{name}: must be {size} bytes")
        for chip in self.chip_ids or ():
            if len(chip) not in (8, 64):
                raise MalformedInput(SnpReason.BAD_APPRAISAL_POLICY, "chip_ids: each must be 8 or 64 bytes")
        if PolicyFlag.RESERVED_MBO in self.required_policy_flags:
            raise MalformedInput(
                SnpReason.BAD_APPRAISAL_POLICY, "required_policy_flags: bit 17 is not a flag"
            )

    @classmethod
    def from_json(cls, data: object) -> AppraisalPolicy:
        """A policy document (parsed JSON). Unknown keys are refused, so a typo cannot weaken a policy."""
        return _policy_from_json(data)


def appraise(report: AttestationReport, policy: AppraisalPolicy, *, product: Product | None = None) -> None:
    """Raises VerificationFailed (or MalformedInput for an ill-formed guest policy) naming the first field
    that `policy` refuses. Call it on a report `verify_report` returned."""
    if report.version not in policy.report_versions:
        raise VerificationFailed(SnpReason.VERSION_REFUSED, f"version: {report.version} not allowed")
    if report.signing_key not in policy.signing_keys:
        raise VerificationFailed(
            SnpReason.SIGNING_KEY_REFUSED, f"signing_key: {report.signing_key.name} not allowed"
        )
    if report.vmpl > policy.max_vmpl:
        raise VerificationFailed(SnpReason.VMPL_REFUSED, f"vmpl: {report.vmpl} > {policy.max_vmpl}")
    _appraise_guest_policy(report.guest_policy(), policy)
    info = PlatformInfo(report.platform_info & sum(f.value for f in PlatformInfo))
    if missing := policy.required_platform_info & ~info:
        raise VerificationFailed(
            SnpReason.PLATFORM_INFO_REFUSED, f"platform_info: {_names(missing)} required"
        )
    if refused := policy.refused_platform_info & info:
        raise VerificationFailed(SnpReason.PLATFORM_INFO_REFUSED, f"platform_info: {_names(refused)} refused")
    resolved = report.product(product)
    _appraise_tcb(report, resolved, policy)
    if policy.chip_ids is not None:
        if report.chip_id_masked:
            raise VerificationFailed(SnpReason.CHIP_ID_REFUSED, "chip_id: masked, but the policy names chips")
        if not any(hmac.compare_digest(report.chip_id[: len(c)], c) for c in policy.chip_ids):
            raise VerificationFailed(SnpReason.CHIP_ID_REFUSED, "chip_id: not an allowed chip")
    if report.guest_svn < policy.min_guest_svn:
        raise VerificationFailed(
            SnpReason.GUEST_SVN_TOO_LOW, f"guest_svn: {report.guest_svn} < {policy.min_guest_svn}"
        )
    for name in _EXPECTED_FIELDS:
        expected = getattr(policy, name)
        if expected is not None and not hmac.compare_digest(getattr(report, name), expected):
            raise VerificationFailed(SnpReason.FIELD_MISMATCH, f"{name}: not the expected value")


def _names(flags: PolicyFlag | PlatformInfo) -> str:
    return ", ".join(f.name.lower() for f in type(flags) if f in flags and f.name is not None)


def _appraise_guest_policy(guest: SnpGuestPolicy, policy: AppraisalPolicy) -> None:
    flags = guest.flags & ~PolicyFlag.RESERVED_MBO
    if refused := flags & ~policy.allowed_policy_flags:
        raise VerificationFailed(
            SnpReason.GUEST_POLICY_REFUSED,
            f"policy.{_names(refused).replace(', ', ', policy.')}: not allowed",
        )
    if missing := policy.required_policy_flags & ~flags:
        raise VerificationFailed(
            SnpReason.GUEST_POLICY_REFUSED, f"policy.{_names(missing).replace(', ', ', policy.')}: required"
        )
    if guest.abi < policy.min_abi:
        raise VerificationFailed(
            SnpReason.GUEST_POLICY_REFUSED,
            f"policy.abi: {guest.abi_major}.{guest.abi_minor} < {policy.min_abi[0]}.{policy.min_abi[1]}",
        )


def _dotted_version(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _appraise_tcb(report: AttestationReport, product: Product, policy: AppraisalPolicy) -> None:
    tcbs = report.tcbs(product)
    if not tcbs.reported <= tcbs.committed:
        raise VerificationFailed(
            SnpReason.TCB_ORDER, f"reported_tcb ({tcbs.reported}) > committed_tcb ({tcbs.committed})"
        )
    if not tcbs.committed <= tcbs.current:
        raise VerificationFailed(
            SnpReason.TCB_ORDER, f"committed_tcb ({tcbs.committed}) > current_tcb ({tcbs.current})"
        )
    provisional = tcbs.committed != tcbs.current or report.committed_version != report.current_version
    if provisional and not policy.allow_provisional_firmware:
        raise VerificationFailed(
            SnpReason.PROVISIONAL_FIRMWARE,
            f"committed_tcb/committed_version: firmware {_dotted_version(report.current_version)} "
            f"({tcbs.current}) is not committed "
            f"({_dotted_version(report.committed_version)}, {tcbs.committed})",
        )
    if policy.min_firmware is not None and report.committed_version < policy.min_firmware:
        raise VerificationFailed(
            SnpReason.TCB_TOO_LOW,
            f"committed_version: {'.'.join(map(str, report.committed_version))} < "
            f"{'.'.join(map(str, policy.min_firmware))}",
        )
    minimum = policy.min_tcb.get(product)
    if minimum is None:
        return
    for name in ("reported", "committed", "launch"):
        floor = getattr(minimum, name)
        if floor is not None and (short := getattr(tcbs, name).shortfall(floor)):
            raise VerificationFailed(SnpReason.TCB_TOO_LOW, f"{name}_tcb: {', '.join(short)}")


# ------------------------------------------------------------------------------------ policy documents

_POLICY_KEYS = {
    "report_versions",
    "signing_keys",
    "max_vmpl",
    "allowed_policy_flags",
    "required_policy_flags",
    "min_abi",
    "required_platform_info",
    "refused_platform_info",
    "min_tcb",
    "allow_provisional_firmware",
    "min_firmware",
    "chip_ids",
    "min_guest_svn",
    *_EXPECTED_FIELDS,
}


def _bad(detail: str) -> MalformedInput:
    return MalformedInput(SnpReason.BAD_APPRAISAL_POLICY, detail)


def _int(value: object, name: str, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise _bad(f"{name}: expected an integer 0..{(1 << bits) - 1}")
    return value


def _list(value: object, name: str) -> list[object]:
    if not isinstance(value, list):
        raise _bad(f"{name}: expected a list")
    return value


def _flags(value: object, name: str, table: Mapping[str, PolicyFlag] | Mapping[str, PlatformInfo]) -> int:
    out = 0
    for item in _list(value, name):
        if not isinstance(item, str) or item.lower() not in table:
            raise _bad(f"{name}: {item!r} is none of {', '.join(table)}")
        out |= table[item.lower()]
    return out


def _hex(value: object, name: str) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        raise _bad(f"{name}: expected hex") from None


def _dotted(value: object, name: str, parts: int) -> tuple[int, ...]:
    try:
        if not isinstance(value, str):
            raise ValueError
        numbers = tuple(int(p) for p in value.split("."))
    except ValueError:
        raise _bad(f"{name}: expected {'.'.join(['N'] * parts)}") from None
    if len(numbers) != parts or any(not 0 <= n <= 0xFF for n in numbers):
        raise _bad(f"{name}: expected {parts} numbers 0..255")
    return numbers


def _policy_from_json(data: object) -> AppraisalPolicy:
    if not isinstance(data, dict):
        raise _bad("expected a JSON object")
    if unknown := set(data) - _POLICY_KEYS:
        raise _bad(f"unknown key(s) {sorted(unknown)}")
    kwargs: dict[str, object] = {}
    if "report_versions" in data:
        versions = frozenset(
            _int(v, "report_versions", 32) for v in _list(data["report_versions"], "report_versions")
        )
        if not versions <= frozenset(SUPPORTED_VERSIONS):
            raise _bad("report_versions: only 2..5 exist")
        kwargs["report_versions"] = versions
    if "signing_keys" in data:
        keys = {"vcek": SigningKey.VCEK, "vlek": SigningKey.VLEK}
        items = _list(data["signing_keys"], "signing_keys")
        if any(not isinstance(k, str) or k.lower() not in keys for k in items):
            raise _bad("signing_keys: each must be vcek or vlek")
        kwargs["signing_keys"] = frozenset(keys[str(k).lower()] for k in items)
    if "max_vmpl" in data:
        kwargs["max_vmpl"] = _int(data["max_vmpl"], "max_vmpl", 2)
    for key in ("allowed_policy_flags", "required_policy_flags"):
        if key in data:
            kwargs[key] = PolicyFlag(_flags(data[key], key, POLICY_FLAG_NAMES))
    for key in ("required_platform_info", "refused_platform_info"):
        if key in data:
            kwargs[key] = PlatformInfo(_flags(data[key], key, PLATFORM_INFO_NAMES))
    if "min_abi" in data:
        kwargs["min_abi"] = _dotted(data["min_abi"], "min_abi", 2)
    if "min_firmware" in data:
        kwargs["min_firmware"] = _dotted(data["min_firmware"], "min_firmware", 3)
    if "allow_provisional_firmware" in data:
        if not isinstance(data["allow_provisional_firmware"], bool):
            raise _bad("allow_provisional_firmware: expected true or false")
        kwargs["allow_provisional_firmware"] = data["allow_provisional_firmware"]
    if "min_guest_svn" in data:
        kwargs["min_guest_svn"] = _int(data["min_guest_svn"], "min_guest_svn", 32)
    if "chip_ids" in data:
        kwargs["chip_ids"] = frozenset(_hex(c, "chip_ids") for c in _list(data["chip_ids"], "chip_ids"))
    for key in _EXPECTED_FIELDS:
        if key in data:
            kwargs[key] = _hex(data[key], key)
    if "min_tcb" in data:
        kwargs["min_tcb"] = _min_tcb_from_json(data["min_tcb"])
    return AppraisalPolicy(**kwargs)  # type: ignore[arg-type]


def _min_tcb_from_json(data: object) -> dict[Product, MinimumTcb]:
    if not isinstance(data, dict):
        raise _bad("min_tcb: expected {product: {reported|committed|launch: {SPLs}}}")
    out: dict[Product, MinimumTcb] = {}
    for name, entry in data.items():
        try:
            product = Product(name)
        except ValueError:
            raise _bad(f"min_tcb: {name!r} is none of milan, genoa, turin") from None
        if not isinstance(entry, dict) or set(entry) - {"reported", "committed", "launch"}:
            raise _bad(f"min_tcb.{name}: keys are reported, committed, launch")
        out[product] = MinimumTcb(
            **{
                kind: TcbVersion.from_json(value, product, field=f"min_tcb.{name}.{kind}")
                for kind, value in entry.items()
            }
        )
    return out
