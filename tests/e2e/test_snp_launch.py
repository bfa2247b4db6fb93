"""SEV-SNP end to end: the three services as processes (the SNP demo's world: owner with its guest port,
platform and launcher on one emulated Genoa chip, Debian's 2 MiB OVMF), the emulated hypervisor running
each guest's agent, and the attestation refusals that can be provoked from outside, each checked to leave
nothing released and a typed refusal in the owner's audit log (GetAuditLog).

What is provoked here, and how:
* a tampered image: the firmware refuses SNP_LAUNCH_FINISH (its digest is not the ID block's);
* TCB floors and the debug policy: the tenant tightens the workload while the guest boots (between the
  launcher's AUTHORIZED event and the guest's report), so the owner decides on the guest's signed report;
  and the same floors and policy refused at AuthorizeSnpLaunch when they are known before;
* replayed reports, a reused challenge and a second release: the first guest's exchange, captured from
  the guest network (its `attestation.json`), sent again.
A wrong measurement cannot be provoked from outside: the firmware enforces the owner's ID block, so a
guest whose digest differs never runs (the tampered case).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.demo.snp import (
    SNP_FIRMWARE,
    SNP_POLICY,
    SNP_WORKLOAD_ID,
    SnpDemoEnvironment,
    SnpLaunchOutcome,
    snp_spec,
)
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import guest_pb2, owner_pb2
from sevlaunch.sev.secret import DISK_PASSPHRASE_GUID, SecretTable
from sevlaunch.snp.initdata import InitData

PASSPHRASE = b"snp-e2e correct horse battery staple"
DEBUG = 1 << 19  # the SNP guest policy's DEBUG bit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SNP_FIRMWARE.is_file(), reason="Debian's OVMF (package ovmf) is not installed"),
]


@pytest.fixture(scope="module")
def id_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, id_key: ec.EllipticCurvePrivateKey
) -> Iterator[SnpDemoEnvironment]:
    world = SnpDemoEnvironment(workdir=tmp_path_factory.mktemp("snp-e2e"), boot_seconds=1.0)
    try:
        world.prepare()
        world.start()
        world.configure_owner()
        admin = world.owner_admin()
        admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id=SNP_WORKLOAD_ID,
                entries=[owner_pb2.SecretEntry(guid=str(DISK_PASSPHRASE_GUID), data=PASSPHRASE + b"\0")],
            )
        )
        # A known ID key, so the files can be searched for it (the owner keeps it sealed under its KEK).
        pem = id_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        admin.RotateSnpKey(
            owner_pb2.RotateSnpKeyRequest(
                workload_id=SNP_WORKLOAD_ID, kind=owner_pb2.SNP_KEY_KIND_ID, private_key_pem=pem
            )
        )
        yield world
    finally:
        world.close()


def audit(env: SnpDemoEnvironment) -> list[owner_pb2.AuditRecord]:
    return env.owner_audit_events()


def refusals_for(env: SnpDemoEnvironment, authorization_id: str) -> list[tuple[str, str]]:
    return [
        (r.action, r.reason)
        for r in audit(env)
        if r.session_id == authorization_id and r.outcome == "refused"
    ]


def assert_nothing_released(env: SnpDemoEnvironment, r: SnpLaunchOutcome) -> None:
    assert r.outcome == "refused"
    assert r.guests_after == r.guests_before  # the domain (and its SNP guest context) is gone
    assert r.launcher_state == "FAILED"
    assert not (env.guests_dir / r.domain_name / "secret").exists()
    if r.authorization_id:
        auth = env.authorization(r.authorization_id)
        assert auth is not None and auth.state != owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED
    released = [
        rec for rec in audit(env) if rec.session_id == r.authorization_id and rec.action == "attest_snp"
    ]
    assert all(rec.outcome == "refused" for rec in released)


# ------------------------------------------------------------------------------------------ launches


@pytest.fixture(scope="module")
def good(env: SnpDemoEnvironment) -> SnpLaunchOutcome:
    return env.launch_snp("snp-good", SNP_FIRMWARE)


def test_attested_launch_reaches_running_and_the_guest_holds_the_secret(
    env: SnpDemoEnvironment, good: SnpLaunchOutcome
) -> None:
    assert good.outcome == "running", good.detail
    assert list(good.durations_ms) == ["chain_fetched", "authorized", "defined", "started", "running"]
    assert good.authorization_state == "RELEASED"
    # The guest's report showed exactly the digest the owner put in the ID block.
    assert good.measurement == good.matched_digest == env.reference_digest.hex()
    secret = env.guests_dir / good.domain_name / "secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    table = SecretTable.from_bytes(secret.read_bytes())
    assert table.get(DISK_PASSPHRASE_GUID) == PASSPHRASE + b"\0"
    allowed = [r for r in audit(env) if r.session_id == good.authorization_id and r.outcome == "allowed"]
    assert [r.action for r in allowed] == ["authorize_snp_launch", "attest_snp"]
    assert allowed[0].actor == "launcher" and allowed[1].actor.startswith("guest:")
    # The emulated root is trusted because the owner was told so, for Genoa only.
    argv = list(env.services["owner"].argv)
    assert argv[argv.index("--snp-trust-root") + 1] == f"genoa={env.snp_root_file}"


def test_tampered_image_is_refused_by_the_firmware(env: SnpDemoEnvironment) -> None:
    r = env.launch_snp("snp-tampered", env.tampered_firmware)
    assert (r.phase, r.reason) == ("STARTED", "snp_launch_refused")
    assert "BAD_MEASUREMENT" in r.detail
    assert_nothing_released(env, r)
    # The guest never ran: no agent asked anything.
    assert r.guest_outcome == ""
    # The launcher revoked the authorisation of the refused launch (before it reported the failure), so
    # it does not stay open until it expires; the owner audited it under the launcher's identity.
    assert r.authorization_id and r.authorization_state == "REVOKED"
    revoked = [rec for rec in audit(env) if rec.session_id == r.authorization_id and rec.outcome == "allowed"]
    assert [(rec.action, rec.actor) for rec in revoked] == [
        ("authorize_snp_launch", "launcher"),
        ("revoke_snp_authorization", "launcher"),
    ]
    assert revoked[1].launch_id == r.launch_id


@pytest.mark.parametrize("kind", ["reported", "committed", "launch"])
def test_tcb_floor_raised_while_booting_is_refused_at_attestation(
    env: SnpDemoEnvironment, good: SnpLaunchOutcome, kind: str
) -> None:
    assert env.chip_tcb is not None
    raised = replace(env.chip_tcb, snp=env.chip_tcb.snp + 1)
    floor = owner_pb2.SnpTcbMinimum(product="genoa", **{kind: raised.raw})
    try:
        r = env.launch_snp(
            f"snp-{kind}", SNP_FIRMWARE, on_authorized=lambda: env.put_workload(min_tcb=[floor])
        )
    finally:
        env.put_workload()
    assert (r.phase, r.reason) == ("RUNNING", f"{kind}_tcb_too_low")
    assert r.guest_outcome == "refused" and r.guest_reason == f"{kind}_tcb_too_low"
    assert r.authorization_state == "REFUSED"
    assert_nothing_released(env, r)
    assert refusals_for(env, r.authorization_id) == [("attest_snp", f"{kind}_tcb_too_low")]


@pytest.mark.parametrize("kind", ["reported", "committed", "launch"])
def test_tcb_floor_known_before_is_refused_at_authorisation(env: SnpDemoEnvironment, kind: str) -> None:
    assert env.chip_tcb is not None
    raised = replace(env.chip_tcb, snp=env.chip_tcb.snp + 1)
    env.put_workload(min_tcb=[owner_pb2.SnpTcbMinimum(product="genoa", **{kind: raised.raw})])
    try:
        before = len(audit(env))
        r = env.launch_snp(f"snp-early-{kind}", SNP_FIRMWARE)
    finally:
        env.put_workload()
    assert (r.phase, r.reason) == ("AUTHORIZED", f"{kind}_tcb_too_low")
    assert r.authorization_id == "" and r.guests_after == r.guests_before
    new = audit(env)[before:]
    assert [(x.action, x.outcome, x.reason) for x in new if x.action == "authorize_snp_launch"] == [
        ("authorize_snp_launch", "refused", f"{kind}_tcb_too_low")
    ]


def test_debug_policy_not_allowed(env: SnpDemoEnvironment) -> None:
    # Asked for up front: refused at AuthorizeSnpLaunch.
    spec = snp_spec("snp-debug", SNP_FIRMWARE, policy=SNP_POLICY | DEBUG)
    r = env.launch_snp("snp-debug", SNP_FIRMWARE, spec=spec)
    assert (r.phase, r.reason) == ("AUTHORIZED", "policy_not_allowed")
    # Allowed when authorised, forbidden by the time the guest attests: refused on its report.
    env.put_workload(policies=[SNP_POLICY | DEBUG], allow_debug=True)
    try:
        r = env.launch_snp(
            "snp-debug-late", SNP_FIRMWARE, spec=spec, on_authorized=lambda: env.put_workload()
        )
    finally:
        env.put_workload()
    assert (r.phase, r.reason) == ("RUNNING", "policy_not_allowed")
    assert_nothing_released(env, r)
    assert refusals_for(env, r.authorization_id) == [("attest_snp", "policy_not_allowed")]


# ------------------------------------------------------------------------------ replays, reuse


def _guest_stub(env: SnpDemoEnvironment, authorization_id: str) -> tuple[grpc.Channel, Any]:
    init = InitData.new(
        endpoint=f"https://127.0.0.1:{env.guest_port}",
        ca_pem=(env.tls_dir / "ca.pem").read_text("ascii"),
        authorization_id=authorization_id,
    )
    return env._guest_stub(init)


def test_second_release_and_replays_are_refused(env: SnpDemoEnvironment, good: SnpLaunchOutcome) -> None:
    recorded = env.guest_record(good.domain_name)
    assert recorded["outcome"] == "released" and recorded["report"]

    # The guest's own exchange sent again: its launch was released already.
    again = env.replay("again", recorded)
    assert again.refused and (again.code, again.reason) == ("FAILED_PRECONDITION", "already_released")

    # The report replayed to another (authorised, unlaunched) launch with that launch's fresh challenge.
    fresh = env.fresh_authorization()
    other = env.replay("other", recorded, target=fresh.authorization_id)
    assert other.refused and other.code == "PERMISSION_DENIED"
    assert other.reason in ("host_data_mismatch", "report_data_mismatch")
    assert not other.released_after

    # The challenge that replay spent, used again: refused as a reused challenge.
    channel, stub = _guest_stub(env, fresh.authorization_id)
    try:
        challenge = stub.GetChallenge(
            guest_pb2.GetChallengeRequest(authorization_id=fresh.authorization_id)
        ).challenge
        request = guest_pb2.AttestRequest(
            authorization_id=fresh.authorization_id,
            challenge=challenge,
            report=bytes.fromhex(recorded["report"]),
            guest_public_key=bytes.fromhex(recorded["guest_public_key"]),
        )
        with pytest.raises(grpc.RpcError) as first:
            stub.Attest(request)
        with pytest.raises(grpc.RpcError) as second:
            stub.Attest(request)
    finally:
        channel.close()
    assert error_info(first.value).reason in ("host_data_mismatch", "report_data_mismatch")
    assert (error_info(second.value).code, error_info(second.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "challenge_used",
    )
    # None of these spoke for the fresh launch: it is still open, nothing released, every try audited.
    auth = env.authorization(fresh.authorization_id)
    assert auth is not None and auth.state == owner_pb2.SNP_AUTHORIZATION_STATE_AUTHORIZED
    reasons = [reason for _, reason in refusals_for(env, fresh.authorization_id)]
    assert reasons[-1] == "challenge_used" and len(reasons) == 3
    assert ("attest_snp", "already_released") in refusals_for(env, good.authorization_id)
    env.revoke(fresh.authorization_id)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_launch_snp_prints_the_phases(env: SnpDemoEnvironment) -> None:
    common = [
        "--launcher", env.services["launcher"].address,
        "--owner", env.services["owner"].address,
        "--tls-dir", str(env.tls_dir),
        "--workload", SNP_WORKLOAD_ID,
        "--firmware", str(SNP_FIRMWARE),
        "--memory", "256",
    ]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEVLAUNCH_")}
    ok = subprocess.run(
        [sys.executable, "-m", "sevlaunch", "launch", "--snp", "--name", "cli-snp", *common],
        capture_output=True, text=True, timeout=120, env=clean, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    phases = [line.split()[0] for line in ok.stdout.splitlines()]
    assert phases == ["CHAIN_FETCHED", "AUTHORIZED", "DEFINED", "STARTED", "RUNNING"]
    refused = subprocess.run(
        [sys.executable, "-m", "sevlaunch", "launch", "--snp", "--name", "cli-tampered", *common[:-4],
         "--firmware", str(env.tampered_firmware), "--memory", "256"],
        capture_output=True, text=True, timeout=120, env=clean, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "FAILED in STARTED: snp_launch_refused" in refused.stdout


# ------------------------------------------------------------------------------------ no leaks


def _needles(id_key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    scalar = id_key.private_numbers().private_value.to_bytes(48, "big")
    pem = id_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = id_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {
        "passphrase": PASSPHRASE,
        "passphrase hex": PASSPHRASE.hex().encode(),
        "passphrase base64": base64.b64encode(PASSPHRASE),
        "id key scalar": scalar,
        "id key scalar hex": scalar.hex().encode(),
        "id key PEM body": pem.splitlines()[1],
        "id key DER": der,
    }


def test_no_secret_or_private_key_in_any_file_the_run_wrote(
    env: SnpDemoEnvironment, good: SnpLaunchOutcome, id_key: ec.EllipticCurvePrivateKey
) -> None:
    # The owner really signed with the imported key (else this search would prove nothing about it).
    auth = env.authorization(good.authorization_id)
    assert auth is not None
    keys = env.owner_admin().ListSnpKeys(owner_pb2.ListSnpKeysRequest(workload_id=SNP_WORKLOAD_ID)).keys
    active = [k for k in keys if k.kind == owner_pb2.SNP_KEY_KIND_ID and not k.retired_at_unix]
    assert [k.public_digest for k in active] == [auth.id_key_digest] and active[0].source == "imported"
    # The guest's memory (its secret file) is the one place the secret may be.
    guest_memory = {p for p in env.guests_dir.rglob("secret") if p.is_file()}
    assert env.guests_dir / good.domain_name / "secret" in guest_memory
    found: list[str] = []
    searched = 0
    for path in env.workdir.rglob("*"):
        if not path.is_file() or path in guest_memory:
            continue
        data = path.read_bytes()
        searched += 1
        found += [f"{name} in {path}" for name, needle in _needles(id_key).items() if needle in data]
    assert searched > 20 and found == []
    # The logs say what happened without the secret: the agent's and the owner's lines are there.
    logs = "".join((env.logs_dir / f"{n}.log").read_text() for n in ("owner", "launcher", "platform"))
    assert "emulated SNP guest attested" in logs and "snp secret released" in logs
    records = json.dumps([str(r) for r in audit(env)])
    assert PASSPHRASE.decode() not in records


# ------------------------------------------------------------------------------------ the demo


def test_demo_snp_json_reports_its_launches_replays_and_audit(tmp_path: Path) -> None:
    # Its own services (the module's world is not used): the command a new user runs.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SEVLAUNCH_")} | {
        "TMPDIR": str(tmp_path)
    }
    run = subprocess.run(
        [sys.executable, "-m", "sevlaunch", "demo", "--snp", "--json"],
        capture_output=True, text=True, timeout=300, env=clean, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["technology"] == "sev-snp" and doc["ok"] is True and doc["audit_ok"] is True
    by = {launch["name"]: launch for launch in doc["launches"]}
    good, bad, low = by["demo-snp-guest"], by["demo-snp-tampered"], by["demo-snp-tcb"]
    assert (good["outcome"], good["phase"], good["technology"]) == ("running", "RUNNING", "sev-snp")
    assert good["secret_received"] is True and good["authorization_state"] == "RELEASED"
    assert good["measurement"] == good["matched_digest"] == doc["reference_digest"]
    assert good["manifest_id"] == doc["manifest_id"]
    assert (bad["outcome"], bad["phase"], bad["reason"]) == ("refused", "STARTED", "snp_launch_refused")
    assert (low["outcome"], low["phase"], low["reason"]) == ("refused", "RUNNING", "reported_tcb_too_low")
    assert low["authorization_state"] == "REFUSED" and low["guest_reason"] == "reported_tcb_too_low"
    for refused in (bad, low):
        assert refused["domain_destroyed"] is True and refused["launcher_state"] == "FAILED"
        assert refused["secret_received"] is False
    replays = {r["name"]: r for r in doc["replays"]}
    assert replays["replay-to-its-own-launch"]["reason"] == "already_released"
    other = replays["replay-to-another-launch"]
    assert other["outcome"] == "refused" and other["released_after"] is False
    # Everything it made is gone.
    assert not list(tmp_path.glob("sevlaunch-demo-*"))


# ------------------------------------------------------------------------------------ a VLEK


def test_a_vlek_signed_launch_is_refused_unless_the_workload_allows_vleks(tmp_path: Path) -> None:
    """A chip with a cloud's VLEK loaded signs its guests' reports with it: the owner refuses such a
    platform at authorisation unless the workload allows VLEKs; then the launch runs, its report verified
    against the VLEK the platform provisioned; and a launch whose workload stops allowing VLEKs while it
    boots ends at its attestation."""
    provisioned = tmp_path / "veks"
    world = SnpDemoEnvironment(
        workdir=tmp_path / "world", boot_seconds=1.0, platform_args=("--vcek-dir", str(provisioned))
    )
    with world:
        world.prepare()
        chip = EmulatedFirmware(world.chip_dir, create=False)
        chip.snp_vlek_load(chip.snp_vlek_hashstick("example-cloud"))
        provisioned.mkdir()
        (provisioned / "vlek.der").write_bytes(chip.snp_vlek_der())
        asvk, ark = x509.load_pem_x509_certificates(chip.snp_cert_chain_pem(vlek=True))
        (provisioned / "asvk.pem").write_bytes(asvk.public_bytes(serialization.Encoding.PEM))
        (provisioned / "ark.pem").write_bytes(ark.public_bytes(serialization.Encoding.PEM))
        world.start()
        world.configure_owner()

        early = world.launch_snp("vlek-early", SNP_FIRMWARE)
        assert (early.phase, early.reason) == ("AUTHORIZED", "vlek_not_allowed")
        refused = [r for r in audit(world) if r.action == "authorize_snp_launch" and r.outcome == "refused"]
        assert [r.reason for r in refused] == ["vlek_not_allowed"]

        world.put_workload(allow_vlek=True)
        ok = world.launch_snp("vlek-ok", SNP_FIRMWARE)
        assert ok.outcome == "running" and ok.secret_matches

        # VLEKs no longer allowed while a VLEK-authorised guest boots: its own report (signed by the
        # VLEK it was authorised with) is refused and ends the authorisation, so the launcher fails at
        # once with the owner's reason, not at its RUNNING deadline (`phase_deadline`).
        late = world.launch_snp(
            "vlek-late", SNP_FIRMWARE, on_authorized=lambda: world.put_workload(allow_vlek=False)
        )
        assert (late.phase, late.reason) == ("RUNNING", "vlek_not_allowed"), late.detail
        assert late.authorization_state == "REFUSED" and late.guest_reason == "vlek_not_allowed"
        assert_nothing_released(world, late)
        assert refusals_for(world, late.authorization_id) == [("attest_snp", "vlek_not_allowed")]
