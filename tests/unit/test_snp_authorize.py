"""The owner's SNP launch authorisation: the ID block and auth, HOST_DATA, every refusal; then the report
of the authorised launch attested against it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sevlaunch.refvalues import (
    DigestConfig,
    KernelHashes,
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
from sevlaunch.snp.attest import AttestationRefused, AttestationRules, AttestReason, Evidence, attest
from sevlaunch.snp.authorize import (
    AuthorizationRefused,
    AuthorizeReason,
    LaunchConfig,
    SnpPlatform,
    SnpWorkloadRules,
    authorize_launch,
)
from sevlaunch.snp.certs import verify_vek_chain
from sevlaunch.snp.challenge import new_challenge, report_data
from sevlaunch.snp.idblock import IdAuth, IdBlock, key_digest
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.policy import PolicyFlag
from sevlaunch.snp.reference import SnpReference
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.secret_wrap import GuestKeyPair, seal
from sevlaunch.snp.tcb import Product, TcbVersion

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
START = NOW - dt.timedelta(days=30)
CHIP = bytes(range(64))
TCB = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
FAMILY, IMAGE = b"\x0f" * 16, b"\x1e" * 16
POLICY = 0x30000
KH = KernelHashes("aa" * 32, "bb" * 32, "cc" * 32)
PUB = generate_private_key(KeyType.ED25519)


def _ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "guest CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _manifest(*digests: ReferenceDigest, min_tcb: tuple[TcbVersion, ...] = ()) -> VerifiedManifest:
    m = make_manifest(
        publisher="distro",
        firmware_name="OVMF",
        firmware_version="1",
        digests=list(digests),
        valid_days=90,
        now=START,
        snp=SnpReference(FAMILY, IMAGE, 3, min_tcb),
    )
    return verify_manifest(
        sign_envelope(m.to_json(), PUB).to_json(), [PublisherKey(PUB.public_key())], now=NOW
    )


def _cfg(vcpus: int, **kw: Any) -> DigestConfig:
    return DigestConfig(
        Technology.SEV_SNP, vcpus=vcpus, vcpu_type="EPYC-v4", guest_features=1, vmm_type="QEMU", **kw
    )


@dataclasses.dataclass
class Setup:
    root: EmulatedSnpRoot
    vcek_key: ec.EllipticCurvePrivateKey
    id_key: ec.EllipticCurvePrivateKey
    author_key: ec.EllipticCurvePrivateKey
    manifests: list[VerifiedManifest]
    init: InitData

    def platform(self, tcb: TcbVersion = TCB, **kw: Any) -> SnpPlatform:
        vcek = self.root.issue_vcek(self.vcek_key.public_key(), CHIP, tcb, not_before=START)
        vek = verify_vek_chain(vcek, Product.GENOA, at=NOW, extra_roots=[self.root.trusted_root()])
        fields: dict[str, Any] = dict(
            product=Product.GENOA, current_tcb=tcb, reported_tcb=tcb, vek=vek, committed_tcb=tcb
        )
        fields.update(kw)
        return SnpPlatform(**fields)

    def authorize(
        self, rules: SnpWorkloadRules | None = None, platform: SnpPlatform | None = None, **kw: Any
    ) -> Any:
        config = kw.pop("config", LaunchConfig(vcpus=2, vcpu_type="EPYC-v4", guest_features=1))
        return authorize_launch(
            rules or SnpWorkloadRules(policy=POLICY, min_tcb={Product.GENOA: TCB}),
            platform or self.platform(),
            config,
            kw.pop("manifests", self.manifests),
            id_key=kw.pop("id_key", self.id_key),
            author_key=kw.pop("author_key", self.author_key),
            init_data=self.init,
            now=NOW,
        )


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup(
        root=EmulatedSnpRoot.generate(Product.GENOA, key_size=2048, not_before=START),
        vcek_key=ec.generate_private_key(ec.SECP384R1()),
        id_key=ec.generate_private_key(ec.SECP384R1()),
        author_key=ec.generate_private_key(ec.SECP384R1()),
        manifests=[
            _manifest(
                ReferenceDigest(b"\x02" * 48, _cfg(2)),
                ReferenceDigest(b"\x04" * 48, _cfg(4)),
                ReferenceDigest(b"\x12" * 48, _cfg(2, kernel_hashes=KH)),
                min_tcb=(dataclasses.replace(TCB, microcode=70),),
            )
        ],
        init=InitData.new(
            endpoint="https://owner.example:50070", ca_pem=_ca_pem(), authorization_id="auth-7"
        ),
    )


def test_authorisation(setup: Setup) -> None:
    auth = setup.authorize()
    assert auth.id_block == IdBlock(
        launch_digest=b"\x02" * 48, family_id=FAMILY, image_id=IMAGE, guest_svn=3, policy=POLICY
    )
    # What the firmware checks at SNP_LAUNCH_FINISH, on the bytes libvirt would pass.
    IdAuth.from_b64(auth.id_auth.to_b64()).verify(IdBlock.from_b64(auth.id_block.to_b64()))
    auth.id_block.check_launch(launch_digest=b"\x02" * 48, policy=POLICY)
    assert auth.host_data == setup.init.host_data and len(auth.host_data) == 32
    assert InitData.parse(auth.init_data) == setup.init
    assert auth.id_key_digest == key_digest(setup.id_key)
    assert auth.author_key_digest == key_digest(setup.author_key) and auth.author_key_enabled
    assert auth.authorization_id == "auth-7"
    kernel = setup.authorize(
        config=LaunchConfig(vcpus=2, vcpu_type="EPYC-v4", guest_features=1, kernel_hashes=KH)
    )
    assert kernel.id_block.launch_digest == b"\x12" * 48


def test_without_author_key(setup: Setup) -> None:
    auth = setup.authorize(author_key=None)
    assert not auth.author_key_enabled and auth.author_key_digest is None
    auth.id_auth.verify(auth.id_block, author_key_enabled=False)


def _refused(setup: Setup, reason: AuthorizeReason, **kw: Any) -> AuthorizationRefused:
    with pytest.raises(AuthorizationRefused) as err:
        setup.authorize(**kw)
    assert err.value.reason is reason, err.value
    return err.value


def test_policy_refusals(setup: Setup) -> None:
    _refused(setup, AuthorizeReason.BAD_POLICY, rules=SnpWorkloadRules(policy=0x10000))
    err = _refused(
        setup, AuthorizeReason.POLICY_NOT_ALLOWED, rules=SnpWorkloadRules(policy=POLICY | PolicyFlag.DEBUG)
    )
    assert "debug" in err.detail
    allowed = SnpWorkloadRules(
        policy=POLICY | PolicyFlag.DEBUG, allowed_policy_flags=PolicyFlag.DEBUG | PolicyFlag.SMT
    )
    assert setup.authorize(rules=allowed).policy == POLICY | PolicyFlag.DEBUG


def test_platform_tcb_below_the_workload_minimum(setup: Setup) -> None:
    low = dataclasses.replace(TCB, snp=22)
    err = _refused(setup, AuthorizeReason.PLATFORM_TCB_TOO_LOW, platform=setup.platform(low))
    assert "snp 22<23" in err.detail and "workload minimum" in err.detail


def test_platform_tcb_below_the_reference_minimum(setup: Setup) -> None:
    low = dataclasses.replace(TCB, microcode=69)
    err = _refused(
        setup,
        AuthorizeReason.PLATFORM_TCB_TOO_LOW,
        platform=setup.platform(low),
        rules=SnpWorkloadRules(policy=POLICY),
    )
    assert "microcode 69<70" in err.detail and "manifest" in err.detail
    err = _refused(
        setup,
        AuthorizeReason.PLATFORM_TCB_TOO_LOW,
        rules=SnpWorkloadRules(policy=POLICY),
        manifests=[
            _manifest(
                ReferenceDigest(b"\x02" * 48, _cfg(2)), min_tcb=(TcbVersion(Product.MILAN, 1, 1, 1, 1),)
            )
        ],
    )
    assert "no minimum TCB for genoa" in err.detail


def test_provisional_firmware(setup: Setup) -> None:
    newer = dataclasses.replace(TCB, microcode=80)
    platform = setup.platform(TCB, current_tcb=newer)
    _refused(setup, AuthorizeReason.PROVISIONAL_FIRMWARE, platform=platform)
    rules = SnpWorkloadRules(policy=POLICY, min_tcb={Product.GENOA: TCB}, allow_provisional_firmware=True)
    setup.authorize(rules=rules, platform=platform)
    # Committed TCB unknown (Linux's status): not refused here, the report's COMMITTED_TCB decides.
    setup.authorize(platform=setup.platform(TCB, current_tcb=newer, committed_tcb=None))


def test_platform_consistency(setup: Setup) -> None:
    _refused(
        setup,
        AuthorizeReason.VEK_TCB_MISMATCH,
        platform=setup.platform(TCB, reported_tcb=dataclasses.replace(TCB, tee=1)),
    )
    _refused(setup, AuthorizeReason.WRONG_PRODUCT, platform=setup.platform(TCB, product=Product.MILAN))
    _refused(
        setup,
        AuthorizeReason.WRONG_PRODUCT,
        rules=SnpWorkloadRules(policy=POLICY, products=frozenset({Product.TURIN})),
    )


def test_vlek_platform(setup: Setup) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    vlek = setup.root.issue_vlek(key.public_key(), TCB, "csp", not_before=START)
    vek = verify_vek_chain(vlek, Product.GENOA, at=NOW, extra_roots=[setup.root.trusted_root()])
    platform = setup.platform(TCB, vek=vek)
    _refused(setup, AuthorizeReason.VLEK_NOT_ALLOWED, platform=platform)
    setup.authorize(rules=SnpWorkloadRules(policy=POLICY, allow_vlek=True), platform=platform)


@pytest.mark.parametrize(
    "config",
    [
        LaunchConfig(vcpus=3, vcpu_type="EPYC-v4", guest_features=1),
        LaunchConfig(vcpus=2, vcpu_type="EPYC-Milan", guest_features=1),
        LaunchConfig(vcpus=2, vcpu_type="EPYC-v4", guest_features=0x21),
        LaunchConfig(vcpus=2, vcpu_type="EPYC-v4", guest_features=1, vmm_type="ec2"),
        LaunchConfig(vcpus=4, vcpu_type="EPYC-v4", guest_features=1, kernel_hashes=KH),
    ],
)
def test_no_reference_digest_for_this_configuration(setup: Setup, config: LaunchConfig) -> None:
    _refused(setup, AuthorizeReason.NO_REFERENCE_DIGEST, config=config)


def test_vcpus_not_allowed(setup: Setup) -> None:
    rules = SnpWorkloadRules(policy=POLICY, vcpus=frozenset({4}))
    _refused(setup, AuthorizeReason.VCPUS_NOT_ALLOWED, rules=rules)


def test_bad_id_key(setup: Setup) -> None:
    _refused(setup, AuthorizeReason.BAD_KEY, id_key=ec.generate_private_key(ec.SECP256R1()))


def test_authorised_launch_attests_and_releases(setup: Setup) -> None:
    """The whole owner-side flow on pure functions: authorise, the firmware's report of that launch, attest
    against the authorisation's expectations, seal the secret, the guest opens it."""
    auth = setup.authorize()
    challenge, guest = new_challenge(), GuestKeyPair.generate()
    report = AttestationReport(
        version=3, cpuid_fam_id=0x19, cpuid_mod_id=0x11, cpuid_step=1, policy=auth.policy,
        family_id=auth.id_block.family_id, image_id=auth.id_block.image_id, guest_svn=auth.id_block.guest_svn,
        measurement=auth.id_block.launch_digest, host_data=auth.host_data,
        id_key_digest=auth.id_key_digest, author_key_digest=key_digest(setup.author_key), author_key_en=True,
        report_data=report_data(challenge, guest.public_bytes), chip_id=CHIP,
        reported_tcb=TCB.raw, committed_tcb=TCB.raw, current_tcb=TCB.raw, launch_tcb=TCB.raw,
    ).signed(setup.vcek_key)  # fmt: skip
    vcek = setup.root.issue_vcek(setup.vcek_key.public_key(), CHIP, TCB, not_before=START)
    evidence = Evidence(report.to_bytes(), vcek.public_bytes(serialization.Encoding.DER))
    rules = AttestationRules(extra_roots=(setup.root.trusted_root(),))
    expected = auth.expected(challenge=challenge, guest_public_key=guest.public_bytes)
    verdict = attest(evidence, expected, rules, setup.manifests, now=NOW)
    assert verdict.reference.manifest_id == auth.reference.manifest_id
    wrapped = seal(
        b"the secret", guest.public_bytes, authorization_id=auth.authorization_id, challenge=challenge
    )
    assert guest.open(wrapped, authorization_id="auth-7", challenge=challenge) == b"the secret"
    # The same report against another authorisation's init data: HOST_DATA refuses it.
    other = dataclasses.replace(
        expected,
        host_data=InitData.new(
            endpoint="https://owner.example:50070", ca_pem=setup.init.ca_pem, authorization_id="auth-7"
        ).host_data,
    )
    with pytest.raises(AttestationRefused) as err:
        attest(evidence, other, rules, setup.manifests, now=NOW)
    assert err.value.reason is AttestReason.HOST_DATA_MISMATCH
