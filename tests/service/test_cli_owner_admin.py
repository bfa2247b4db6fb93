"""`sevlaunch owner workload list|delete`, `owner secret delete` and `owner refvalues revoke` against the
three services running for real (the demo environment), their `--json` parsed and checked field by field
against what the owner answers directly; refusals exit 1 naming what to change; each decision is in the
owner's audit log."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from sevlaunch.cli import main
from sevlaunch.demo.env import DEFAULT_FIRMWARE, EMULATED_ROOT, GUEST_POLICY, WORKLOAD_ID, DemoEnvironment
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc, platform_pb2

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
SECOND = "second-workload"
DISK_GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"


@pytest.fixture(scope="module")
def env() -> Iterator[DemoEnvironment]:
    with DemoEnvironment() as demo:
        demo.prepare()
        demo.start()
        demo.configure_owner()
        yield demo


def _conn(env: DemoEnvironment) -> list[str]:
    return ["--endpoint", env.services["owner"].address, "--tls-dir", str(env.tls_dir)]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return json.loads(out)


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("sevlaunch: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def _put_second(env: DemoEnvironment, *, secret: bool = False) -> None:
    env.owner_admin().PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=owner_pb2.Workload(
                workload_id=SECOND,
                allowed_policies=[GUEST_POLICY],
                generations=[EMULATED_ROOT],
                selectors=[
                    owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV])
                ],
            )
        ),
        timeout=30,
    )
    if secret:
        env.owner_admin().PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id=SECOND, entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"x\x00")]
            ),
            timeout=30,
        )


def _open_session(env: DemoEnvironment, workload: str) -> str:
    """OpenSession as the `client` identity, with the emulated platform's real chain."""
    chain = env.platform().GetCertificateChain(platform_pb2.GetCertificateChainRequest(), timeout=30)
    owner = owner_pb2_grpc.OwnerServiceStub(env.channel("owner", "client"))
    opened = owner.OpenSession(
        owner_pb2.OpenSessionRequest(
            workload_id=workload,
            chain=common_pb2.CertificateChain.FromString(chain.platform.chain.SerializeToString()),
            policy=GUEST_POLICY,
        ),
        timeout=30,
    )
    return str(opened.session_id)


def _audit_after(env: DemoEnvironment, seq: int) -> list[owner_pb2.AuditRecord]:
    reply = env.owner_admin().GetAuditLog(owner_pb2.GetAuditLogRequest(after_seq=seq), timeout=30)
    return list(reply.records)


def _head(env: DemoEnvironment) -> int:
    records = _audit_after(env, 0)
    return int(records[-1].seq) if records else 0


def test_workload_list_json_matches_the_owner(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    _put_second(env)
    direct = env.owner_admin().ListWorkloads(owner_pb2.ListWorkloadsRequest(), timeout=30).workloads
    listed = _json(capsys, ["owner", "workload", "list", *_conn(env), "--json"])
    assert list(listed) == ["workloads"]
    assert [w["workload_id"] for w in listed["workloads"]] == sorted([WORKLOAD_ID, SECOND])
    assert len(listed["workloads"]) == len(direct)
    for got, want in zip(listed["workloads"], direct, strict=True):
        assert set(got) == {"workload_id", "has_secret", "open_sessions", "updated_at"}
        assert got["workload_id"] == want.workload_id
        assert got["has_secret"] is want.has_secret
        assert got["open_sessions"] == want.open_sessions == 0
        assert re.match(RFC3339, got["updated_at"])
        when = datetime.datetime.fromtimestamp(want.updated_at_unix, datetime.UTC)
        assert got["updated_at"] == when.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    by_id = {w["workload_id"]: w for w in listed["workloads"]}
    assert by_id[WORKLOAD_ID]["has_secret"] is True and by_id[SECOND]["has_secret"] is False
    # Paging: --limit, --after; the text form is a table.
    first = _json(capsys, ["owner", "workload", "list", *_conn(env), "--json", "--limit", "1"])
    assert [w["workload_id"] for w in first["workloads"]] == [min(WORKLOAD_ID, SECOND)]
    rest = _json(
        capsys, ["owner", "workload", "list", *_conn(env), "--json", "--after", min(WORKLOAD_ID, SECOND)]
    )
    assert [w["workload_id"] for w in rest["workloads"]] == [max(WORKLOAD_ID, SECOND)]
    assert main(["owner", "workload", "list", *_conn(env)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["WORKLOAD_ID", "HAS_SECRET", "OPEN_SESSIONS", "UPDATED_AT"]
    assert {line.split()[0] for line in text[1:]} == {WORKLOAD_ID, SECOND}


def test_delete_refused_while_a_session_is_open_then_forced(
    env: DemoEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    _put_second(env, secret=True)
    session = _open_session(env, SECOND)
    listed = _json(capsys, ["owner", "workload", "list", *_conn(env), "--json", "--after", WORKLOAD_ID])
    assert {w["workload_id"]: w["open_sessions"] for w in listed["workloads"]}[SECOND] == 1
    seq = _head(env)

    err = _fails(capsys, ["owner", "workload", "delete", *_conn(env), "--workload-id", SECOND])
    assert "FAILED_PRECONDITION" in err and "(workload_in_use; open_sessions=1" in err
    assert session in err and "set force" in err
    [refused] = _audit_after(env, seq)
    assert (refused.action, refused.outcome, refused.reason, refused.workload_id, refused.actor) == (
        "delete_workload", "refused", "workload_in_use", SECOND, "owner-admin"
    )  # fmt: skip

    deleted = _json(
        capsys, ["owner", "workload", "delete", *_conn(env), "--workload-id", SECOND, "--force", "--json"]
    )
    assert deleted == {
        "workload_id": SECOND,
        "had_secret": True,
        "revoked_sessions": [session],
        "revoked_snp_authorizations": [],
    }
    records = _audit_after(env, refused.seq)
    assert [(r.action, r.outcome, r.session_id, r.workload_id) for r in records] == [
        ("revoke_session", "allowed", session, SECOND),
        ("delete_workload", "allowed", "", SECOND),
    ]
    # The session is revoked; a release for it is refused; the workload is gone.
    sessions = env.owner_admin().ListSessions(owner_pb2.ListSessionsRequest(workload_id=SECOND), timeout=30)
    assert [(s.session_id, s.state) for s in sessions.sessions] == [
        (session, owner_pb2.OWNER_SESSION_STATE_REVOKED)
    ]
    with pytest.raises(grpc.RpcError) as exc:
        env.owner_admin().GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=SECOND), timeout=30)
    assert error_info(exc.value).reason == "unknown_workload"
    err = _fails(capsys, ["owner", "workload", "delete", *_conn(env), "--workload-id", SECOND])
    assert "NOT_FOUND" in err and "(unknown_workload;" in err
    assert _audit_after(env, records[-1].seq)[0].reason == "unknown_workload"


def test_secret_delete_keeps_the_workload(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        env.owner_admin()
        .GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=WORKLOAD_ID), timeout=30)
        .has_secret
    )
    seq = _head(env)
    deleted = _json(
        capsys, ["owner", "secret", "delete", *_conn(env), "--workload-id", WORKLOAD_ID, "--json"]
    )
    assert deleted == {"workload_id": WORKLOAD_ID, "revoked_sessions": [], "revoked_snp_authorizations": []}
    summary = env.owner_admin().GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=WORKLOAD_ID), timeout=30)
    assert summary.workload.workload_id == WORKLOAD_ID and not summary.has_secret
    [record] = _audit_after(env, seq)
    assert (record.action, record.outcome, record.workload_id) == ("delete_secret", "allowed", WORKLOAD_ID)
    err = _fails(capsys, ["owner", "secret", "delete", *_conn(env), "--workload-id", WORKLOAD_ID])
    assert "NOT_FOUND" in err and "(no_secret;" in err
    # The text form, after putting a secret back.
    env.owner_admin().PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id=WORKLOAD_ID,
            entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"x\x00")],
        ),
        timeout=30,
    )
    assert main(["owner", "secret", "delete", *_conn(env), "--workload-id", WORKLOAD_ID]) == 0
    assert capsys.readouterr().out == f"secret of workload {WORKLOAD_ID} deleted\n"


def test_refvalues_revoke(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    admin = env.owner_admin()
    mid = env.manifest_id
    assert [
        m.manifest_id for m in admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    ] == [mid]
    seq = _head(env)
    # Malformed and unknown ids: refused, nothing revoked.
    err = _fails(capsys, ["owner", "refvalues", "revoke", *_conn(env), "not-an-id"])
    assert "INVALID_ARGUMENT" in err and "(bad_manifest_id;" in err and "64 lower-case hex" in err
    err = _fails(capsys, ["owner", "refvalues", "revoke", *_conn(env), mid, "d" * 64])
    assert "NOT_FOUND" in err and "(unknown_manifest;" in err and "d" * 64 in err and "nothing revoked" in err
    [refused] = _audit_after(env, seq)  # the malformed call wrote nothing, the unknown id is audited
    assert (refused.action, refused.outcome, refused.reason) == (
        "revoke_reference_values",
        "refused",
        "unknown_manifest",
    )
    assert [
        m.manifest_id for m in admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    ]

    revoked = _json(capsys, ["owner", "refvalues", "revoke", *_conn(env), mid.upper(), "--json"])
    assert revoked == {"revoked": [mid], "already_revoked": []}
    assert list(admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests) == []
    summary = admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=WORKLOAD_ID), timeout=30)
    assert summary.accepted_digests_sev == 0
    [record] = _audit_after(env, refused.seq)
    assert (record.action, record.outcome, record.actor) == (
        "revoke_reference_values",
        "allowed",
        "owner-admin",
    )
    assert mid in record.detail

    again = _json(capsys, ["owner", "refvalues", "revoke", *_conn(env), mid, "--json"])
    assert again == {"revoked": [], "already_revoked": [mid]}
    # Never importable again.
    with pytest.raises(grpc.RpcError) as exc:
        admin.ImportReferenceValues(
            owner_pb2.ImportReferenceValuesRequest(envelope=env.manifest_path.read_bytes()), timeout=30
        )
    assert error_info(exc.value).reason == "revoked"


def test_admin_actions_need_owner_admin(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["owner", "workload", "list"],
        ["owner", "workload", "delete", "--workload-id", WORKLOAD_ID],
        ["owner", "secret", "delete", "--workload-id", WORKLOAD_ID],
        ["owner", "refvalues", "revoke", "a" * 64],
    ):
        err = _fails(capsys, [*argv, *_conn(env), "--identity", "client"])
        assert "caller_not_authorized" in err and "--identity owner-admin" in err
    with pytest.raises(SystemExit) as exc:
        main(["owner", "workload", "delete", *_conn(env)])  # --workload-id missing
    assert exc.value.code == 2
