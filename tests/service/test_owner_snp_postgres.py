"""The owner's SEV-SNP tables on a real PostgreSQL server (pg_fixture.py): the whole flow through the
servers, the once-only release between two replicas sharing the database, and key rotation."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from owner_support import DISK_GUID, PASSPHRASE, Publisher, rpc_error
from snp_support import Chip, Guest, authorize_request, provision_snp

from sevlaunch.rpc.v1 import guest_pb2, owner_pb2
from sevlaunch.sev.secret import SecretTable
from sevlaunch.snp.idblock import IdBlock
from sevlaunch.snp.secret_wrap import WrappedSecret, open_secret

pytest_plugins = ["owner_support", "snp_support", "pg_fixture"]


def test_snp_launch_on_postgres_two_replicas_release_once(
    make_snp_owner: Any, publisher: Publisher, chip: Chip, pg_dsn: str
) -> None:
    one = make_snp_owner(db=pg_dsn, subdir="one")
    provision_snp(one, publisher)
    # The second replica shares the database and the KEK (as replicas do: the KEK from one Secret).
    (tmp := one.config.kek_file.parent.parent / "two").mkdir()
    (tmp / "kek").write_bytes(one.config.kek_file.read_bytes())
    (tmp / "kek").chmod(0o600)
    two = make_snp_owner(db=pg_dsn, subdir="two")

    guest = Guest(chip, one.stub("launcher").AuthorizeSnpLaunch(authorize_request(chip)))
    aid = guest.authorized.authorization_id
    # A replica that did not authorise it issues challenges for it and sees its keys.
    c1 = two.guest_stub().GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    c2 = one.guest_stub().GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
    reply = two.guest_stub().Attest(guest.attest_request(c1, guest.signed(c1)))
    plain = open_secret(
        WrappedSecret(reply.hpke_enc, reply.ciphertext), guest.key, authorization_id=aid, challenge=c1
    )
    assert SecretTable.from_bytes(plain).get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"
    err = rpc_error(lambda: one.guest_stub().Attest(guest.attest_request(c2, guest.signed(c2))))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "already_released")
    # The replayed challenge, on either replica.
    err = rpc_error(lambda: one.guest_stub().Attest(guest.attest_request(c1, guest.signed(c1))))
    assert err.reason in {"already_released", "challenge_used"}
    records = [r for r in one.audit() if r.action == "attest_snp"]
    assert [r.outcome for r in records].count("allowed") == 1


def test_snp_key_rotation_on_postgres_keeps_launches_signed_before(
    make_snp_owner: Any, publisher: Publisher, chip: Chip, pg_dsn: str
) -> None:
    owner = make_snp_owner(db=pg_dsn)
    provision_snp(owner, publisher)
    before = Guest(chip, owner.stub("launcher").AuthorizeSnpLaunch(authorize_request(chip)))
    rotated = owner.admin.RotateSnpKey(
        owner_pb2.RotateSnpKeyRequest(workload_id="snp-web", kind=owner_pb2.SNP_KEY_KIND_ID)
    ).key
    assert rotated.version == 2 and rotated.source == "generated"
    after = Guest(chip, owner.stub("launcher").AuthorizeSnpLaunch(authorize_request(chip)))
    assert after.id_auth.id_key_digest.hex() == rotated.public_digest != before.id_auth.id_key_digest.hex()
    after.id_auth.verify(IdBlock.from_bytes(after.authorized.id_block))
    keys = owner.admin.ListSnpKeys(owner_pb2.ListSnpKeysRequest(workload_id="snp-web")).keys
    ids = sorted((k.version, bool(k.retired_at_unix)) for k in keys if k.kind == owner_pb2.SNP_KEY_KIND_ID)
    assert ids == [(1, True), (2, False)]
    # The launch authorised with the retired key still attests.
    stub = owner.guest_stub()
    for guest in (before, after):
        aid = guest.authorized.authorization_id
        c = stub.GetChallenge(guest_pb2.GetChallengeRequest(authorization_id=aid)).challenge
        assert stub.Attest(guest.attest_request(c, guest.signed(c))).ciphertext
