"""The owner's SNP attestation decision: the accept path and every refusal, with real signatures over an
emulated AMD root (ARK -> ASK -> VCEK, ARK -> ASVK -> VLEK)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevlaunch.refvalues import (
    DigestConfig,
    KeyType,
    PublisherKey,
    ReferenceDigest,
    VerifiedManifest,
    generate_private_key,
    make_manifest,
    sign_envelope,
    verify_manifest,
)
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.appraisal import MinimumTcb
from sevlaunch.snp.attest import (
    AttestationRefused,
    AttestationRules,
    AttestReason,
    Evidence,
    Expected,
    attest,
)
from sevlaunch.snp.certtable import ARK_GUID, ASK_GUID, VCEK_GUID, CertTable
from sevlaunch.snp.challenge import new_challenge, report_data
from sevlaunch.snp.idblock import key_digest
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.policy import PolicyFlag
from sevlaunch.snp.reference import SnpReference
from sevlaunch.snp.report import AttestationReport, SigningKey
from sevlaunch.snp.secret_wrap import GuestKeyPair
from sevlaunch.snp.tcb import Product, TcbVersion

NOW = datetime(2026, 6, 1, tzinfo=UTC)
START = NOW - timedelta(days=30)
CHIP = bytes(range(1, 65))
TCB = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
MEASUREMENT = b"\x5a" * 48
FAMILY = b"\x0f" * 16
IMAGE = b"\x1e" * 16
HOST_DATA = b"\x43" * 32
POLICY = 0x30000
DER = serialization.Encoding.DER
PUBLISHER_KEY = generate_private_key(KeyType.ED25519)


def _tcb(**changes: int) -> TcbVersion:
    return dataclasses.replace(TCB, **changes)


@dataclasses.dataclass
class World:
    root: EmulatedSnpRoot
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: bytes
    id_key: ec.EllipticCurvePrivateKey
    author_key: ec.EllipticCurvePrivateKey
    manifests: list[VerifiedManifest]
    challenge: bytes
    guest: GuestKeyPair

    def vcek_for(self, tcb: TcbVersion = TCB, chip: bytes = CHIP) -> bytes:
        return self.root.issue_vcek(self.vcek_key.public_key(), chip, tcb, not_before=START).public_bytes(DER)

    def report(self, **changes: Any) -> AttestationReport:
        fields: dict[str, Any] = {
            "version": 3,
            "cpuid_fam_id": 0x19,
            "cpuid_mod_id": 0x11,
            "cpuid_step": 1,
            "policy": POLICY,
            "chip_id": CHIP,
            "reported_tcb": TCB.raw,
            "committed_tcb": TCB.raw,
            "current_tcb": TCB.raw,
            "launch_tcb": TCB.raw,
            "current_major": 1,
            "current_minor": 55,
            "current_build": 40,
            "committed_major": 1,
            "committed_minor": 55,
            "committed_build": 40,
            "measurement": MEASUREMENT,
            "host_data": HOST_DATA,
            "report_data": report_data(self.challenge, self.guest.public_bytes),
            "family_id": FAMILY,
            "image_id": IMAGE,
            "guest_svn": 2,
            "id_key_digest": key_digest(self.id_key),
            "author_key_digest": key_digest(self.author_key),
            "author_key_en": True,
        }
        fields.update(changes)
        return AttestationReport(**fields)

    def evidence(self, report: AttestationReport | None = None, *, key: Any = None, **kw: Any) -> Evidence:
        signed = (report or self.report()).signed(key or self.vcek_key).to_bytes()
        return Evidence(signed, kw.pop("vek", self.vcek), kw.pop("chain", (self.root.chain_pem(),)))

    def expected(self, **changes: Any) -> Expected:
        fields: dict[str, Any] = dict(
            authorization_id="auth-1",
            policy=POLICY,
            id_key_digest=key_digest(self.id_key),
            author_key_digest=key_digest(self.author_key),
            host_data=HOST_DATA,
            challenge=self.challenge,
            guest_public_key=self.guest.public_bytes,
            product=Product.GENOA,
            vcpus=2,
        )
        fields.update(changes)
        return Expected(**fields)

    def rules(self, **changes: Any) -> AttestationRules:
        fields: dict[str, Any] = dict(
            extra_roots=(self.root.trusted_root(),), min_tcb={Product.GENOA: MinimumTcb(TCB, TCB, TCB)}
        )
        fields.update(changes)
        return AttestationRules(**fields)

    def attest(self, evidence: Evidence | None = None, expected: Expected | None = None, **rules: Any) -> Any:
        return attest(
            evidence or self.evidence(),
            expected or self.expected(),
            self.rules(**rules),
            self.manifests,
            now=NOW,
        )


def _manifest(snp: SnpReference, vcpus: int = 2, digest: bytes = MEASUREMENT) -> VerifiedManifest:
    cfg = DigestConfig(
        Technology.SEV_SNP, vcpus=vcpus, vcpu_type="EPYC-v4", guest_features=1, vmm_type="QEMU"
    )
    manifest = make_manifest(
        publisher="distro",
        firmware_name="OVMF",
        firmware_version="2025.02",
        digests=[ReferenceDigest(digest, cfg)],
        valid_days=90,
        now=START,
        snp=snp,
    )
    envelope = sign_envelope(manifest.to_json(), PUBLISHER_KEY).to_json()
    return verify_manifest(envelope, [PublisherKey(PUBLISHER_KEY.public_key())], now=NOW)


@pytest.fixture(scope="module")
def world() -> World:
    root = EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    snp = SnpReference(FAMILY, IMAGE, 2, (_tcb(microcode=70),))
    w = World(
        root=root,
        vcek_key=vcek_key,
        vcek=b"",
        id_key=ec.generate_private_key(ec.SECP384R1()),
        author_key=ec.generate_private_key(ec.SECP384R1()),
        manifests=[_manifest(snp)],
        challenge=new_challenge(),
        guest=GuestKeyPair.generate(),
    )
    w.vcek = w.vcek_for()
    return w


@pytest.fixture(scope="module")
def other_root() -> EmulatedSnpRoot:
    return EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START)


def _refused(world: World, reason: AttestReason, **kw: Any) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as err:
        world.attest(**kw)
    assert err.value.reason is reason, err.value
    return err.value


# ------------------------------------------------------------------------------------------- accept


def test_accepts(world: World) -> None:
    verdict = world.attest()
    assert verdict.product is Product.GENOA and verdict.vek_kind.value == "vcek"
    assert verdict.reference.manifest_id == world.manifests[0].id
    assert verdict.tcbs.committed == TCB
    audit = verdict.audit()
    assert audit["measurement"] == MEASUREMENT.hex() and audit["vcpus"] == 2
    assert audit["committed_tcb"] == "bootloader=9 tee=0 snp=23 microcode=72"


def test_accepts_from_a_certificate_table(world: World) -> None:
    table = CertTable.of(
        [
            (VCEK_GUID, world.vcek),
            (ASK_GUID, world.root.ask.public_bytes(DER)),
            (ARK_GUID, world.root.ark.public_bytes(DER)),
        ]
    ).to_bytes(pad_to_page=True)
    report = world.report().signed(world.vcek_key).to_bytes()
    world.attest(Evidence.from_cert_table(report, table))


def test_accepts_without_vcpus_or_product_known(world: World) -> None:
    world.attest(expected=world.expected(vcpus=None, product=None))


def test_accepts_a_higher_tcb_that_kept_the_digest(world: World) -> None:
    """A microcode update: new TCB, new VCEK, same measurement; allowed since above every minimum."""
    newer = _tcb(microcode=80)
    report = world.report(reported_tcb=newer.raw, committed_tcb=newer.raw, current_tcb=newer.raw)
    world.attest(world.evidence(report, vek=world.vcek_for(newer)))


# ---------------------------------------------------------------------------------------- refusals


def test_forged_chain_untrusted_root(world: World, other_root: EmulatedSnpRoot) -> None:
    vcek = other_root.issue_vcek(world.vcek_key.public_key(), CHIP, TCB, not_before=START).public_bytes(DER)
    evidence = world.evidence(vek=vcek, chain=(other_root.chain_pem(),))
    err = _refused(world, AttestReason.FORGED_CHAIN, evidence=evidence)
    assert err.cause_reason == "untrusted_ark"
    # The emulated root itself is trusted only when the rules list it.
    _refused(world, AttestReason.FORGED_CHAIN, extra_roots=())


def test_forged_chain_vcek_under_another_ask(world: World, other_root: EmulatedSnpRoot) -> None:
    vcek = other_root.issue_vcek(world.vcek_key.public_key(), CHIP, TCB, not_before=START).public_bytes(DER)
    _refused(world, AttestReason.FORGED_CHAIN, evidence=world.evidence(vek=vcek))


def test_forged_report_signature(world: World) -> None:
    forger = ec.generate_private_key(ec.SECP384R1())
    err = _refused(world, AttestReason.FORGED_CHAIN, evidence=world.evidence(key=forger))
    assert err.cause_reason == "bad_report_signature"


def test_expired_vcek(world: World) -> None:
    old = world.root.issue_vcek(
        world.vcek_key.public_key(), CHIP, TCB, not_before=START, lifetime=timedelta(days=1)
    ).public_bytes(DER)
    _refused(world, AttestReason.FORGED_CHAIN, evidence=world.evidence(vek=old))


def test_wrong_product(world: World) -> None:
    _refused(world, AttestReason.WRONG_PRODUCT, expected=world.expected(product=Product.MILAN))
    _refused(world, AttestReason.WRONG_PRODUCT, products=frozenset({Product.TURIN}))


def test_vlek_not_allowed_then_allowed(world: World) -> None:
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    vlek = world.root.issue_vlek(vlek_key.public_key(), TCB, "csp", not_before=START).public_bytes(DER)
    report = world.report(signing_key=SigningKey.VLEK)
    evidence = world.evidence(report, key=vlek_key, vek=vlek, chain=(world.root.chain_pem(vlek=True),))
    _refused(world, AttestReason.VLEK_NOT_ALLOWED, evidence=evidence)
    assert world.attest(evidence, allow_vlek=True).vek_kind.value == "vlek"


def test_vcek_tcb_mismatch(world: World) -> None:
    evidence = world.evidence(vek=world.vcek_for(_tcb(microcode=73)))
    _refused(world, AttestReason.VCEK_TCB_MISMATCH, evidence=evidence)


def test_hwid_mismatch(world: World) -> None:
    evidence = world.evidence(world.report(chip_id=bytes(reversed(CHIP))))
    _refused(world, AttestReason.HWID_MISMATCH, evidence=evidence)


def test_vmpl(world: World) -> None:
    _refused(world, AttestReason.VMPL_NOT_ALLOWED, evidence=world.evidence(world.report(vmpl=1)))


def test_debug_policy(world: World) -> None:
    debug = POLICY | PolicyFlag.DEBUG
    err = _refused(
        world,
        AttestReason.POLICY_NOT_ALLOWED,
        evidence=world.evidence(world.report(policy=debug)),
        expected=world.expected(policy=debug),
    )
    assert "debug" in err.detail


def test_policy_other_than_authorised(world: World) -> None:
    other = POLICY | PolicyFlag.SINGLE_SOCKET
    _refused(world, AttestReason.POLICY_MISMATCH, evidence=world.evidence(world.report(policy=other)))


def test_tcb_order_and_provisional_firmware(world: World) -> None:
    low = _tcb(microcode=71)
    report = world.report(reported_tcb=TCB.raw, committed_tcb=low.raw, current_tcb=TCB.raw)
    _refused(world, AttestReason.TCB_ORDER, evidence=world.evidence(report))
    higher = _tcb(microcode=80)
    report = world.report(current_tcb=higher.raw)
    err = _refused(world, AttestReason.PROVISIONAL_FIRMWARE, evidence=world.evidence(report))
    assert "not committed" in err.detail
    world.attest(world.evidence(report), allow_provisional_firmware=True)


@pytest.mark.parametrize("kind", ["reported", "committed", "launch"])
def test_each_workload_tcb_floor(world: World, kind: str) -> None:
    floors = {"reported": None, "committed": None, "launch": None, kind: _tcb(snp=24)}
    err = _refused(
        world,
        AttestReason(f"{kind}_tcb_too_low"),
        min_tcb={Product.GENOA: MinimumTcb(**floors)},
    )
    assert err.detail.startswith(f"{kind}_tcb: snp 23<24")


def test_reported_tcb_below_floor_with_its_own_vcek(world: World) -> None:
    """The host can set the reported TCB lower than the committed one; the floor still holds."""
    low = _tcb(bootloader=8)
    report = world.report(reported_tcb=low.raw)
    err = _refused(
        world, AttestReason.REPORTED_TCB_TOO_LOW, evidence=world.evidence(report, vek=world.vcek_for(low))
    )
    assert "bootloader 8<9" in err.detail


def test_manifest_tcb_floor(world: World) -> None:
    """The reference values' own minimum (microcode 70) refuses a launch TCB below it."""
    report = world.report(launch_tcb=_tcb(microcode=69).raw)
    err = _refused(world, AttestReason.LAUNCH_TCB_TOO_LOW, evidence=world.evidence(report), min_tcb={})
    assert "launch_tcb: microcode 69<70" in err.detail


def test_measurement(world: World) -> None:
    _refused(
        world,
        AttestReason.MEASUREMENT_MISMATCH,
        evidence=world.evidence(world.report(measurement=b"\x00" * 48)),
    )


def test_vcpu_count(world: World) -> None:
    _refused(world, AttestReason.VCPUS_MISMATCH, expected=world.expected(vcpus=4))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"family_id": bytes(16)}, AttestReason.FAMILY_ID_MISMATCH),
        ({"image_id": bytes(16)}, AttestReason.IMAGE_ID_MISMATCH),
        ({"guest_svn": 1}, AttestReason.GUEST_SVN_TOO_LOW),
    ],
)
def test_reference_fields(world: World, changes: dict[str, Any], reason: AttestReason) -> None:
    _refused(world, reason, evidence=world.evidence(world.report(**changes)))


def test_id_and_author_keys(world: World) -> None:
    stranger = ec.generate_private_key(ec.SECP384R1())
    _refused(world, AttestReason.ID_KEY_MISMATCH, expected=world.expected(id_key_digest=key_digest(stranger)))
    _refused(
        world,
        AttestReason.AUTHOR_KEY_MISMATCH,
        expected=world.expected(author_key_digest=key_digest(stranger)),
    )
    report = world.report(author_key_en=False)
    _refused(world, AttestReason.AUTHOR_KEY_MISMATCH, evidence=world.evidence(report))


def test_host_data(world: World) -> None:
    _refused(world, AttestReason.HOST_DATA_MISMATCH, expected=world.expected(host_data=b"\x00" * 32))


def test_report_data(world: World) -> None:
    _refused(world, AttestReason.REPORT_DATA_MISMATCH, expected=world.expected(challenge=new_challenge()))
    other = GuestKeyPair.generate()
    _refused(
        world, AttestReason.REPORT_DATA_MISMATCH, expected=world.expected(guest_public_key=other.public_bytes)
    )
    _refused(world, AttestReason.BAD_GUEST_KEY, expected=world.expected(guest_public_key=b"\x04" * 97))


def test_malformed_inputs(world: World) -> None:
    good = world.evidence()
    _refused(world, AttestReason.MALFORMED_REPORT, evidence=Evidence(good.report[:-1], good.vek, good.chain))
    _refused(
        world,
        AttestReason.MALFORMED_CERTIFICATES,
        evidence=Evidence(good.report, b"\x30\x03junk", good.chain),
    )
    with pytest.raises(AttestationRefused) as err:
        Evidence(good.report, bytes(17 * 1024))
    assert err.value.reason is AttestReason.MALFORMED_CERTIFICATES
    with pytest.raises(AttestationRefused) as err:
        Evidence.from_cert_table(good.report, b"\x01" * 30)
    assert err.value.reason is AttestReason.MALFORMED_CERTIFICATES


def test_no_reference_values(world: World) -> None:
    with pytest.raises(AttestationRefused) as err:
        attest(world.evidence(), world.expected(), world.rules(), [], now=NOW)
    assert err.value.reason is AttestReason.NO_REFERENCE_VALUES


def test_reasons_are_distinct_strings() -> None:
    values = [r.value for r in AttestReason]
    assert len(values) == len(set(values)) and all(v == v.lower() for v in values)


def test_vek_cache(world: World, other_root: EmulatedSnpRoot) -> None:
    from sevlaunch.snp.attest import VekCache

    cache = VekCache(max_entries=2)
    evidence = world.evidence()
    first = attest(evidence, world.expected(), world.rules(), world.manifests, now=NOW, cache=cache)
    again = attest(evidence, world.expected(), world.rules(), world.manifests, now=NOW, cache=cache)
    assert len(cache) == 1 and first.root == again.root
    # A cached chain is not a pass for another chain, other trusted roots, or a later time.
    forged = other_root.issue_vcek(world.vcek_key.public_key(), CHIP, TCB, not_before=START).public_bytes(DER)
    with pytest.raises(AttestationRefused) as err:
        attest(
            world.evidence(vek=forged), world.expected(), world.rules(), world.manifests, now=NOW, cache=cache
        )
    assert err.value.reason is AttestReason.FORGED_CHAIN
    with pytest.raises(AttestationRefused) as err:
        attest(evidence, world.expected(), world.rules(extra_roots=()), world.manifests, now=NOW, cache=cache)
    assert err.value.reason is AttestReason.FORGED_CHAIN
    # A cached VEK still needs its report's signature: a forged report is refused on a hit.
    forger = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(AttestationRefused) as err:
        attest(
            world.evidence(key=forger), world.expected(), world.rules(), world.manifests, now=NOW, cache=cache
        )
    assert err.value.reason is AttestReason.FORGED_CHAIN
    later = NOW + timedelta(days=20 * 365)
    assert cache.get(VekCache.key(evidence, Product.GENOA, world.rules()), later) is None
    assert len(cache) == 0


@settings(max_examples=150, deadline=None)
@given(offset=st.integers(0, 0x4A0 - 1), mask=st.integers(1, 255))
def test_any_flipped_report_byte_is_a_typed_refusal(world: World, offset: int, mask: int) -> None:
    raw = bytearray(world.evidence().report)
    raw[offset] ^= mask
    with pytest.raises(AttestationRefused):
        attest(
            Evidence(bytes(raw), world.vcek, (world.root.chain_pem(),)),
            world.expected(),
            world.rules(),
            world.manifests,
            now=NOW,
        )


@settings(max_examples=100, deadline=None)
@given(table=st.binary(max_size=300))
def test_any_certificate_table_is_a_typed_answer(world: World, table: bytes) -> None:
    with pytest.raises(AttestationRefused):
        Evidence.from_cert_table(world.evidence().report, table)
