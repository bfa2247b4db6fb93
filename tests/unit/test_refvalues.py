"""Reference value manifests in DSSE envelopes: the encoding, signing, and every refusal reason."""

from __future__ import annotations

import base64
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sevlaunch.cli import main as cli_main
from sevlaunch.refvalues import (
    PAYLOAD_TYPE,
    DigestConfig,
    Envelope,
    KeyType,
    Manifest,
    PublisherKey,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    manifest_id,
    pae,
    public_key_pem,
    sign_envelope,
    verify_manifest,
    version_in_range,
    version_key,
)
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.technology import Technology

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
OVMF = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def _manifest(**kw: object) -> Manifest:
    args: dict[str, object] = dict(
        publisher="distro",
        firmware_name="OVMF",
        firmware_version="2024.05",
        digests=[
            ReferenceDigest(b"\x11" * 32, DigestConfig(Technology.SEV)),
            ReferenceDigest(
                b"\x22" * 32,
                DigestConfig(Technology.SEV_ES, vcpus=4, vcpu_type="EPYC-Milan", vmsa_layout="init2"),
            ),
        ],
        valid_days=30,
        now=NOW,
    )
    args.update(kw)
    return make_manifest(**args)  # type: ignore[arg-type]


def test_pae_matches_the_dsse_specification() -> None:
    # The DSSE protocol document's worked example.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("key_type", list(KeyType))
def test_sign_and_verify_round_trip(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    manifest = _manifest()
    envelope = sign_envelope(manifest.to_json(), key)
    assert envelope.payload_type == PAYLOAD_TYPE
    vm = verify_manifest(envelope.to_json(), [PublisherKey(key.public_key())], now=NOW + timedelta(days=1))
    assert vm.manifest == manifest and vm.id == manifest_id(manifest.to_json())
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_refusals_have_reasons() -> None:
    key = generate_private_key(KeyType.ED25519)
    trusted = [PublisherKey(key.public_key())]
    payload = _manifest().to_json()
    good = sign_envelope(payload, key)
    later = NOW + timedelta(days=1)

    def reason(data: bytes, *, now: datetime = later, revoked: tuple[str, ...] = ()) -> Reason:
        with pytest.raises((VerificationFailed, MalformedInput)) as info:
            verify_manifest(data, trusted, now=now, revoked=revoked)
        return info.value.reason

    assert reason(Envelope(PAYLOAD_TYPE, payload, ()).to_json()) is Reason.MISSING_SIGNATURE
    stranger = sign_envelope(payload, generate_private_key(KeyType.ECDSA_P256))
    assert reason(stranger.to_json()) is Reason.WRONG_SIGNER
    tampered = Envelope(PAYLOAD_TYPE, payload.replace(b"distro", b"evilco"), good.signatures)
    assert reason(tampered.to_json()) is Reason.BAD_SIGNATURE
    # The signature covers the payload type too (PAE): relabelling breaks it.
    relabelled = Envelope("application/json", payload, good.signatures)
    assert reason(relabelled.to_json()) is Reason.BAD_MANIFEST
    assert reason(good.to_json(), now=NOW + timedelta(days=31)) is Reason.EXPIRED
    assert reason(good.to_json(), now=NOW - timedelta(seconds=1)) is Reason.EXPIRED
    assert reason(good.to_json(), revoked=(manifest_id(payload),)) is Reason.REVOKED
    assert reason(b"not json") is Reason.BAD_ENCODING
    with pytest.raises(VerificationFailed):
        verify_manifest(good.to_json(), [], now=later)  # no trusted key: nothing is trusted


def test_manifest_parsing_is_strict() -> None:
    obj = json.loads(_manifest().to_json())
    for mutate in (
        lambda o: o.update(extra=1),
        lambda o: o["digests"][0].update(launch_digest="00"),
        lambda o: o["digests"][0]["config"].update(mode="snp"),
        lambda o: o["digests"][1]["config"].pop("vcpus"),
        lambda o: o.update(digests=[]),
        lambda o: o.update(not_after=o["not_before"]),
        lambda o: o.update(schema="other"),
    ):
        bad = json.loads(json.dumps(obj))
        mutate(bad)
        with pytest.raises(MalformedInput):
            Manifest.from_json(json.dumps(bad).encode())


def test_version_ordering() -> None:
    assert version_key("2024.02") > version_key("2023.11-6")
    assert version_key("1.10") > version_key("1.9")
    assert version_in_range("2024.05", "2024.01", "2024.12")
    assert not version_in_range("2023.11", "2024.01", None)
    assert version_in_range("anything", None, None)


def test_cli_keygen_make_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "distro.key"
    assert cli_main(["keygen", "--out", str(key), "--type", "ed25519"]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert cli_main(["keygen", "--out", str(key)]) == 1  # never overwrites a signing key silently
    manifest = tmp_path / "m.json"
    assert (
        cli_main(
            [
                "refvalues",
                "make",
                "--firmware",
                str(OVMF),
                "--name",
                "OVMF",
                "--version",
                "2024.05",
                "--mode",
                "sev",
                "--mode",
                "sev-es",
                "--vcpus",
                "1",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
                "--valid-days",
                "10",
                "--out",
                str(manifest),
            ]
        )
        == 0
    )
    parsed = Manifest.from_json(manifest.read_bytes())
    image = OVMF.read_bytes()
    assert parsed.digests[0].launch_digest == launch_digest(image, mode="sev")
    assert [d.config.vcpus for d in parsed.digests] == [None, 1, 4]
    envelope = tmp_path / "m.dsse"
    assert cli_main(["refvalues", "sign", "--key", str(key), str(manifest), "--out", str(envelope)]) == 0
    capsys.readouterr()
    assert cli_main(["refvalues", "verify", "--pubkey", f"{key}.pub", str(envelope)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest_id"] == manifest_id(manifest.read_bytes()) and len(out["digests"]) == 3
    other = tmp_path / "other.key"
    cli_main(["keygen", "--out", str(other)])
    assert cli_main(["refvalues", "verify", "--pubkey", f"{other}.pub", str(envelope)]) == 1
    assert "wrong_signer" in capsys.readouterr().err
    env = json.loads(envelope.read_bytes())
    env["payload"] = base64.b64encode(base64.b64decode(env["payload"]).replace(b"OVMF", b"OVMG")).decode()
    envelope.write_text(json.dumps(env))
    assert cli_main(["refvalues", "verify", "--pubkey", f"{key}.pub", str(envelope)]) == 1
    assert "bad_signature" in capsys.readouterr().err
    assert public_key_pem(PublisherKey.from_pem((tmp_path / "distro.key.pub").read_bytes()).public_key)
