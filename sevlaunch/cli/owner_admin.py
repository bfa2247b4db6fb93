"""`sevlaunch owner workload list|delete`, `owner secret delete`, `owner refvalues revoke`.

    sevlaunch owner workload list [--after ID] [--limit N] [--json]
    sevlaunch owner workload delete --workload-id W [--force] [--json]
    sevlaunch owner secret delete --workload-id W [--force] [--json]
    sevlaunch owner refvalues revoke MANIFEST_ID [MANIFEST_ID ...] [--json]

A delete is refused (`workload_in_use`, exit 1) while a session or an SEV-SNP authorisation of the
workload is open: its launch would fail at the release. `--force` revokes them and deletes, in one
transaction. A revocation takes
the manifests out of force on every replica of the owner and can never be undone; an id the owner has
never seen refuses the call (`unknown_manifest`), so a typo revokes nothing. Each decision is in the
owner's audit log (`sevlaunch owner audit show`). The identity is `owner-admin`, as for every admin call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sevlaunch.audit import MAX_PAGE
from sevlaunch.cli._common import add_client_args, call_service
from sevlaunch.cli.bounds import int_in
from sevlaunch.cli.output import add_json_flag, emit, message_dict, table
from sevlaunch.rpc.v1 import owner_pb2, owner_pb2_grpc

Stub = owner_pb2_grpc.OwnerServiceStub
Action = Callable[[Stub, argparse.Namespace], int]
if TYPE_CHECKING:
    Parsers = argparse._SubParsersAction[Any]

FORCE_HELP = "revoke the workload's open sessions instead of refusing (their launches then fail)"


def register(workload: Parsers, secret: Parsers, refvalues: Parsers) -> None:
    """Adds the actions to the `owner workload`, `owner secret` and `owner refvalues` parsers."""

    def client(parent: Parsers, name: str, help_text: str, action: Action) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        add_client_args(c, service="owner", identity="owner-admin")
        add_json_flag(c)
        c.set_defaults(func=_run, action=action)
        return c

    listing = client(workload, "list", "list the workloads: secret stored, sessions open", _workload_list)
    listing.add_argument(
        "--after", default="", metavar="ID", help="start after this workload id (default: the first)"
    )
    listing.add_argument(
        "--limit",
        type=int_in(0, (1 << 63) - 1, hex_ok=False),
        default=0,
        metavar="N",
        help="list at most N workloads (default 0: all, fetched page by page)",
    )
    delete = client(workload, "delete", "delete a workload and its secret", _workload_delete)
    delete.add_argument("--workload-id", required=True, metavar="ID", help="the workload to delete")
    delete.add_argument("--force", action="store_true", help=FORCE_HELP)

    sdelete = client(
        secret, "delete", "delete a workload's secret table (the workload stays)", _secret_delete
    )
    sdelete.add_argument("--workload-id", required=True, metavar="ID", help="whose secret to delete")
    sdelete.add_argument("--force", action="store_true", help=FORCE_HELP)

    revoke = client(
        refvalues, "revoke", "revoke manifests by id, on every replica, for good", _refvalues_revoke
    )
    revoke.add_argument(
        "manifest_ids",
        nargs="+",
        metavar="MANIFEST_ID",
        help="64 hex digits, as `sevlaunch owner refvalues list` shows (up to 100)",
    )


def _run(args: argparse.Namespace) -> int:
    return call_service(args, owner_pb2_grpc.OwnerServiceStub, args.action)


def _workload_list(stub: Stub, args: argparse.Namespace) -> int:
    after, left = args.after, args.limit or None
    rows: list[dict[str, Any]] = []
    while left is None or left > 0:
        page = MAX_PAGE if left is None else min(MAX_PAGE, left)
        reply = stub.ListWorkloads(
            owner_pb2.ListWorkloadsRequest(after_workload_id=after, limit=page), timeout=args.timeout
        )
        rows.extend(message_dict(w) for w in reply.workloads)
        if len(reply.workloads) < page:
            break
        after = reply.workloads[-1].workload_id
        if left is not None:
            left -= len(reply.workloads)
    emit(
        args,
        {"workloads": rows},
        table(rows, ("workload_id", "has_secret", "open_sessions", "updated_at")) if rows else "no workloads",
    )
    return 0


def _workload_delete(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.DeleteWorkload(
        owner_pb2.DeleteWorkloadRequest(workload_id=args.workload_id, force=args.force), timeout=args.timeout
    )
    data = {"workload_id": args.workload_id, **message_dict(reply)}
    emit(args, data, f"workload {args.workload_id} deleted" + _revoked_text(reply))
    return 0


def _secret_delete(stub: Stub, args: argparse.Namespace) -> int:
    reply = stub.DeleteSecret(
        owner_pb2.DeleteSecretRequest(workload_id=args.workload_id, force=args.force), timeout=args.timeout
    )
    data = {"workload_id": args.workload_id, **message_dict(reply)}
    emit(args, data, f"secret of workload {args.workload_id} deleted" + _revoked_text(reply))
    return 0


def _refvalues_revoke(stub: Stub, args: argparse.Namespace) -> int:
    # Manifest ids are lower-case hex on the owner; accept what a person pastes in upper case.
    ids = [m.strip().lower() for m in args.manifest_ids]
    reply = stub.RevokeReferenceValues(
        owner_pb2.RevokeReferenceValuesRequest(manifest_ids=ids), timeout=args.timeout
    )
    lines = [f"revoked {m}" for m in reply.revoked] + [f"already revoked {m}" for m in reply.already_revoked]
    emit(args, message_dict(reply), "\n".join(lines))
    return 0


def _revoked_text(reply: Any) -> str:
    text = f"; revoked sessions: {', '.join(reply.revoked_sessions)}" if reply.revoked_sessions else ""
    if reply.revoked_snp_authorizations:
        text += f"; revoked SNP authorisations: {', '.join(reply.revoked_snp_authorizations)}"
    return text
