"""`sevlaunch owner ...`: administer an owner service over mTLS, and verify its audit log offline.

    sevlaunch owner workload put --file workload.json --endpoint HOST:PORT --tls-dir DIR
    sevlaunch owner workload get --workload-id W ... [--json]
    sevlaunch owner workload list | delete --workload-id W [--force]     (owner_admin.py)
    sevlaunch owner secret delete --workload-id W [--force]
    sevlaunch owner refvalues revoke MANIFEST_ID ...
    sevlaunch owner secret put --workload-id W --passphrase-file luks.txt | --entry GUID=FILE ...
    sevlaunch owner refvalues import M.dsse ... [--json]
    sevlaunch owner refvalues list ... [--json]
    sevlaunch owner sessions [--workload-id W] ... [--json]
    sevlaunch owner audit show [--after N] [--limit N] ... [--json | --json-lines]
    sevlaunch owner session revoke --session-id S ...
    sevlaunch owner audit verify --db owner.db | postgresql://... [--kek-file kek] [--checkpoint SEQ:HASH]

Each prints for people by default (`key: value` lines or a table), and with `--json` one JSON object in
the one style of docs/CLI.md ("JSON output"); `audit show --json-lines` prints a record a line instead.
`workload.json` is the `Workload` message of owner.proto in protobuf's JSON form, e.g.
{"workload_id": "web", "allowed_policies": [3], "generations": ["milan"],
 "selectors": [{"firmware_name": "OVMF", "modes": ["REFERENCE_MODE_SEV"]}]}.
A selector accepts only digests without kernel hashes unless it says `"kernel_hashes":
"KERNEL_HASHES_REQUIRED"` (only with) or `"KERNEL_HASHES_ANY"`; SEV-ES digests can be pinned to a
`"vcpu_type"` (e.g. "EPYC-Milan") and a `"vmsa_layout"` ("init2" or "legacy"). Workload flags:
`"allow_launch_without_secret": true` (a matched launch without a secret table is released with
`no_secret`), `"allow_pre_0_17": true` (accept firmware below API 0.17, whose version is not measured).

`audit verify` reads the database directly (read-only: a SQLite file opened `mode=ro`, or PostgreSQL in
one `REPEATABLE READ, READ ONLY` transaction, so the records and the head are one snapshot while
replicas append) and needs no service: each record stores the
exact JSON text that was hashed (`{"event", "prev", "seq", "time"}`), hash = SHA-256(text), and
`prev` = the previous record's hash (64 zeros for the first); the `audit_head` row holds the last
(seq, hash), so a truncated tail shows. With the KEK it also checks each record's MAC,
HMAC-SHA256(HMAC-SHA256(KEK, "sevlaunch-owner/v1/audit-mac"), hash), and the head's, which whoever can
only write the database cannot forge. A head the owner wrote earlier keeps a valid MAC, so a log rolled
back whole is caught only against a checkpoint kept elsewhere: `--checkpoint SEQ:HASH` from the owner's
"audit checkpoint" log lines (or its `sevlaunch_owner_audit_checkpoint` metric) must still be in the
log. The check is `sevlaunch.ownerdb` over `sevlaunch.audit`, the code the owner service writes the
chain with.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from sevlaunch.audit import MAX_PAGE, Checkpoint
from sevlaunch.cli import CommandError, UsageError, owner_admin
from sevlaunch.cli._common import add_client_args, call_service, read_bytes
from sevlaunch.cli.bounds import int_in
from sevlaunch.cli.output import add_json_flag, dumps, emit, key_values, message_dict, table
from sevlaunch.ownerdb import AuditDatabaseError, KEKFileError, load_kek, verify_audit_db
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc
from sevlaunch.sev.secret import DISK_PASSPHRASE_GUID

Action = Callable[[owner_pb2_grpc.OwnerServiceStub, argparse.Namespace], int]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("owner", help="administer an owner service; verify its audit log")
    groups = p.add_subparsers(dest="owner_command", required=True, metavar="AREA")

    def client(
        parent: argparse._SubParsersAction[Any], name: str, help: str, action: Action
    ) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = parent.add_parser(name, help=help)
        add_client_args(c, service="owner", identity="owner-admin")
        c.set_defaults(func=_run, action=action)
        return c

    workload = groups.add_parser("workload", help="workload configuration").add_subparsers(
        dest="workload_command", required=True, metavar="ACTION"
    )
    put = client(workload, "put", "create or replace a workload from a JSON file", _workload_put)
    put.add_argument("--file", required=True, help="Workload message as JSON")
    get = client(workload, "get", "show a workload", _workload_get)
    get.add_argument("--workload-id", required=True, metavar="ID", help="the workload to show")
    add_json_flag(get)

    secret = groups.add_parser("secret", help="the workload's secret table").add_subparsers(
        dest="secret_command", required=True, metavar="ACTION"
    )
    sput = client(secret, "put", "replace the workload's secret table", _secret_put)
    sput.add_argument("--workload-id", required=True)
    sput.add_argument("--passphrase-file", help="disk (LUKS) passphrase; stored NUL terminated")
    sput.add_argument(
        "--entry", action="append", default=[], metavar="GUID=FILE", help="a table entry (repeatable)"
    )

    refvalues = groups.add_parser("refvalues", help="reference values").add_subparsers(
        dest="refvalues_command", required=True, metavar="ACTION"
    )
    imp = client(refvalues, "import", "import a signed manifest (DSSE envelope)", _refvalues_import)
    imp.add_argument("envelope", help="the DSSE envelope file (`sevlaunch refvalues sign` writes it)")
    add_json_flag(imp)
    add_json_flag(client(refvalues, "list", "manifests in force", _refvalues_list))

    sessions = client(groups, "sessions", "list launch sessions", _sessions)
    sessions.add_argument("--workload-id", default="")
    sessions.add_argument(
        "--limit",
        type=int_in(1, MAX_PAGE, hex_ok=False),
        default=100,
        help=f"at most N sessions, the newest, 1..{MAX_PAGE} (default %(default)s)",
    )
    add_json_flag(sessions)

    owner_admin.register(workload, secret, refvalues)

    session = groups.add_parser("session", help="one session").add_subparsers(
        dest="session_command", required=True, metavar="ACTION"
    )
    revoke = client(session, "revoke", "revoke an open session", _session_revoke)
    revoke.add_argument("--session-id", required=True)

    audit = groups.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    show = client(audit, "show", "print audit records (a table; --json or --json-lines)", _audit_show)
    show.add_argument(
        "--after", type=int_in(0, (1 << 63) - 1, hex_ok=False), default=0, help="after this seq"
    )
    show.add_argument(
        "--limit",
        type=int_in(0, (1 << 63) - 1, hex_ok=False),
        default=0,
        help="print at most N records (default 0: all, fetched page by page)",
    )
    form = show.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help='one JSON object, {"records": [...]} (docs/CLI.md)')
    form.add_argument(
        "--json-lines",
        action="store_true",
        help="one JSON object a record, a line each, printed as the pages arrive (docs/CLI.md's style)",
    )
    verify = audit.add_parser("verify", help="check the audit log's hash chain in the owner's database")
    verify.add_argument(
        "--db",
        required=True,
        help="the owner's store: a SQLite file, or a postgresql:// URL (as the owner's)",
    )
    verify.add_argument(
        "--kek-file", help="also check each record's MAC and the head's (proves the owner wrote them)"
    )
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a checkpoint the owner logged (`audit checkpoint`): the log must still hold that record "
        "with that hash, so a log cut or rolled back below it fails (repeatable; SEQ:HASH:MAC also)",
    )
    verify.set_defaults(func=_audit_verify)


# ------------------------------------------------------------------------------------- client


def _run(args: argparse.Namespace) -> int:
    return call_service(args, owner_pb2_grpc.OwnerServiceStub, args.action)


def _workload_put(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    workload = owner_pb2.Workload()
    try:
        json_format.Parse(read_bytes(args.file), workload)
    except json_format.ParseError as exc:
        raise CommandError(f"{args.file}: {exc}") from None
    stub.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload), timeout=args.timeout)
    print(f"workload {workload.workload_id} stored")
    return 0


def _workload_get(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    reply = stub.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id=args.workload_id), timeout=args.timeout)
    emit(args, message_dict(reply))
    return 0


def _secret_put(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    entries = []
    if args.passphrase_file:
        passphrase = read_bytes(args.passphrase_file).rstrip(b"\r\n")
        entries.append(owner_pb2.SecretEntry(guid=str(DISK_PASSPHRASE_GUID), data=passphrase + b"\x00"))
    for spec in args.entry:
        guid, sep, path = spec.partition("=")
        if not sep:
            raise CommandError(f"--entry {spec!r} is not GUID=FILE")
        entries.append(owner_pb2.SecretEntry(guid=guid, data=read_bytes(path)))
    if not entries:
        raise CommandError("give --passphrase-file or --entry")
    reply = stub.PutSecret(
        owner_pb2.PutSecretRequest(workload_id=args.workload_id, entries=entries), timeout=args.timeout
    )
    # Never echo the secret: only how many entries and how large the table is.
    print(f"secret table of {len(entries)} entries stored ({reply.table_size} bytes)")
    return 0


def _refvalues_import(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    reply = stub.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(envelope=read_bytes(args.envelope)), timeout=args.timeout
    )
    known = "imported" if reply.newly_imported else "already imported"
    text = f"manifest {reply.manifest_id} {known}\n" + key_values(message_dict(reply.manifest), "  ")
    emit(args, message_dict(reply), text)
    return 0


MANIFEST_COLUMNS = ("manifest_id", "firmware_name", "firmware_version", "digests", "not_after", "publisher")
SESSION_COLUMNS = ("session_id", "workload_id", "state", "created_at", "expires_at", "caller", "reason")
AUDIT_COLUMNS = ("seq", "time", "actor", "action", "outcome", "workload_id", "session_id", "reason")


def _rows(messages: Any) -> list[dict[str, Any]]:
    return [message_dict(m) for m in messages]


def _refvalues_list(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    reply = stub.ListReferenceValues(owner_pb2.ListReferenceValuesRequest(), timeout=args.timeout)
    rows = _rows(reply.manifests)
    emit(args, {"manifests": rows}, table(rows, MANIFEST_COLUMNS) if rows else "no manifests in force")
    return 0


def _sessions(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    reply = stub.ListSessions(
        owner_pb2.ListSessionsRequest(workload_id=args.workload_id, limit=args.limit), timeout=args.timeout
    )
    rows = _rows(reply.sessions)
    emit(args, {"sessions": rows}, table(rows, SESSION_COLUMNS) if rows else "no sessions")
    return 0


def _session_revoke(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    stub.RevokeSession(owner_pb2.RevokeSessionRequest(session_id=args.session_id), timeout=args.timeout)
    print(f"session {args.session_id} revoked")
    return 0


def _audit_show(stub: owner_pb2_grpc.OwnerServiceStub, args: argparse.Namespace) -> int:
    """Prints the records after `--after`, all of them or `--limit`, asking for pages of at most
    MAX_PAGE (the server refuses more) and following after_seq until a short page. `--json-lines`
    prints each page as it arrives, so a long log streams; the table and `--json` need all of it."""
    if args.after < 0 or args.limit < 0:
        raise CommandError("--after and --limit must not be negative")
    lines = getattr(args, "json_lines", False)
    rows: list[dict[str, Any]] = []
    after, left = args.after, args.limit or None
    while left is None or left > 0:
        page = MAX_PAGE if left is None else min(MAX_PAGE, left)
        reply = stub.GetAuditLog(
            owner_pb2.GetAuditLogRequest(after_seq=after, limit=page), timeout=args.timeout
        )
        for r in reply.records:
            if lines:
                print(dumps(message_dict(r)))
            else:
                rows.append(message_dict(r))
        if len(reply.records) < page:
            break
        after = reply.records[-1].seq
        if left is not None:
            left -= len(reply.records)
    if not lines:
        emit(args, {"records": rows}, table(rows, AUDIT_COLUMNS) if rows else "no audit records")
    return 0


# ------------------------------------------------------------------------------ audit verify


def _audit_verify(args: argparse.Namespace) -> int:
    try:
        checkpoints = [Checkpoint.parse(text) for text in args.checkpoint]
    except ValueError as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    try:
        kek = load_kek(args.kek_file) if args.kek_file else None
        count = verify_audit_db(args.db, kek, checkpoints=checkpoints)
    except (KEKFileError, AuditDatabaseError) as exc:
        raise CommandError(str(exc)) from None
    held = f", {len(checkpoints)} checkpoint(s) held" if checkpoints else ""
    print(f"audit log intact: {count} records{', MACs verified' if kek else ''}{held}", file=sys.stdout)
    return 0
