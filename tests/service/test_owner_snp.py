"""The owner's SEV-SNP side through real servers on port 0: AuthorizeSnpLaunch on the mTLS port, then
GetChallenge and Attest on the guest port (server-authenticated TLS only), with reports signed in the
test by a chip's VCEK under an emulated AMD root that the owner trusts explicitly."""

from __future__ import annotations

import concurrent.futures
import hashlib
import uuid
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from owner_support import DISK_GUID, EXTRA_GUID, EXTRA_SECRET, PASSPHRASE, Publisher, rpc_error
from snp_support import (
    DIGEST,
    FAMILY,
    HIGH_TCB,
    IMAGE,
    LOW_TCB,
    POLICY,
    TCB,
    VCPUS,
    Chip,
    Guest,
    SnpOwner,
    authorize_request,
    launch_config,
    provision_snp,
    snp_rules,
    snp_workload,
)

from sevlaunch.guest.owner_client import GrpcOwnerClient
from sevlaunch.rpc.v1 import guest_pb2, guest_pb2_grpc, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.secret import SecretTable
from sevlaunch.snp.idblock import IdBlock, key_digest
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.policy import PolicyFlag
from sevlaunch.snp.report import SigningKey
from sevlaunch.snp.secret_wrap import SecretUnwrapFailed, WrappedSecret, open_secret

pytest_plugins = ["owner_support", "snp_support"]

AUTHORIZED = owner_pb2.SNP_AUTHORIZATION_STATE_AUTHORIZED
RELEASED = owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED
REFUSED = owner_pb2.SNP_AUTHORIZATION_STATE_REFUSED


def _authorize(owner: SnpOwner, chip: Chip, **kw: Any) -> Guest:
    return Guest(chip, owner.stub("launcher").AuthorizeSnpLaunch(authorize_request(chip, **kw)))


def _open(guest: Guest, response: guest_pb2.AttestResponse, challenge: bytes) -> SecretTable:
    wrapped = WrappedSecret(response.hpke_enc, response.ciphertext)
    plain = open_secret(
        wrapped, guest.key, authorization_id=guest.authorized.authorization_id, challenge=challenge
    )
    return SecretTable.from_bytes(plain)


# ------------------------------------------------------------------------------- authorisation


def test_authorize_then_attest_releases_the_secret_once(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner()
    manifest_id = provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    a = guest.authorized

    # What libvirt gets: an ID block for the reference digest, signed by the workload's ID key and the
    # author key over it; HOST_DATA the digest of init data naming this owner's guest port and CA.
    block = IdBlock.from_bytes(a.id_block)
    assert block.launch_digest == DIGEST == a.launch_digest and block.policy == a.policy == POLICY
    assert (block.family_id, block.image_id, block.guest_svn) == (FAMILY, IMAGE, 2)
    guest.id_auth.verify(block, author_key_enabled=True)
    assert a.author_key and a.manifest_id == manifest_id and a.product == "genoa"
    assert a.host_data == hashlib.sha256(a.init_data).digest()
    init = guest.init_data
    assert init.authorization_id == a.authorization_id
    assert init.endpoint.url == f"https://localhost:{owner.guest_port}"
    assert init.ca_pem == (owner.tls_dir / "ca.pem").read_text()
    keys = owner.admin.ListSnpKeys(owner_pb2.ListSnpKeysRequest(workload_id="snp-web")).keys
    assert {(k.kind, k.version) for k in keys} == {
        (owner_pb2.SNP_KEY_KIND_ID, 1),
        (owner_pb2.SNP_KEY_KIND_AUTHOR, 1),
    }
    assert guest.id_auth.id_key_digest.hex() in {k.public_digest for k in keys}

    # The guest, through the guest agent's own client: TLS checked against the init data's CA only.
    with GrpcOwnerClient(init) as client:
        challenge = client.get_challenge(a.authorization_id)
        wrapped = client.attest(
            authorization_id=a.authorization_id,
            challenge=challenge,
            report=guest.signed(challenge),
            cert_table=None,  # the owner uses the VCEK the platform was authorised with
            guest_public_key=guest.key.public_bytes,
        )
    table = SecretTable.from_bytes(
        open_secret(wrapped, guest.key, authorization_id=a.authorization_id, challenge=challenge)
    )
    assert table.get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"
    assert table.get(uuid.UUID(EXTRA_GUID)) == EXTRA_SECRET
    # Sealed to this guest's key and context only.
    with pytest.raises(SecretUnwrapFailed):
        open_secret(wrapped, Guest(chip, a).key, authorization_id=a.authorization_id, challenge=challenge)
    assert owner.authorization_state(a.authorization_id) == RELEASED

    # Once only: the authorisation is spent.
    err = rpc_error(
        lambda: owner.guest_stub().GetChallenge(
            guest_pb2.GetChallengeRequest(authorization_id=a.authorization_id)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "already_released")

    records = owner.audit()
    auth_rec = next(r for r in records if r.action == "authorize_snp_launch")
    assert auth_rec.outcome == "allowed" and auth_rec.session_id == a.authorization_id
    assert auth_rec.digest == DIGEST.hex() and auth_rec.cek_fingerprint.startswith("hwid:")
    released = [r for r in records if r.action == "attest_snp" and r.outcome == "allowed"]
    assert (
        len(released) == 1 and released[0].digest == DIGEST.hex() and released[0].actor.startswith("guest:")
    )
    assert {r.action for r in records} >= {"create_snp_id_key", "create_snp_author_key"}


def test_attest_with_the_certificates_in_the_request(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    stub = owner.guest_stub()
    challenge = stub.GetChallenge(
        guest_pb2.GetChallengeRequest(authorization_id=guest.authorized.authorization_id)
    ).challenge
    root = chip.root
    reply = stub.Attest(
        guest.attest_request(
            challenge,
            guest.signed(challenge),
            vek_cert=chip.vcek(),
            ask_cert=root.ask.public_bytes(_der()),
            ark_cert=root.ark.public_bytes(_der()),
        )
    )
    assert _open(guest, reply, challenge).get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("forged_chain", grpc.StatusCode.PERMISSION_DENIED, "forged_chain"),
        ("vlek", grpc.StatusCode.PERMISSION_DENIED, "vlek_not_allowed"),
        ("reported_tcb", grpc.StatusCode.PERMISSION_DENIED, "reported_tcb_too_low"),
        ("committed_tcb", grpc.StatusCode.PERMISSION_DENIED, "committed_tcb_too_low"),
        ("launch_tcb", grpc.StatusCode.PERMISSION_DENIED, "launch_tcb_too_low"),
        ("provisional", grpc.StatusCode.PERMISSION_DENIED, "provisional_firmware"),
        ("vcpus", grpc.StatusCode.PERMISSION_DENIED, "config_not_allowed"),
        ("no_digest", grpc.StatusCode.FAILED_PRECONDITION, "no_digest_for_config"),
        ("debug_policy", grpc.StatusCode.PERMISSION_DENIED, "policy_not_allowed"),
        ("unknown_workload", grpc.StatusCode.NOT_FOUND, "unknown_workload"),
        ("not_snp", grpc.StatusCode.FAILED_PRECONDITION, "no_snp_rules"),
    ],
)
def test_authorize_refusals_are_typed_audited_and_record_nothing(
    make_snp_owner: Any,
    publisher: Publisher,
    chip: Chip,
    other_snp_root: EmulatedSnpRoot,
    case: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    owner.admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=owner_pb2.Workload(
                workload_id="sev-only",
                allowed_policies=[0x3],
                generations=["milan"],
                selectors=[
                    owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV])
                ],
            )
        )
    )
    if case == "launch_tcb":
        # The firmware runs (and would launch at) a TCB below the workload's launch floor.
        floor = owner_pb2.SnpTcbMinimum(product="genoa", launch=HIGH_TCB.raw)
        owner.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=snp_workload(min_tcb=[floor])))
    forged = Chip(other_snp_root, chip.vcek_key)
    requests = {
        "forged_chain": lambda: authorize_request(chip, vek=forged.vcek()),
        "vlek": lambda: authorize_request(chip, vek=chip.vlek(ec.generate_private_key(ec.SECP384R1()))),
        "reported_tcb": lambda: authorize_request(chip, vek=chip.vcek(LOW_TCB)),
        "committed_tcb": lambda: authorize_request(chip, committed_tcb=LOW_TCB.raw, current_tcb=LOW_TCB.raw),
        "launch_tcb": lambda: authorize_request(chip),
        "provisional": lambda: authorize_request(chip, committed_tcb=TCB.raw, current_tcb=HIGH_TCB.raw),
        "vcpus": lambda: authorize_request(chip, config=launch_config(vcpus=3)),
        "no_digest": lambda: authorize_request(chip, config=launch_config(vcpus=4)),
        "debug_policy": lambda: authorize_request(
            chip, config=launch_config(policy=POLICY | PolicyFlag.DEBUG)
        ),
        "unknown_workload": lambda: authorize_request(chip, workload_id="nope"),
        "not_snp": lambda: authorize_request(chip, workload_id="sev-only"),
    }
    before = len(owner.audit())
    err = rpc_error(lambda: owner.stub("launcher").AuthorizeSnpLaunch(requests[case]()))
    assert (err.code, err.reason) == (code, reason), err.message
    refused = owner.audit()[before:]
    assert [(r.action, r.outcome, r.reason) for r in refused] == [("authorize_snp_launch", "refused", reason)]
    assert not owner.admin.ListSnpAuthorizations(owner_pb2.ListSnpAuthorizationsRequest()).authorizations
    metrics = _metrics(owner)
    assert f'sevlaunch_owner_snp_authorizations_total{{outcome="refused",reason="{reason}"}} 1.0' in metrics


def test_authorize_needs_the_launcher_role_and_a_well_formed_request(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    err = rpc_error(lambda: owner.stub("owner-admin").AuthorizeSnpLaunch(authorize_request(chip)))
    assert err.code is grpc.StatusCode.PERMISSION_DENIED and err.reason == "caller_not_authorized"
    bad = authorize_request(chip, vek=b"\x30\x03junk")
    err = rpc_error(lambda: owner.stub("launcher").AuthorizeSnpLaunch(bad))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_platform")
    err = rpc_error(
        lambda: owner.stub("launcher").AuthorizeSnpLaunch(
            authorize_request(chip, config=launch_config(vmm_type="kvm"))
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_launch_config")
    assert not any(r.action == "authorize_snp_launch" for r in owner.audit())


# --------------------------------------------------------------------------------- attestation


def _report_case(
    case: str, guest: Guest, chip: Chip, challenge: bytes, other: EmulatedSnpRoot
) -> guest_pb2.AttestRequest:
    if case == "forged_chain":
        forged = Chip(other, ec.generate_private_key(ec.SECP384R1()))
        report = guest.signed(challenge, key=forged.vcek_key)
        return guest.attest_request(
            challenge,
            report,
            vek_cert=forged.vcek(),
            ask_cert=other.ask.public_bytes(_der()),
            ark_cert=other.ark.public_bytes(_der()),
        )
    if case == "vlek":
        vlek_key = ec.generate_private_key(ec.SECP384R1())
        report = guest.signed(challenge, key=vlek_key, signing_key=SigningKey.VLEK)
        return guest.attest_request(challenge, report, vek_cert=chip.vlek(vlek_key))
    changes: dict[str, Any] = {
        "wrong_product": {"cpuid_mod_id": 0x01},  # a Milan CPU, the launch was authorised on Genoa
        "debug_policy": {"policy": POLICY | PolicyFlag.DEBUG},
        "vmpl": {"vmpl": 1},
        "measurement": {"measurement": b"\x66" * 48},
        "id_key": {"id_key_digest": key_digest(ec.generate_private_key(ec.SECP384R1()))},
        "host_data": {"host_data": hashlib.sha256(b"other init data").digest()},
        "report_data": {"report_data": hashlib.sha512(b"\x00" * 32 + guest.key.public_bytes).digest()},
        "hwid": {"chip_id": bytes(reversed(chip.chip_id))},
    }[case]
    return guest.attest_request(challenge, guest.signed(challenge, **changes))


# Refusals of a report that may not be this launch's own (unsigned by a trusted VEK, another HOST_DATA,
# a stale REPORT_DATA) leave the launch able to attest; a refusal of its own report abandons it.
@pytest.mark.parametrize(
    ("case", "reason", "own"),
    [
        ("forged_chain", "forged_chain", False),
        ("wrong_product", "wrong_product", False),
        # Signed by a VLEK the launch was not authorised with (it was authorised with the chip's VCEK):
        # not provably its own, so it stays open. A report signed by the very VEK the launch was
        # authorised with is its own whatever the rules say now (the test after this one).
        ("vlek", "vlek_not_allowed", False),
        ("hwid", "hwid_mismatch", False),
        ("host_data", "host_data_mismatch", False),
        ("report_data", "report_data_mismatch", False),
        ("debug_policy", "policy_not_allowed", True),
        ("vmpl", "vmpl_not_allowed", True),
        ("measurement", "measurement_mismatch", True),
        ("id_key", "id_key_mismatch", True),
    ],
)
def test_attestation_refusals_release_nothing(
    make_snp_owner: Any,
    publisher: Publisher,
    chip: Chip,
    other_snp_root: EmulatedSnpRoot,
    case: str,
    reason: str,
    own: bool,
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    aid = guest.authorized.authorization_id
    stub = owner.guest_stub()
    challenge = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    before = len(owner.audit())
    err = rpc_error(lambda: stub.Attest(_report_case(case, guest, chip, challenge, other_snp_root)))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason), err.message
    _assert_refused_and_nothing_released(owner, aid, before, reason, REFUSED if own else AUTHORIZED)

    # The challenge is spent by the refused attempt: replaying it is refused on its own account.
    err = rpc_error(lambda: stub.Attest(guest.attest_request(challenge, guest.signed(challenge))))
    expected = "authorization_refused" if own else "challenge_used"
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, expected)
    # The launcher sees where its guest stands.
    seen = owner.stub("launcher").GetSnpAttestation(owner_pb2.GetSnpAttestationRequest(authorization_id=aid))
    assert (seen.authorization.state, seen.authorization.reason) == (
        (REFUSED, reason) if own else (AUTHORIZED, "")
    )
    err = rpc_error(
        lambda: owner.stub("client").GetSnpAttestation(
            owner_pb2.GetSnpAttestationRequest(authorization_id=aid)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong_caller")
    if own:
        err = rpc_error(lambda: stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "authorization_refused")
        return
    # Not its own report: the launch can still attest with a fresh challenge and a good report.
    fresh = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    reply = stub.Attest(guest.attest_request(fresh, guest.signed(fresh)))
    assert _open(guest, reply, fresh).get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"


@pytest.mark.parametrize("signer", ["the authorised vlek", "another vlek"])
def test_a_vlek_launch_whose_workload_stopped_allowing_vleks(
    make_snp_owner: Any, publisher: Publisher, chip: Chip, signer: str
) -> None:
    """A launch authorised with a VLEK (the workload allowed VLEKs then), then the admin stops allowing
    them. Its own report, signed by the very VLEK it was authorised with, is refused and ends the launch
    (REFUSED, the launcher fails at once with the reason) instead of leaving the authorisation open until
    the launcher's RUNNING deadline; before this change such a refusal left it AUTHORIZED, because the
    check "is this report the launch's own" verified the signer under the new rules, which refuse every
    VLEK. A report signed by another VLEK still cannot speak for the launch and leaves it open."""
    owner = make_snp_owner()
    provision_snp(owner, publisher, workload=snp_workload(allow_vlek=True))
    vlek_key = ec.generate_private_key(ec.SECP384R1())
    guest = _authorize(owner, chip, vek=chip.vlek(vlek_key))
    aid = guest.authorized.authorization_id
    owner.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=snp_workload(allow_vlek=False)))
    stub = owner.guest_stub()
    challenge = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    before = len(owner.audit())
    if signer == "the authorised vlek":
        # No certificates sent: the owner uses the VLEK the launch was authorised with.
        request = guest.attest_request(
            challenge, guest.signed(challenge, key=vlek_key, signing_key=SigningKey.VLEK)
        )
    else:
        other_key = ec.generate_private_key(ec.SECP384R1())
        request = guest.attest_request(
            challenge,
            guest.signed(challenge, key=other_key, signing_key=SigningKey.VLEK),
            vek_cert=chip.vlek(other_key),
        )
    err = rpc_error(lambda: stub.Attest(request))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "vlek_not_allowed"), err.message
    own = signer == "the authorised vlek"
    _assert_refused_and_nothing_released(
        owner, aid, before, "vlek_not_allowed", REFUSED if own else AUTHORIZED
    )
    seen = owner.stub("launcher").GetSnpAttestation(owner_pb2.GetSnpAttestationRequest(authorization_id=aid))
    assert (seen.authorization.state, seen.authorization.reason) == (
        (REFUSED, "vlek_not_allowed") if own else (AUTHORIZED, "")
    )


def test_a_launcher_revokes_its_own_authorisation_and_no_other(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    """The launcher that got an authorisation may revoke it (its launch failed before RUNNING: the
    firmware refused it, it was aborted); another launch identity may not (wrong_caller, audited);
    an admin may revoke any. Each decision is in the audit log."""
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    mine = _authorize(owner, chip).authorized.authorization_id
    theirs = Guest(
        chip, owner.stub("client").AuthorizeSnpLaunch(authorize_request(chip))
    ).authorized.authorization_id
    before = len(owner.audit())

    err = rpc_error(
        lambda: owner.stub("launcher").RevokeSnpAuthorization(
            owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=theirs)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong_caller")
    assert owner.authorization_state(theirs) == AUTHORIZED
    owner.stub("launcher").RevokeSnpAuthorization(
        owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=mine)
    )
    assert owner.authorization_state(mine) == owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED
    err = rpc_error(
        lambda: owner.stub("launcher").RevokeSnpAuthorization(
            owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=mine)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_not_open")
    err = rpc_error(
        lambda: owner.stub("launcher").RevokeSnpAuthorization(
            owner_pb2.RevokeSnpAuthorizationRequest(authorization_id="snp-" + "ab" * 16)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_authorization")
    owner.admin.RevokeSnpAuthorization(owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=theirs))
    assert owner.authorization_state(theirs) == owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED
    records = [
        (r.actor, r.action, r.outcome, r.reason, r.session_id, r.detail) for r in owner.audit()[before:]
    ]
    assert records == [
        ("launcher", "revoke_snp_authorization", "refused", "wrong_caller", theirs,
         "the launch was authorised for another caller"),
        ("launcher", "revoke_snp_authorization", "allowed", "", mine, "by the identity it was granted to"),
        ("owner-admin", "revoke_snp_authorization", "allowed", "", theirs, ""),
    ]  # fmt: skip
    # The guest of the revoked launch can no longer attest.
    err = rpc_error(
        lambda: owner.guest_stub().GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=mine))
    )
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION and err.reason == "authorization_revoked"


@pytest.mark.parametrize("kind", ["reported", "committed", "launch"])
def test_each_tcb_floor_raised_after_authorisation_refuses_the_report(
    make_snp_owner: Any, publisher: Publisher, chip: Chip, kind: str
) -> None:
    """The workload's rules as they are at attestation: an admin who raised a floor (a TCB CVE) after
    the launch was authorised refuses its report, naming the TCB."""
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    floor = owner_pb2.SnpTcbMinimum(product="genoa", **{kind: HIGH_TCB.raw})
    owner.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=snp_workload(min_tcb=[floor])))
    aid = guest.authorized.authorization_id
    stub = owner.guest_stub()
    challenge = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    before = len(owner.audit())
    err = rpc_error(lambda: stub.Attest(guest.attest_request(challenge, guest.signed(challenge))))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, f"{kind}_tcb_too_low")
    assert f"{kind}_tcb: snp 23<24" in err.message
    _assert_refused_and_nothing_released(owner, aid, before, f"{kind}_tcb_too_low", REFUSED)


def test_a_second_release_is_refused_even_when_racing(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    aid = guest.authorized.authorization_id
    stub = owner.guest_stub()
    challenges = [
        stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge for _ in range(4)
    ]
    requests = [guest.attest_request(c, guest.signed(c)) for c in challenges]

    def attest(request: guest_pb2.AttestRequest) -> Any:
        try:
            return stub.Attest(request)
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attest, requests))
    won = [r for r in results if isinstance(r, guest_pb2.AttestResponse)]
    lost = [r for r in results if not isinstance(r, guest_pb2.AttestResponse)]
    assert len(won) == 1 and len(lost) == 3
    assert {(e.code(), _reason(e)) for e in lost} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "already_released")
    }
    records = [r for r in owner.audit() if r.action == "attest_snp"]
    assert [r.outcome for r in records].count("allowed") == 1
    assert {r.reason for r in records if r.outcome == "refused"} == {"already_released"}
    assert 'sevlaunch_owner_snp_attestations_total{outcome="allowed",reason=""} 1.0' in _metrics(owner)


def test_unknown_and_expired_challenges(make_snp_owner: Any, publisher: Publisher, chip: Chip) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    stub = owner.guest_stub()
    made_up = b"\x07" * 32
    err = rpc_error(lambda: stub.Attest(guest.attest_request(made_up, guest.signed(made_up))))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_challenge")
    err = rpc_error(
        lambda: stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id="snp-" + "0" * 32))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_authorization")
    err = rpc_error(lambda: stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id="../etc")))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_authorization_id")
    # A short report is refused before anything is looked up or spent.
    c = stub.GetChallenge(
        guest_pb2.GetChallengeRequest(authorization_id=guest.authorized.authorization_id)
    ).challenge
    err = rpc_error(lambda: stub.Attest(guest.attest_request(c, b"\x00" * 100)))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_report")
    stub.Attest(guest.attest_request(c, guest.signed(c)))  # the challenge was not spent


def _reason(err: grpc.RpcError) -> str:
    from sevlaunch.rpc import error_info

    return error_info(err).reason


def _metrics(owner: SnpOwner) -> str:
    import urllib.request

    with urllib.request.urlopen(owner.running.metrics_url, timeout=5) as reply:
        return str(reply.read().decode())


def _assert_refused_and_nothing_released(
    owner: SnpOwner, aid: str, before: int, reason: str, state: int
) -> None:
    new = owner.audit()[before:]
    assert [(r.action, r.outcome, r.reason, r.session_id) for r in new] == [
        ("attest_snp", "refused", reason, aid)
    ]
    assert owner.authorization_state(aid) == state
    metrics = _metrics(owner)
    assert f'sevlaunch_owner_snp_attestations_total{{outcome="refused",reason="{reason}"}} 1.0' in metrics
    assert 'sevlaunch_owner_snp_attestations_total{outcome="allowed"' not in metrics


# ------------------------------------------------------------------------------- the guest port


def test_the_guest_port_serves_only_the_guest_service_without_client_certificates(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    channel = owner.guest_channel()  # no client certificate at all
    # An admin RPC on the guest port: not there.
    admin_there = owner_pb2_grpc.OwnerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        admin_there.GetAuditLog(owner_pb2.GetAuditLogRequest())
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as info:
        admin_there.AuthorizeSnpLaunch(authorize_request(chip))
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # The health service answers there, and the guest service works, all without a client certificate.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    guest = _authorize(owner, chip)
    request = guest_pb2.GetChallengeRequest(authorization_id=guest.authorized.authorization_id)
    assert len(owner.guest_stub().GetChallenge(request).challenge) == 32
    # A client trusting another CA does not get through (the guest checks the owner's certificate).
    foreign = guest_pb2_grpc.OwnerGuestStub(owner.guest_channel(ca=_foreign_ca()))
    with pytest.raises(grpc.RpcError) as info:
        foreign.GetChallenge(request, timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def _foreign_ca() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_the_guest_port_is_rate_limited_per_peer(
    make_snp_owner: Any, publisher: Publisher, chip: Chip
) -> None:
    owner = make_snp_owner(guest_peer_rate=0.01, guest_peer_burst=3)
    provision_snp(owner, publisher)
    stub = owner.guest_stub()
    request = guest_pb2.GetChallengeRequest(authorization_id="snp-" + "1" * 32)
    codes = []
    for _ in range(5):
        try:
            stub.GetChallenge(request)
        except grpc.RpcError as err:
            codes.append((err.code(), _reason(err)))
    assert codes[:3] == [(grpc.StatusCode.NOT_FOUND, "unknown_authorization")] * 3
    assert codes[3:] == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")] * 2
    assert 'sevlaunch_owner_guest_rate_limited_total{scope="peer"} 2.0' in _metrics(owner)


def test_rules_round_trip_and_reject_debug_without_the_flag(make_snp_owner: Any) -> None:
    owner = make_snp_owner()
    admin = owner.admin
    admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=snp_workload()))
    got = admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id="snp-web")).workload
    assert got.snp == snp_rules(vmm_types=["QEMU"])
    for bad in (
        snp_workload(policies=[POLICY | PolicyFlag.DEBUG]),
        snp_workload(policies=[POLICY | PolicyFlag.MIGRATE_MA]),
        snp_workload(products=[]),
        snp_workload(guest_features=[2]),
        snp_workload(min_tcb=[owner_pb2.SnpTcbMinimum(product="milan", reported=TCB.raw)]),
    ):
        err = rpc_error(lambda bad=bad: admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=bad)))
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT, bad
    admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=snp_workload(policies=[POLICY | PolicyFlag.DEBUG], allow_debug=True)
        )
    )


def test_vcpu_counts_each_with_its_digest(make_snp_owner: Any, publisher: Publisher, chip: Chip) -> None:
    """Several reference digests valid at once, one per vCPU count: the authorised count's is used."""
    from snp_support import snp_manifest_envelope

    owner = make_snp_owner()
    provision_snp(owner, publisher)
    other = bytes.fromhex("77" * 48)
    owner.admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(
            envelope=snp_manifest_envelope(publisher, digest=other, vcpus=(1,))
        )
    )
    one = _authorize(owner, chip, config=launch_config(vcpus=1))
    two = _authorize(owner, chip)
    assert one.authorized.launch_digest == other and two.authorized.launch_digest == DIGEST
    assert VCPUS == 2
    # A manifest naming its image's SHA-256 is used only for a launch of that image.
    image = "ab" * 32
    pinned = bytes.fromhex("88" * 48)
    owner.admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(
            envelope=snp_manifest_envelope(publisher, digest=pinned, vcpus=(4,), firmware_sha256=image)
        )
    )
    four = _authorize(owner, chip, config=launch_config(vcpus=4, firmware_sha256=image))
    assert four.authorized.launch_digest == pinned
    err = rpc_error(
        lambda: owner.stub("launcher").AuthorizeSnpLaunch(
            authorize_request(chip, config=launch_config(vcpus=4, firmware_sha256="cd" * 32))
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_digest_for_config")


def test_no_secret_or_private_key_bytes_in_any_file_log_metric_or_audit_record(
    make_snp_owner: Any, publisher: Publisher, chip: Chip, caplog: pytest.LogCaptureFixture
) -> None:
    import base64
    import logging

    from cryptography.hazmat.primitives import serialization

    id_key = ec.generate_private_key(ec.SECP384R1())
    pem = id_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = id_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    scalar = id_key.private_numbers().private_value.to_bytes(48, "big")
    with caplog.at_level(logging.DEBUG):
        owner = make_snp_owner()
        provision_snp(owner, publisher)
        rotated = owner.admin.RotateSnpKey(
            owner_pb2.RotateSnpKeyRequest(
                workload_id="snp-web", kind=owner_pb2.SNP_KEY_KIND_ID, private_key_pem=pem
            )
        ).key
        assert rotated.version == 1 and rotated.source == "imported"
        assert rotated.public_digest == key_digest(id_key).hex()
        guest = _authorize(owner, chip)
        assert guest.id_auth.id_key_digest == key_digest(id_key)
        stub = owner.guest_stub()
        c = stub.GetChallenge(
            guest_pb2.GetChallengeRequest(authorization_id=guest.authorized.authorization_id)
        ).challenge
        reply = stub.Attest(guest.attest_request(c, guest.signed(c)))
        assert _open(guest, reply, c).get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"
        # A refused one too (its detail must not leak either).
        err = rpc_error(
            lambda: stub.GetChallenge(
                guest_pb2.GetChallengeRequest(authorization_id=guest.authorized.authorization_id)
            )
        )
        assert err.reason == "already_released"
        audit = b"\n".join(r.SerializeToString() for r in owner.audit())
        metrics = _metrics(owner).encode()
    base = owner.config.kek_file.parent
    files = b"".join(p.read_bytes() for p in base.iterdir() if p.is_file() and p.name != "kek")
    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode()
    kek = owner.config.kek_file.read_bytes()
    for where, blob in (("files", files), ("logs", logs), ("metrics", metrics), ("audit", audit)):
        for needle in (PASSPHRASE, EXTRA_SECRET, der, scalar, pem, kek):
            for form in (needle, needle.hex().encode(), base64.b64encode(needle)):
                assert form not in blob and form.lower() not in blob.lower(), f"{where} holds secret bytes"
    assert b"PRIVATE KEY" not in files + logs + audit


def test_guest_port_configuration_errors_stop_the_start(tls_dir: Any, tmp_path: Any) -> None:
    import asyncio

    from owner_svc.server import ConfigError, OwnerConfig, build_app

    base = dict(tls_dir=tls_dir, db=tmp_path / "o.db", kek_file=tmp_path / "kek", create_kek=True)
    with pytest.raises(ConfigError, match="--guest-tls-cert"):
        build_app(OwnerConfig(**base, guest_listen="localhost:0"))
    with pytest.raises(ConfigError, match="need --guest-listen"):
        build_app(OwnerConfig(**base, guest_endpoint="https://owner.example:50054"))
    guest_tls = dict(guest_tls_cert=tls_dir / "owner.pem", guest_tls_key=tls_dir / "owner.key")
    with pytest.raises(ConfigError, match=r"not a CA|basicConstraints"):
        # The server certificate is no CA: guests could not check the owner against it.
        build_app(
            OwnerConfig(**base, guest_listen="localhost:0", guest_tls_ca=tls_dir / "owner.pem", **guest_tls)
        )

    async def wildcard_without_endpoint() -> None:
        # Built inside a loop, as the server does (grpc.aio servers belong to one).
        app = build_app(
            OwnerConfig(**base, guest_listen="0.0.0.0:0", guest_tls_ca=tls_dir / "ca.pem", **guest_tls)
        )
        try:
            with pytest.raises(ConfigError, match="--guest-endpoint"):
                await app.start_guest()
            assert app.guest is not None and app.guest.port == 0 and app.core.snp is None
        finally:
            app.store.close()

    asyncio.run(wildcard_without_endpoint())


def test_a_revoked_authorisation_cannot_attest(make_snp_owner: Any, publisher: Publisher, chip: Chip) -> None:
    owner = make_snp_owner()
    provision_snp(owner, publisher)
    guest = _authorize(owner, chip)
    aid = guest.authorized.authorization_id
    stub = owner.guest_stub()
    challenge = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    owner.admin.RevokeSnpAuthorization(owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=aid))
    err = rpc_error(lambda: stub.Attest(guest.attest_request(challenge, guest.signed(challenge))))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "authorization_revoked")
    assert owner.authorization_state(aid) == owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED
    err = rpc_error(
        lambda: owner.admin.RevokeSnpAuthorization(
            owner_pb2.RevokeSnpAuthorizationRequest(authorization_id=aid)
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_not_open")
    actions = [(r.action, r.outcome, r.reason) for r in owner.audit() if r.session_id == aid]
    assert actions[-2:] == [
        ("revoke_snp_authorization", "allowed", ""),
        ("attest_snp", "refused", "authorization_revoked"),
    ]
