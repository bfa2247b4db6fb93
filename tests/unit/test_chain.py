"""Chain verification: real chains per generation, pinned roots, unsigned CEKs, fresh chains."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.sev.amd_cert import AMDCertificate, AMDKeyUsage
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage
from sevlaunch.sev.chain import (
    LINK_NAMES,
    CertificateChain,
    Generation,
    TrustedRoot,
    check_links,
    detect_generation,
    load_roots_file,
    pinned_root,
    pinned_roots,
    root_for_cek,
    verify_chain,
)
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
CHAINS = {
    "virtee-naples": Generation.NAPLES,
    "virtee-rome": Generation.ROME,
    "virtee-milan": Generation.MILAN,
}
NAOS = sorted(p.name for p in (VECTORS / "chains").glob("naos-sev-tool-*"))


def vec(path: str) -> bytes:
    return (VECTORS / path).read_bytes()


def full(chain: str, *, cek: str = "cek.cert", gen: str | None = None) -> bytes:
    d = f"chains/{chain}/"
    roots = f"amd/{gen}/" if gen else d
    return b"".join(
        [
            vec(d + "pdh.cert"),
            vec(d + "pek.cert"),
            vec(d + "oca.cert"),
            vec(d + cek),
            vec(roots + "ask.cert"),
            vec(roots + "ark.cert"),
        ]
    )


@pytest.mark.parametrize(("name", "generation"), CHAINS.items())
def test_real_chains_verify(name: str, generation: Generation) -> None:
    raw = full(name)
    chain = CertificateChain.from_full_bytes(raw)
    assert chain.to_full_bytes() == raw
    verified = verify_chain(chain)
    assert verified.generation is generation and verified.root_name == generation.value
    assert [link.link for link in verified.links] == list(LINK_NAMES)
    assert all(link.ok for link in verified.links)
    assert verified.cek_fingerprint == hashlib.sha256(vec(f"chains/{name}/cek.cert")[0x10:0x414]).hexdigest()
    assert detect_generation(chain) is generation
    assert root_for_cek(chain.cek).generation is generation


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("other", [g.value for g in Generation])
def test_chains_fail_against_other_generations(name: str, other: str) -> None:
    if CHAINS[name].value == other:
        return
    chain = CertificateChain.from_full_bytes(full(name, gen=other))
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(chain)
    assert exc.value.link == "ASK->CEK" and exc.value.reason is Reason.BAD_SIGNATURE
    failed = [r.link for r in check_links(chain) if not r.ok]
    assert failed == ["ASK->CEK"]


@pytest.mark.parametrize(
    ("name", "cek", "gen"),
    [("virtee-naples", "cek.unsigned.cert", "naples"), ("virtee-naples-2019-02", "cek.cert", "naples")]
    + [(n, "cek.cert", g.value) for n in NAOS for g in (Generation.ROME, Generation.MILAN)],
)
def test_unsigned_cek_chains_fail_only_at_ask_cek(name: str, cek: str, gen: str) -> None:
    chain = CertificateChain.from_full_bytes(full(name, cek=cek, gen=gen))
    results = {r.link: r for r in check_links(chain)}
    assert [k for k, r in results.items() if not r.ok] == ["ASK->CEK"]
    assert results["ASK->CEK"].reason is Reason.MISSING_SIGNATURE
    assert "KDS" in results["ASK->CEK"].detail
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(chain)
    assert exc.value.link == "ASK->CEK" and exc.value.reason is Reason.MISSING_SIGNATURE
    with pytest.raises(VerificationFailed) as exc2:
        root_for_cek(chain.cek)
    assert exc2.value.reason is Reason.MISSING_SIGNATURE


def test_all_pinned_roots_load_and_self_verify() -> None:
    roots = pinned_roots()
    assert [r.generation for r in roots] == list(Generation)
    for root in roots:
        root.ark.verify_self_signed()
        root.ask.verify_signed_by(root.ark)
        assert root.ark.to_bytes() == vec(f"amd/{root.name}/ark.cert")
    assert len({r.ark.key_id for r in roots}) == 5
    assert pinned_root(Generation.NAPLES).ark.modulus_bits == 2048


def test_load_roots_file_naples_published_and_fixed() -> None:
    published = vec("amd/naples/ask.cert") + vec("amd/naples/ark.cert.truncated_public")
    for data in (published, vec("amd/naples/ask_ark.cert")):
        root = load_roots_file(data, "amd")
        assert root.generation is Generation.NAPLES
        assert root.ark == pinned_root(Generation.NAPLES).ark
    with pytest.raises(VerificationFailed) as exc:
        load_roots_file(vec("amd/naples/ask_ark.cert.zero_sig_2019-02"), "zero")
    assert exc.value.reason is Reason.MISSING_SIGNATURE
    # A full chain in AMD's published form (truncated Naples ARK) verifies against the pinned root.
    raw = full("virtee-naples")[:-832] + vec("amd/naples/ark.cert.truncated_public")
    assert verify_chain(CertificateChain.from_full_bytes(raw)).generation is Generation.NAPLES


def test_zero_signature_ark_chain_fails() -> None:
    raw = full("virtee-naples")[:-832] + vec("amd/naples/ark.cert.zero_sig_2019-02")
    chain = CertificateChain.from_full_bytes(raw)
    results = {r.link: r for r in check_links(chain)}
    assert not results["ARK self"].ok and results["ARK self"].reason is Reason.MISSING_SIGNATURE
    assert not results["ARK pinned"].ok
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(chain)
    assert exc.value.link == "ARK self"


def test_certificate_in_wrong_slot_fails() -> None:
    c = CertificateChain.from_full_bytes(full("virtee-rome"))
    swapped = CertificateChain(pdh=c.pdh, pek=c.oca, oca=c.pek, cek=c.cek, ask=c.ask, ark=c.ark)
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(swapped)
    assert exc.value.reason is Reason.WRONG_USAGE and exc.value.link == "OCA self"
    ark_as_ask = CertificateChain(pdh=c.pdh, pek=c.pek, oca=c.oca, cek=c.cek, ask=c.ark, ark=c.ark)
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(ark_as_ask)
    assert exc.value.link == "ARK->ASK" and exc.value.reason is Reason.WRONG_USAGE


def test_malformed_slot_cek_fails_ask_link() -> None:
    d = "chains/virtee-rome/"
    raw = b"".join(vec(d + n) for n in ("pdh.cert", "pek.cert", "oca.cert"))
    raw += (
        vec("misc/rome-cek-kds-2019-02/cek_malformed_sig2_usage.cert")
        + vec(d + "ask.cert")
        + vec(d + "ark.cert")
    )
    results = {r.link: r for r in check_links(CertificateChain.from_full_bytes(raw))}
    assert results["ASK->CEK"].reason is Reason.MALFORMED_SIGNATURE_SLOT


class FreshPlatform:
    """A whole chain made with the creation/signing API (what the emulator does)."""

    def __init__(self) -> None:
        ark_key = rsa.generate_private_key(65537, 2048)
        ask_key = rsa.generate_private_key(65537, 2048)
        self.ark = AMDCertificate.create(
            key_id=b"A" * 16,
            certifying_id=b"A" * 16,
            key_usage=AMDKeyUsage.ARK,
            public_key=ark_key.public_key(),
            signer_private_key=ark_key,
        )
        self.ask = AMDCertificate.create(
            key_id=b"S" * 16,
            certifying_id=b"A" * 16,
            key_usage=AMDKeyUsage.ASK,
            public_key=ask_key.public_key(),
            signer_private_key=ark_key,
        )
        keys = {
            u: ec.generate_private_key(ec.SECP384R1()) for u in (Usage.CEK, Usage.OCA, Usage.PEK, Usage.PDH)
        }

        def unsigned(usage: Usage, algo: Algorithm = Algorithm.ECDSA_SHA256) -> SEVCertificate:
            return SEVCertificate.for_ec_key(
                usage=usage, algorithm=algo, public_key=keys[usage].public_key(), api_major=1, api_minor=55
            )

        sig = Algorithm.ECDSA_SHA256
        cek = unsigned(Usage.CEK).sign_with(Usage.ASK, Algorithm.RSA_SHA256, ask_key)
        oca = unsigned(Usage.OCA).sign_with(Usage.OCA, sig, keys[Usage.OCA])
        pek = (
            unsigned(Usage.PEK)
            .sign_with(Usage.OCA, sig, keys[Usage.OCA])
            .sign_with(Usage.CEK, sig, keys[Usage.CEK])
        )
        pdh = unsigned(Usage.PDH, Algorithm.ECDH_SHA256).sign_with(Usage.PEK, sig, keys[Usage.PEK])
        self.chain = CertificateChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=self.ask, ark=self.ark)
        self.root = TrustedRoot(name="emulated", ark=self.ark, ask=self.ask)


@pytest.fixture(scope="module")
def fresh() -> FreshPlatform:
    return FreshPlatform()


def test_fresh_chain_needs_an_explicit_root(fresh: FreshPlatform) -> None:
    chain = CertificateChain.from_full_bytes(fresh.chain.to_full_bytes())
    assert chain == fresh.chain
    with pytest.raises(VerificationFailed) as exc:
        verify_chain(chain)
    assert exc.value.reason is Reason.UNTRUSTED_ROOT and exc.value.link == "ARK pinned"
    assert [r.link for r in check_links(chain) if not r.ok] == ["ARK pinned"]
    verified = verify_chain(chain, extra_roots=[fresh.root])
    assert verified.root_name == "emulated" and verified.generation is None
    root = load_roots_file(fresh.ask.to_bytes() + fresh.ark.to_bytes(), "file")
    assert verify_chain(chain, extra_roots=[root]).root_name == "file"
    # Its ASK does not vouch for a real CEK and AMD's do not vouch for its CEK.
    with pytest.raises(VerificationFailed):
        root_for_cek(chain.cek)
    assert root_for_cek(chain.cek, [fresh.root]) is fresh.root
    with pytest.raises(VerificationFailed) as exc:
        detect_generation(chain)
    assert exc.value.reason is Reason.UNKNOWN_GENERATION


def test_real_chain_under_a_foreign_ark_is_untrusted(fresh: FreshPlatform) -> None:
    c = CertificateChain.from_full_bytes(full("virtee-rome"))
    foreign = CertificateChain(pdh=c.pdh, pek=c.pek, oca=c.oca, cek=c.cek, ask=c.ask, ark=fresh.ark)
    results = {r.link: r for r in check_links(foreign, [*pinned_roots(), fresh.root])}
    assert [k for k, r in results.items() if not r.ok] == ["ARK->ASK"]
    assert results["ARK->ASK"].reason is Reason.WRONG_SIGNER
    results = {r.link: r for r in check_links(foreign)}
    assert [k for k, r in results.items() if not r.ok] == ["ARK->ASK", "ARK pinned"]


@pytest.mark.parametrize("link", ["OCA->PEK", "CEK->PEK", "PEK->PDH"])
def test_swapped_platform_cert_fails(fresh: FreshPlatform, link: str) -> None:
    real = CertificateChain.from_full_bytes(full("virtee-milan"))
    c = fresh.chain
    parts = {"pdh": c.pdh, "pek": c.pek, "oca": c.oca, "cek": c.cek}
    # Put one real Milan certificate into the fresh chain: the link that reads it must fail.
    field = {"OCA->PEK": "oca", "CEK->PEK": "cek", "PEK->PDH": "pdh"}[link]
    parts[field] = getattr(real, field)
    results = {r.link: r for r in check_links(CertificateChain(**parts, ask=c.ask, ark=c.ark), [fresh.root])}
    assert not results[link].ok


BASE = full("virtee-rome")


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, len(BASE) - 1), extra=st.binary(min_size=1, max_size=16))
def test_fuzz_full_chain_bytes(cut: int, extra: bytes) -> None:
    with pytest.raises(MalformedInput):
        CertificateChain.from_full_bytes(BASE[:cut])
    with pytest.raises(MalformedInput):
        CertificateChain.from_full_bytes(BASE + extra)


@settings(max_examples=60, deadline=None)
@given(bit=st.integers(0, len(BASE) * 8 - 1))
def test_fuzz_bit_flip_never_verifies(bit: int) -> None:
    raw = bytearray(BASE)
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        chain = CertificateChain.from_full_bytes(bytes(raw))
    except MalformedInput:
        return
    # Flips in the unused slot 2 of the OCA, PDH or CEK, or in unused signature padding, are outside
    # every signed region and every used slot; anywhere else verification must fail.
    try:
        verify_chain(chain)
    except VerificationFailed:
        return
    offset = bit // 8
    cert_offset = offset % 0x824 if offset < 4 * 0x824 else None
    assert cert_offset is not None and cert_offset >= 0x414
