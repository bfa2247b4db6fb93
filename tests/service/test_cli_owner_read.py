"""`sevlaunch owner workload get`, `owner refvalues import|list`, `owner sessions` and `owner audit show`
against the three services running for real (the demo environment): people's output by default, `--json`
in docs/CLI.md's one style, parsed and checked field by field against what the owner answers directly;
`audit show --json-lines` prints the same records a line each."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from sevlaunch.cli import main
from sevlaunch.demo.env import DEFAULT_FIRMWARE, EMULATED_ROOT, GUEST_POLICY, WORKLOAD_ID, DemoEnvironment
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc, platform_pb2

pytestmark = pytest.mark.skipif(not DEFAULT_FIRMWARE.is_file(), reason="needs Debian's ovmf package")

RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


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
    assert out.count("\n") == 1, out  # one compact JSON document
    return json.loads(out)


def _text(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert not out.lstrip().startswith(("{", "[")), out  # for people, not JSON
    return out


def _when(unix: float) -> str:
    """The RFC 3339 form docs/CLI.md gives a time, computed here independently of the CLI's code."""
    when = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def test_workload_get(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    direct = env.owner_admin().GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=WORKLOAD_ID), timeout=30)
    got = _json(capsys, ["owner", "workload", "get", *_conn(env), "--workload-id", WORKLOAD_ID, "--json"])
    assert set(got) == {"workload", "has_secret", "accepted_digests_sev", "accepted_digests_sev_es"}
    assert got["has_secret"] is True is direct.has_secret
    assert got["accepted_digests_sev"] == direct.accepted_digests_sev >= 1
    assert got["accepted_digests_sev_es"] == direct.accepted_digests_sev_es
    workload = got["workload"]
    assert set(workload) == {f.name for f in owner_pb2.Workload.DESCRIPTOR.fields}
    assert workload["workload_id"] == WORKLOAD_ID
    assert workload["allowed_policies"] == [GUEST_POLICY] and isinstance(workload["allowed_policies"][0], int)
    assert workload["generations"] == [EMULATED_ROOT]
    [selector] = workload["selectors"]
    assert selector["firmware_name"] == "OVMF" and selector["modes"] == ["SEV"]
    # The owner stores the safe default explicitly; the enum prints without its prefix.
    assert direct.workload.selectors[0].kernel_hashes == owner_pb2.KERNEL_HASHES_FORBIDDEN
    assert selector["kernel_hashes"] == "FORBIDDEN"
    assert workload["allow_launch_without_secret"] is False
    # For people: `key: value` lines.
    text = _text(capsys, ["owner", "workload", "get", *_conn(env), "--workload-id", WORKLOAD_ID])
    assert re.search(r"^has_secret: +True$", text, re.M) and re.search(
        rf"^  workload_id: +{WORKLOAD_ID}$", text, re.M
    )


def _manifest_checks(got: dict[str, Any], want: owner_pb2.ManifestSummary) -> None:
    assert set(got) == {
        "manifest_id", "publisher", "firmware_name", "firmware_version", "not_before", "not_after",
        "digests", "keyid",
    }  # fmt: skip
    assert (got["manifest_id"], got["publisher"], got["keyid"]) == (
        want.manifest_id,
        want.publisher,
        want.keyid,
    )
    assert (got["firmware_name"], got["firmware_version"]) == (want.firmware_name, want.firmware_version)
    assert got["digests"] == want.digests and isinstance(got["digests"], int) and got["digests"] >= 1
    for key in ("not_before", "not_after"):
        unix = getattr(want, f"{key}_unix")
        assert got[key] == (_when(unix) if unix else None)
        assert got[key] is None or re.match(RFC3339, got[key])


def test_refvalues_list_and_import(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    direct = env.owner_admin().ListReferenceValues(owner_pb2.ListReferenceValuesRequest(), timeout=30)
    listed = _json(capsys, ["owner", "refvalues", "list", *_conn(env), "--json"])
    assert list(listed) == ["manifests"] and len(listed["manifests"]) == len(direct.manifests) == 1
    _manifest_checks(listed["manifests"][0], direct.manifests[0])
    assert listed["manifests"][0]["manifest_id"] == env.manifest_id
    text = _text(capsys, ["owner", "refvalues", "list", *_conn(env)]).splitlines()
    assert text[0].split()[:3] == ["MANIFEST_ID", "FIRMWARE_NAME", "FIRMWARE_VERSION"]
    assert text[1].split()[0] == env.manifest_id

    # Importing it again: known already, the same summary.
    imported = _json(capsys, ["owner", "refvalues", "import", *_conn(env), str(env.manifest_path), "--json"])
    assert set(imported) == {"manifest_id", "newly_imported", "manifest"}
    assert imported["manifest_id"] == env.manifest_id and imported["newly_imported"] is False
    _manifest_checks(imported["manifest"], direct.manifests[0])
    text = _text(capsys, ["owner", "refvalues", "import", *_conn(env), str(env.manifest_path)])
    assert text.startswith(f"manifest {env.manifest_id} already imported\n")


def test_sessions(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    chain = env.platform().GetCertificateChain(platform_pb2.GetCertificateChainRequest(), timeout=30)
    owner = owner_pb2_grpc.OwnerServiceStub(env.channel("owner", "client"))
    opened = owner.OpenSession(
        owner_pb2.OpenSessionRequest(
            workload_id=WORKLOAD_ID,
            chain=common_pb2.CertificateChain.FromString(chain.platform.chain.SerializeToString()),
            policy=GUEST_POLICY,
        ),
        timeout=30,
    )
    direct = env.owner_admin().ListSessions(
        owner_pb2.ListSessionsRequest(workload_id=WORKLOAD_ID), timeout=30
    )
    want = next(s for s in direct.sessions if s.session_id == opened.session_id)
    listed = _json(capsys, ["owner", "sessions", *_conn(env), "--workload-id", WORKLOAD_ID, "--json"])
    assert list(listed) == ["sessions"] and len(listed["sessions"]) == len(direct.sessions)
    got = next(s for s in listed["sessions"] if s["session_id"] == opened.session_id)
    assert got == {
        "session_id": want.session_id,
        "workload_id": WORKLOAD_ID,
        "caller": "client",
        "policy": GUEST_POLICY,
        "generation": want.generation,
        "cek_fingerprint": want.cek_fingerprint,
        "state": "OPEN",
        "created_at": _when(want.created_at_unix),
        "expires_at": _when(want.expires_at_unix),
        "matched_digest": "",
        "reason": "",
    }
    assert want.generation == EMULATED_ROOT and re.fullmatch(r"[0-9a-f]{64}", got["cek_fingerprint"])
    assert got["created_at"] < got["expires_at"]
    limited = _json(capsys, ["owner", "sessions", *_conn(env), "--limit", "1", "--json"])
    assert len(limited["sessions"]) == 1
    text = _text(capsys, ["owner", "sessions", *_conn(env), "--workload-id", WORKLOAD_ID]).splitlines()
    assert text[0].split() == [
        "SESSION_ID",
        "WORKLOAD_ID",
        "STATE",
        "CREATED_AT",
        "EXPIRES_AT",
        "CALLER",
        "REASON",
    ]
    assert any(line.split()[:3] == [opened.session_id, WORKLOAD_ID, "OPEN"] for line in text[1:])
    env.owner_admin().RevokeSession(owner_pb2.RevokeSessionRequest(session_id=opened.session_id), timeout=30)
    # A launcher-side identity is not an admin: exit 1, nothing on stdout.
    assert main(["owner", "sessions", *_conn(env), "--identity", "client", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "caller_not_authorized" in captured.err


def test_audit_show(env: DemoEnvironment, capsys: pytest.CaptureFixture[str]) -> None:
    direct = list(env.owner_admin().GetAuditLog(owner_pb2.GetAuditLogRequest(), timeout=30).records)
    assert len(direct) >= 3  # import, workload, secret at least
    shown = _json(capsys, ["owner", "audit", "show", *_conn(env), "--json"])
    assert list(shown) == ["records"]
    records = shown["records"][: len(direct)]  # other tests in this module may have appended since
    assert len(records) == len(direct)
    for got, want in zip(records, direct, strict=True):
        assert set(got) == {
            "seq", "time", "actor", "action", "outcome", "workload_id", "session_id", "cek_fingerprint",
            "reason", "digest", "detail", "prev_hash", "hash", "launch_id",
        }  # fmt: skip
        assert got["seq"] == want.seq and isinstance(got["seq"], int)
        assert got["time"] == _when(want.time_unix) and re.match(RFC3339, got["time"])
        for key in ("actor", "action", "outcome", "workload_id", "session_id", "cek_fingerprint", "reason"):
            assert got[key] == getattr(want, key), key
        for key in ("digest", "detail", "prev_hash", "hash", "launch_id"):
            assert got[key] == getattr(want, key), key
    assert [r["action"] for r in records[:3]] == ["import_reference_values", "put_workload", "put_secret"]
    assert records[0]["prev_hash"] == "0" * 64 and records[1]["prev_hash"] == records[0]["hash"]

    # --json-lines: the same objects, one a line; --after and --limit page as for --json.
    assert main(["owner", "audit", "show", *_conn(env), "--json-lines", "--after", "1", "--limit", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == shown["records"][1:3]
    # For people: a table.
    text = _text(capsys, ["owner", "audit", "show", *_conn(env), "--limit", "3"]).splitlines()
    assert text[0].split()[:5] == ["SEQ", "TIME", "ACTOR", "ACTION", "OUTCOME"]
    assert [line.split()[3] for line in text[1:]] == ["import_reference_values", "put_workload", "put_secret"]
    # --json and --json-lines together are a usage error.
    with pytest.raises(SystemExit) as exc:
        main(["owner", "audit", "show", *_conn(env), "--json", "--json-lines"])
    assert exc.value.code == 2
