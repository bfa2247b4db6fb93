"""The owner's audit log hash chain: a record's canonical form, its hash and MAC, and the chain check.

One implementation for the writer (owner_svc, which appends records) and the offline verifier
(`sevlaunch owner audit verify`, which reads a database without the service). No gRPC, no storage.

A record is stored as the exact text that was hashed, canonical JSON of
`{"event": {...}, "prev": PREV_HASH, "seq": N, "time": repr(float)}` (sorted keys, no spaces, ASCII), with
hash = SHA-256(text) in hex and prev = the previous record's hash (GENESIS, 64 zeros, for the first). So
editing, inserting or deleting a record breaks every later link, and the head (the last seq and hash, kept
apart) shows a truncated tail. Whoever can write the database can recompute a plain hash chain, so each
record also carries MAC = HMAC-SHA256(audit MAC key, hash), the key derived one-way from the owner's
key-encryption key (`audit_mac_key`): with it, a verifier also proves the owner wrote the records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
AUDIT_MAC_LABEL = b"sevlaunch-owner/v1/audit-mac"
#: The most records one GetAuditLog or ListSessions reply holds (owner.proto): a larger `limit` is
#: refused (bad_limit), so a reply stays far below the clients' 4 MiB receive limit; callers page with
#: `after_seq`.
MAX_PAGE = 1000
_FIELDS = frozenset({"event", "prev", "seq", "time"})


class AuditChainBroken(Exception):
    """The chain does not verify at record `seq`; the message says how."""

    def __init__(self, seq: int, message: str) -> None:
        self.seq = seq
        super().__init__(message)


@dataclass(frozen=True)
class ChainEntry:
    """One audit record as stored: the hashed text, and the link, hash and MAC columns beside it."""

    seq: int
    canonical: str
    prev_hash: str
    hash: str
    mac: str


def canonical_record(seq: int, time: float, event: Mapping[str, str], prev_hash: str) -> str:
    """The exact text that is hashed and stored; self-describing, so verifying needs only SHA-256 and JSON."""
    return _dump({"seq": seq, "time": repr(time), "event": dict(event), "prev": prev_hash})


def parse_canonical(canonical: str) -> tuple[int, float, dict[str, str], str]:
    """(seq, time, event fields, prev hash) of a record's text. ValueError unless it is in canonical form."""
    try:
        obj = json.loads(canonical)
        ok = isinstance(obj, dict) and set(obj) == _FIELDS and _dump(obj) == canonical
        event = obj["event"] if ok else None
        if not (
            isinstance(event, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in event.items())
            and type(obj["seq"]) is int
            and isinstance(obj["time"], str)
            and isinstance(obj["prev"], str)
        ):
            raise ValueError("not a canonical audit record")
        return obj["seq"], float(obj["time"]), dict(event), obj["prev"]
    except (ValueError, TypeError, RecursionError):
        raise ValueError("not a canonical audit record") from None


def record_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def audit_mac_key(kek: bytes) -> bytes:
    """The audit MAC key: derived one-way from the KEK, so it cannot decrypt anything the KEK sealed."""
    return hmac.new(kek, AUDIT_MAC_LABEL, hashlib.sha256).digest()


def record_mac(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def verify_chain(
    entries: Iterable[ChainEntry], *, head: tuple[int, str] | None, mac_key: bytes | None = None
) -> int:
    """Checks the chain from the first record against the head (None: no head row, so no records may
    exist); returns the number of records or raises AuditChainBroken at the first problem."""
    prev = GENESIS
    count = 0
    for entry in entries:
        seq = entry.seq
        if seq != count + 1:
            raise AuditChainBroken(count + 1, f"audit record {count + 1} is missing (next is {seq})")
        where = f"audit record {seq}"
        try:
            body_seq, _, _, body_prev = parse_canonical(entry.canonical)
        except ValueError:
            raise AuditChainBroken(seq, f"{where}: not a canonical record") from None
        if body_seq != seq or not _same(body_prev, prev) or not _same(entry.prev_hash, prev):
            raise AuditChainBroken(seq, f"{where}: does not link to the previous record")
        if not _same(entry.hash, record_hash(entry.canonical)):
            raise AuditChainBroken(seq, f"{where}: content does not match its hash (edited)")
        if mac_key is not None and not _same(entry.mac, record_mac(mac_key, entry.hash)):
            raise AuditChainBroken(
                seq, f"{where}: MAC does not verify (not written by the owner with this KEK)"
            )
        prev = entry.hash
        count += 1
    if head is None:
        if count:
            raise AuditChainBroken(count, f"the audit head is missing, the log holds {count} records")
        return count
    head_seq, head_hash = head
    if head_seq != count or not _same(head_hash, prev):
        raise AuditChainBroken(
            count + 1 if head_seq > count else head_seq,
            f"the audit head says {head_seq} records, the log holds {count} (truncated or edited)",
        )
    return count


def _same(stored: object, expected: str) -> bool:
    """Constant-time equality; a stored value that is not ASCII text (a database holds any type) differs."""
    return isinstance(stored, str) and stored.isascii() and hmac.compare_digest(stored, expected)


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
