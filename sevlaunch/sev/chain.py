"""The SEV certificate chain, ARK → ASK → CEK → PEK ← OCA, PEK → PDH, and its verification against
pinned AMD roots (SEV API spec, publication 55766, section 2.4 "Platform Authentication"; PROTOCOL.md §1).

A chain that verifies only against the ARK it carries proves nothing: the ARK must also equal a trusted
root, one of AMD's pinned ones or one the caller passes explicitly (e.g. the emulator's own root).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

from sevlaunch.sev import roots as _roots
from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage, parse_ark, parse_ask_ark
from sevlaunch.sev.cert import CERT_SIZE, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, SevError, VerificationFailed


class Generation(StrEnum):
    NAPLES = "naples"
    ROME = "rome"
    MILAN = "milan"
    GENOA = "genoa"
    TURIN = "turin"


@dataclass(frozen=True)
class TrustedRoot:
    """An ARK/ASK pair the verifier trusts. Construction checks ARK self → ARK→ASK, so a trusted root
    that does not verify cannot exist."""

    name: str
    ark: AMDCertificate
    ask: AMDCertificate
    generation: Generation | None = None

    def __post_init__(self) -> None:
        if self.ark.key_usage is not AMDKeyUsage.ARK or self.ask.key_usage is not AMDKeyUsage.ASK:
            raise MalformedInput(Reason.BAD_FIELD, f"root {self.name!r}: expected an ARK and an ASK")
        self.ark.verify_self_signed()
        self.ask.verify_signed_by(self.ark)


@cache
def pinned_roots() -> tuple[TrustedRoot, ...]:
    """AMD's roots for every generation, from package data (each self-verified once, then cached)."""
    return tuple(
        TrustedRoot(
            name=generation.value,
            ark=AMDCertificate.from_bytes(_roots.ark_bytes(generation.value)),
            ask=AMDCertificate.from_bytes(_roots.ask_bytes(generation.value)),
            generation=generation,
        )
        for generation in Generation
    )


def pinned_root(generation: Generation) -> TrustedRoot:
    for root in pinned_roots():
        if root.generation is generation:
            return root
    raise KeyError(generation)  # unreachable: every Generation has a root


def load_roots_file(data: bytes, name: str) -> TrustedRoot:
    """A trusted root from an ASK‖ARK file (AMD's `ask_ark_<gen>.cert` layout). If the ARK is one of
    AMD's pinned ones, the root carries that generation."""
    ask, ark = parse_ask_ark(data)
    generation = next((r.generation for r in pinned_roots() if r.ark == ark), None)
    return TrustedRoot(name=name, ark=ark, ask=ask, generation=generation)


@dataclass(frozen=True)
class CertificateChain:
    pdh: SEVCertificate
    pek: SEVCertificate
    oca: SEVCertificate
    cek: SEVCertificate
    ask: AMDCertificate
    ark: AMDCertificate

    @classmethod
    def from_full_bytes(cls, data: bytes) -> CertificateChain:
        """Parses sevctl's full export: PDH‖PEK‖OCA‖CEK‖ASK‖ARK."""
        data = bytes(data)
        sev_part = 4 * CERT_SIZE
        if len(data) <= sev_part:
            raise MalformedInput(Reason.TRUNCATED, "a full chain is PDH, PEK, OCA, CEK, ASK and ARK")
        pdh, pek, oca, cek = (
            SEVCertificate.from_bytes(data[i * CERT_SIZE : (i + 1) * CERT_SIZE]) for i in range(4)
        )
        ask, ark = parse_ask_ark(data[sev_part:])
        return cls(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark)

    @classmethod
    def from_parts(
        cls, *, pdh: bytes, pek: bytes, oca: bytes, cek: bytes, ask: bytes, ark: bytes
    ) -> CertificateChain:
        parsed_ask = AMDCertificate.from_bytes(ask)
        return cls(
            pdh=SEVCertificate.from_bytes(pdh),
            pek=SEVCertificate.from_bytes(pek),
            oca=SEVCertificate.from_bytes(oca),
            cek=SEVCertificate.from_bytes(cek),
            ask=parsed_ask,
            ark=parse_ark(ark),
        )

    def to_full_bytes(self) -> bytes:
        return b"".join(c.to_bytes() for c in (self.pdh, self.pek, self.oca, self.cek, self.ask, self.ark))


@dataclass(frozen=True)
class LinkResult:
    """One checked link, e.g. 'ASK->CEK'. `reason`/`detail` say why it failed (None/"" when it held)."""

    link: str
    ok: bool
    reason: StrEnum | None = None  # a Reason; StrEnum since SevError carries any reason enum
    detail: str = ""


@dataclass(frozen=True)
class VerifiedChain:
    """A chain that verified up to a trusted root. `cek_fingerprint` (SHA-256 of the CEK public key field,
    hex) identifies the chip in audit logs and does not change when KDS re-signs the CEK."""

    root_name: str
    generation: Generation | None
    links: tuple[LinkResult, ...]
    chain: CertificateChain
    cek_fingerprint: str


LINK_NAMES = (
    "ARK self",
    "ARK->ASK",
    "ASK->CEK",
    "OCA self",
    "OCA->PEK",
    "CEK->PEK",
    "PEK->PDH",
    "ARK pinned",
)


def _usage_is(cert: SEVCertificate, usage: Usage, slot: str) -> None:
    if cert.usage is not usage:
        raise VerificationFailed(Reason.WRONG_USAGE, f"the {slot} slot holds a {cert.usage.name} certificate")


def _amd_usage_is(cert: AMDCertificate, usage: AMDKeyUsage) -> None:
    if cert.key_usage is not usage:
        raise VerificationFailed(
            Reason.WRONG_USAGE, f"the {usage.name} slot holds an {cert.key_usage.name} certificate"
        )


def _link_checks(
    chain: CertificateChain, roots: Sequence[TrustedRoot]
) -> Iterator[tuple[str, Callable[[], str]]]:
    """Yields (link name, check). A check raises SevError on failure and returns a detail on success."""
    trusted = next((r for r in roots if r.ark == chain.ark), None)
    # Same bytes as a trusted root: verify with that root's objects, whose keys are already built.
    ark = trusted.ark if trusted is not None else chain.ark
    ask = trusted.ask if trusted is not None and trusted.ask == chain.ask else chain.ask
    pdh, pek, oca, cek = chain.pdh, chain.pek, chain.oca, chain.cek

    def ark_self() -> str:
        _amd_usage_is(ark, AMDKeyUsage.ARK)
        ark.verify_self_signed()
        return ""

    def ark_ask() -> str:
        _amd_usage_is(ask, AMDKeyUsage.ASK)
        ask.verify_signed_by(ark)
        return ""

    def ask_cek() -> str:
        _usage_is(cek, Usage.CEK, "CEK")
        try:
            cek.verify_signed_by(ask)
        except VerificationFailed as exc:
            if exc.reason is Reason.MISSING_SIGNATURE:
                raise VerificationFailed(
                    Reason.MISSING_SIGNATURE,
                    "the CEK is not signed by the ASK (a firmware-exported CEK is unsigned: "
                    "use the ASK-signed CEK from AMD KDS)",
                ) from None
            raise
        return ""

    def oca_self() -> str:
        _usage_is(oca, Usage.OCA, "OCA")
        oca.verify_signed_by(oca)
        return ""

    def oca_pek() -> str:
        _usage_is(pek, Usage.PEK, "PEK")
        pek.verify_signed_by(oca)
        return ""

    def cek_pek() -> str:
        _usage_is(cek, Usage.CEK, "CEK")
        pek.verify_signed_by(cek)
        return ""

    def pek_pdh() -> str:
        _usage_is(pdh, Usage.PDH, "PDH")
        pdh.verify_signed_by(pek)
        return ""

    def ark_pinned() -> str:
        if trusted is None:
            raise VerificationFailed(
                Reason.UNTRUSTED_ROOT, "the ARK is none of the trusted roots (pinned AMD roots or --ca)"
            )
        return trusted.name

    yield from zip(
        LINK_NAMES, (ark_self, ark_ask, ask_cek, oca_self, oca_pek, cek_pek, pek_pdh, ark_pinned), strict=True
    )


def _all_roots(extra_roots: Iterable[TrustedRoot]) -> tuple[TrustedRoot, ...]:
    return pinned_roots() + tuple(extra_roots)


def check_links(
    chain: CertificateChain, roots: Sequence[TrustedRoot] | None = None
) -> tuple[LinkResult, ...]:
    """Every link's result, failures included (for display). `roots` defaults to the pinned roots."""
    results = []
    for name, check in _link_checks(chain, pinned_roots() if roots is None else roots):
        try:
            results.append(LinkResult(name, True, None, check()))
        except SevError as exc:
            results.append(LinkResult(name, False, exc.reason, exc.detail))
    return tuple(results)


def verify_chain(chain: CertificateChain, *, extra_roots: Iterable[TrustedRoot] = ()) -> VerifiedChain:
    """Verifies every link up to a trusted root; raises VerificationFailed naming the first failing link.

    Trusted roots are AMD's pinned roots plus `extra_roots`.
    """
    roots = _all_roots(extra_roots)
    results = []
    for name, check in _link_checks(chain, roots):
        try:
            results.append(LinkResult(name, True, None, check()))
        except SevError as exc:
            raise VerificationFailed(exc.reason, exc.detail, link=name) from None
    root = next(r for r in roots if r.ark == chain.ark)
    return VerifiedChain(
        root_name=root.name,
        generation=root.generation,
        links=tuple(results),
        chain=chain,
        cek_fingerprint=chain.cek.fingerprint(),
    )


def detect_generation(chain: CertificateChain) -> Generation:
    """The generation whose pinned ARK the chain carries."""
    for root in pinned_roots():
        if root.ark == chain.ark and root.generation is not None:
            return root.generation
    raise VerificationFailed(Reason.UNKNOWN_GENERATION, "the ARK is not a pinned AMD root", link="ARK pinned")


def root_for_cek(cek: SEVCertificate, roots: Sequence[TrustedRoot] | None = None) -> TrustedRoot:
    """The trusted root whose ASK signed `cek`: how a chain given without ARK/ASK finds its generation."""
    if not any(slot.usage == Usage.ASK for slot in cek.signatures):
        raise VerificationFailed(
            Reason.MISSING_SIGNATURE,
            "the CEK is not signed by an ASK (a firmware-exported CEK is unsigned: "
            "use the ASK-signed CEK from AMD KDS)",
            link="ASK->CEK",
        )
    for root in pinned_roots() if roots is None else roots:
        try:
            cek.verify_signed_by(root.ask)
        except VerificationFailed:
            continue
        return root
    raise VerificationFailed(Reason.UNKNOWN_GENERATION, "no trusted ASK signed the CEK", link="ASK->CEK")
