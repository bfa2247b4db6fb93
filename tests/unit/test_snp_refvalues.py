"""SEV-SNP reference values: manifest entries, strict parsing, `refvalues make --mode sev-snp`, lookup."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sevlaunch.cli import main as cli_main
from sevlaunch.refvalues import (
    DigestConfig,
    KernelHashes,
    KeyType,
    Manifest,
    PublisherKey,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    sign_envelope,
    verify_manifest,
)
from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.reference import SnpReference, parse_min_tcb
from sevlaunch.snp.refmatch import (
    ReferenceMismatch,
    RefReason,
    ReportFacts,
    digest_for_config,
    match_report,
)
from sevlaunch.snp.tcb import Product, TcbVersion

SNP = Path(__file__).resolve().parents[1] / "vectors" / "snp"
AMDSEV = SNP / "measurement" / "ovmf_AmdSev_suffix.bin"
KAT = {c["id"]: c for c in json.loads((SNP / "kat-snp.json").read_text())}
NOW = datetime(2026, 6, 1, tzinfo=UTC)
FAMILY = bytes.fromhex("11" * 16)
IMAGE = bytes.fromhex("22" * 16)
GENOA_MIN = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
TURIN_MIN = TcbVersion(Product.TURIN, fmc=1, bootloader=1, tee=1, snp=3, microcode=72)
KEY = generate_private_key(KeyType.ED25519)
PUBLISHER = PublisherKey(KEY.public_key())


def _cfg(vcpus: int = 1, **kw: object) -> DigestConfig:
    args: dict[str, object] = dict(vcpu_type="EPYC-v4", guest_features=0x1, vmm_type="QEMU")
    args.update(kw)
    return DigestConfig(Technology.SEV_SNP, vcpus=vcpus, **args)  # type: ignore[arg-type]


def _snp(**kw: object) -> SnpReference:
    args: dict[str, object] = dict(
        family_id=FAMILY, image_id=IMAGE, guest_svn=2, min_tcb=(GENOA_MIN, TURIN_MIN)
    )
    args.update(kw)
    return SnpReference(**args)  # type: ignore[arg-type]


def _manifest(digests: list[ReferenceDigest] | None = None, *, now: datetime = NOW, **kw: object) -> Manifest:
    return make_manifest(
        publisher="distro",
        firmware_name="OVMF",
        firmware_version="2025.02",
        digests=digests or [ReferenceDigest(b"\x01" * 48, _cfg(1)), ReferenceDigest(b"\x04" * 48, _cfg(4))],
        valid_days=30,
        now=now - timedelta(days=1),
        snp=kw.pop("snp", _snp()),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _verified(manifest: Manifest):  # type: ignore[no-untyped-def]
    envelope = sign_envelope(manifest.to_json(), KEY).to_json()
    return verify_manifest(envelope, [PUBLISHER], now=NOW)


def _facts(**kw: object) -> ReportFacts:
    tcb = TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=72)
    args: dict[str, object] = dict(
        measurement=b"\x01" * 48,
        product=Product.GENOA,
        tcbs={"reported": tcb, "committed": tcb, "launch": tcb},
        family_id=FAMILY,
        image_id=IMAGE,
        guest_svn=2,
    )
    args.update(kw)
    return ReportFacts(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ manifest


def test_snp_manifest_round_trip() -> None:
    m = _manifest()
    raw = m.to_json()
    obj = json.loads(raw)
    assert obj["snp"] == {
        "family_id": "11" * 16,
        "image_id": "22" * 16,
        "guest_svn": 2,
        "min_tcb": {
            "genoa": {"bootloader": 9, "tee": 0, "snp": 23, "microcode": 72},
            "turin": {"fmc": 1, "bootloader": 1, "tee": 1, "snp": 3, "microcode": 72},
        },
    }
    assert obj["digests"][0]["config"] == {
        "mode": "sev-snp",
        "vcpus": 1,
        "vcpu_type": "EPYC-v4",
        "guest_features": 1,
        "vmm_type": "QEMU",
    }
    again = Manifest.from_json(raw)
    assert again == m and again.to_json() == raw


def test_sev_manifest_has_no_snp_section() -> None:
    m = make_manifest(
        publisher="p",
        firmware_name="OVMF",
        firmware_version="1",
        digests=[ReferenceDigest(b"\x11" * 32, DigestConfig(Technology.SEV))],
        valid_days=1,
        now=NOW,
    )
    assert b"snp" not in m.to_json()
    with pytest.raises(MalformedInput, match="snp section"):
        Manifest.from_json(
            m.to_json().replace(
                b'"publisher"', b'"snp": ' + json.dumps(_snp().to_obj()).encode() + b', "publisher"'
            )
        )


def _mutated(path: list[object], value: object) -> bytes:
    obj = json.loads(_manifest().to_json())
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["snp"], KeyError),
        (["snp", "extra"], 1),
        (["snp", "family_id"], "11" * 15),
        (["snp", "image_id"], "ZZ" * 16),
        (["snp", "guest_svn"], -1),
        (["snp", "guest_svn"], 1 << 32),
        (["snp", "guest_svn"], True),
        (["snp", "min_tcb", "rome"], {"bootloader": 1, "tee": 1, "snp": 1, "microcode": 1}),
        (["snp", "min_tcb", "genoa", "fmc"], 1),
        (["snp", "min_tcb", "genoa", "microcode"], 256),
        (["snp", "min_tcb", "turin", "fmc"], KeyError),
        (["digests", 0, "launch_digest"], "01" * 32),
        (["digests", 0, "config", "vmsa_layout"], "init2"),
        (["digests", 0, "config", "guest_features"], 0x20),
        (["digests", 0, "config", "guest_features"], "0x1"),
        (["digests", 0, "config", "vmm_type"], "kvm"),
        (["digests", 0, "config", "vcpu_type"], KeyError),
        (["digests", 0, "config", "vcpus"], 0),
        (["digests", 0, "config", "bogus"], 0),
    ],
)
def test_strict_parsing(path: list[object], value: object) -> None:
    with pytest.raises(MalformedInput):
        Manifest.from_json(_mutated(path, value))


def test_vcpu_type_optional_off_qemu() -> None:
    cfg = _cfg(4, vcpu_type=None, vmm_type="gce")
    assert "vcpu_type" not in cfg.to_obj()
    assert DigestConfig.from_obj(cfg.to_obj()) == cfg
    with pytest.raises(MalformedInput):
        ReferenceDigest(b"\x00" * 32, cfg)
    with pytest.raises(MalformedInput):
        DigestConfig(Technology.SEV, guest_features=1)


def test_min_tcb_short_form() -> None:
    assert parse_min_tcb("genoa=9:0:23:72") == GENOA_MIN
    assert parse_min_tcb("Turin=1:1:1:3:72") == TURIN_MIN
    for bad in ("genoa=9:0:23", "genoa=9:0:23:256", "rome=1:1:1:1", "genoa", "turin=1:1:3:72"):
        with pytest.raises(MalformedInput):
            parse_min_tcb(bad)


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_make_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    rc = cli_main(
        [
            "refvalues", "make", "--mode", "sev-snp", "--firmware", str(AMDSEV), "--name", "OVMF",
            "--version", "2025.02", "--vcpus", "1,4", "--vcpu-type", "EPYC-v4", "--guest-features", "0x21",
            "--min-tcb", "genoa=9:0:23:72", "--min-tcb", "turin=1:1:1:3:72", "--family-id", "11" * 16,
            "--guest-svn", "2", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    m = Manifest.from_json(out.read_bytes())
    assert [d.config.vcpus for d in m.digests] == [1, 4]
    expected = KAT["ssm-snp-without-kernel-default"]
    assert expected["inputs"]["vcpus"] == 1 and expected["inputs"]["guest_features"] == "0x21"
    assert m.digests[0].launch_digest.hex() == expected["expected"]
    assert m.snp == SnpReference(FAMILY, bytes(16), 2, (GENOA_MIN, TURIN_MIN))
    assert m.digests[0].config == _cfg(1, guest_features=0x21)
    key, pub = tmp_path / "k", tmp_path / "k.pub"
    assert cli_main(["keygen", "--out", str(key)]) == 0
    assert (
        cli_main(["refvalues", "sign", "--key", str(key), str(out), "--out", str(tmp_path / "m.dsse")]) == 0
    )
    capsys.readouterr()
    assert cli_main(["refvalues", "verify", "--pubkey", str(pub), str(tmp_path / "m.dsse")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["snp"]["min_tcb"]["genoa"]["microcode"] == 72


def test_cli_make_gce_without_vcpu_type(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    args = ["refvalues", "make", "--mode", "sev-snp", "--firmware", str(AMDSEV), "--name", "OVMF"]
    args += ["--version", "1", "--vcpus", "4", "--vmm-type", "gce", "--out", str(out)]
    args += ["--kernel", str(SNP / "measurement" / "empty"), "--initrd", str(SNP / "measurement" / "empty")]
    args += ["--cmdline", ""]
    assert cli_main(args) == 0
    digest = Manifest.from_json(out.read_bytes()).digests[0]
    assert digest.launch_digest.hex() == KAT["ssm-snp-gce-with-multiple-vcpus-default"]["expected"]
    assert digest.config.kernel_hashes is not None


def test_cli_make_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["refvalues", "make", "--firmware", str(AMDSEV), "--name", "O", "--version", "1"]
    base += ["--out", str(tmp_path / "m.json")]
    assert cli_main([*base, "--mode", "sev-snp", "--vcpus", "1"]) == 2  # QEMU needs --vcpu-type
    assert cli_main([*base, "--mode", "sev", "--min-tcb", "genoa=1:1:1:1"]) == 2
    assert (
        cli_main([*base, "--mode", "sev-snp", "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--min-tcb", "x"])
        == 2
    )
    assert "min TCB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*base, "--mode", "sev-snp", "--vcpus", "0"])


# ------------------------------------------------------------------------------------------- lookup


def test_match_accepts() -> None:
    vm = _verified(_manifest())
    hit = match_report([vm], _facts(vcpus=1), now=NOW)
    assert hit.manifest_id == vm.id and hit.digest.config.vcpus == 1
    assert match_report([vm], _facts(measurement=b"\x04" * 48), now=NOW).digest.config.vcpus == 4
    # A TCB above the floor in every component (a microcode update that did not change the digest).
    newer = TcbVersion(Product.GENOA, bootloader=10, tee=1, snp=24, microcode=80)
    match_report([vm], _facts(tcbs={"reported": newer, "committed": newer, "launch": newer}), now=NOW)


@pytest.mark.parametrize(
    ("facts", "reason", "words"),
    [
        (_facts(measurement=b"\x02" * 48), RefReason.MEASUREMENT_MISMATCH, "measurement"),
        (_facts(vcpus=2), RefReason.VCPUS_MISMATCH, "vcpus"),
        (_facts(family_id=bytes(16)), RefReason.FAMILY_ID_MISMATCH, "family_id"),
        (_facts(image_id=bytes(16)), RefReason.IMAGE_ID_MISMATCH, "image_id"),
        (_facts(guest_svn=1), RefReason.GUEST_SVN_TOO_LOW, "guest_svn: 1 < 2"),
        (
            _facts(
                tcbs={
                    "reported": GENOA_MIN,
                    "committed": TcbVersion(Product.GENOA, bootloader=9, tee=0, snp=23, microcode=71),
                    "launch": GENOA_MIN,
                }
            ),
            RefReason.TCB_TOO_LOW,
            "committed_tcb: microcode 71<72",
        ),
        (
            _facts(
                product=Product.MILAN,
                tcbs={"launch": TcbVersion(Product.MILAN, bootloader=9, tee=0, snp=23, microcode=72)},
            ),
            RefReason.PRODUCT_NOT_COVERED,
            "milan",
        ),
    ],
)
def test_match_refusals(facts: ReportFacts, reason: RefReason, words: str) -> None:
    with pytest.raises(ReferenceMismatch) as err:
        match_report([_verified(_manifest())], facts, now=NOW)
    assert err.value.reason is reason
    assert words in err.value.detail


def test_several_manifests_and_validity() -> None:
    old = _verified(_manifest(snp=_snp(guest_svn=5)))
    new = _verified(_manifest([ReferenceDigest(b"\x01" * 48, _cfg(1))], snp=_snp(guest_svn=2, min_tcb=())))
    # The first manifest refuses SVN 2, the second (no TCB floor) accepts it: the report matches.
    assert match_report([old, new], _facts(), now=NOW).manifest_id == new.id
    # Outside every window: nothing in force.
    with pytest.raises(ReferenceMismatch) as err:
        match_report([old, new], _facts(), now=NOW + timedelta(days=60))
    assert err.value.reason is RefReason.NO_REFERENCE_VALUES
    # The deepest refusal is reported when no candidate accepts.
    with pytest.raises(ReferenceMismatch) as err:
        match_report([old], _facts(), now=NOW)
    assert err.value.reason is RefReason.GUEST_SVN_TOO_LOW


def test_digest_for_config() -> None:
    kh = KernelHashes("aa" * 32, "bb" * 32, "cc" * 32)
    first = _verified(_manifest())
    later = _verified(
        _manifest(
            [
                ReferenceDigest(b"\x09" * 48, _cfg(4)),
                ReferenceDigest(b"\x0a" * 48, _cfg(4, kernel_hashes=kh)),
            ],
            now=NOW + timedelta(hours=1),
        )
    )
    common = dict(vcpu_type="EPYC-v4", guest_features=1, vmm_type="QEMU", now=NOW + timedelta(hours=2))
    assert (
        digest_for_config([first, later], vcpus=1, kernel_hashes=None, **common).launch_digest == b"\x01" * 48
    )  # type: ignore[arg-type]
    assert digest_for_config([first, later], vcpus=4, kernel_hashes=None, **common).manifest_id == later.id  # type: ignore[arg-type]
    assert (
        digest_for_config([first, later], vcpus=4, kernel_hashes=kh, **common).launch_digest == b"\x0a" * 48
    )  # type: ignore[arg-type]
    for change in ({"vcpus": 2}, {"guest_features": 0x21}, {"vmm_type": "ec2"}, {"vcpu_type": "EPYC-Milan"}):
        args = {**common, "vcpus": 1, "kernel_hashes": None, **change}
        with pytest.raises(ReferenceMismatch) as err:
            digest_for_config([first, later], **args)  # type: ignore[arg-type]
        assert err.value.reason is RefReason.NO_DIGEST_FOR_CONFIG


def test_sev_reason_is_unchanged_for_bad_digest_size() -> None:
    with pytest.raises(MalformedInput) as err:
        ReferenceDigest(b"\x01" * 48, DigestConfig(Technology.SEV))
    assert err.value.reason is Reason.BAD_LENGTH
