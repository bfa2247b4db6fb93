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

The head is authenticated too, HEAD_MAC = HMAC-SHA256(audit MAC key, "sevlaunch-owner/v1/audit-head" ‖
seq ‖ hash), so whoever can write the database but lacks the KEK cannot move it back over a cut tail. A
head the owner wrote earlier still carries a valid MAC, so a rollback to an earlier state of the whole
log (from a backup, say) is caught only against something kept outside the database: the checkpoints
(seq, hash, MAC) the owner writes to its log and metrics, which `audit verify --checkpoint` checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
AUDIT_MAC_LABEL = b"sevlaunch-owner/v1/audit-mac"
HEAD_MAC_LABEL = "sevlaunch-owner/v1/audit-head"
WORKLOAD_MAC_LABEL = "sevlaunch-owner/v1/workload"
#: The most records one GetAuditLog or ListSessions reply holds (owner.proto): a larger `limit` is
#: refused (bad_limit), so a reply stays far below the clients' 4 MiB receive limit; callers page with
#: `after_seq`.
MAX_PAGE = 1000
_FIELDS = frozenset({"event", "prev", "seq", "time"})
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


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


def workload_mac(key: bytes, workload_id: str, config_json: str) -> str:
    """The MAC of a stored workload configuration (its id and JSON text), under the audit key with a
    label of its own: a database writer without the KEK cannot widen what a workload allows."""
    message = f"{WORKLOAD_MAC_LABEL}\n{workload_id}\n{config_json}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def workload_mac_ok(key: bytes, workload_id: str, config_json: str, mac: object) -> bool:
    return _same(mac, workload_mac(key, workload_id, config_json))


def make_head_mac(key: bytes, seq: int, digest: str) -> str:
    """The MAC of a head or checkpoint (seq, hash): apart from the record MACs by its label, so neither
    stands in for the other."""
    return hmac.new(key, f"{HEAD_MAC_LABEL}\n{seq}\n{digest}".encode("ascii"), hashlib.sha256).hexdigest()


def head_mac_ok(key: bytes, seq: int, digest: str, mac: object) -> bool:
    return isinstance(digest, str) and digest.isascii() and _same(mac, make_head_mac(key, seq, digest))


@dataclass(frozen=True)
class Checkpoint:
    """A head as the owner saw it, kept outside the database: `SEQ:HASH` (and its MAC, with the KEK)."""

    seq: int
    hash: str
    mac: str = ""

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """`SEQ:HASH` or `SEQ:HASH:MAC` (what the owner logs). ValueError otherwise."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not _HEX64.fullmatch(parts[1]):
            raise ValueError(f"a checkpoint is SEQ:HASH (64 hex digits), not {text[:80]!r}")
        mac = parts[2] if len(parts) == 3 else ""
        if mac and not _HEX64.fullmatch(mac):
            raise ValueError("a checkpoint's MAC is 64 hex digits")
        return cls(int(parts[0]), parts[1].lower(), mac.lower())


def verify_chain(
    entries: Iterable[ChainEntry],
    *,
    head: tuple[int, str] | None,
    mac_key: bytes | None = None,
    head_mac: str | None = None,
    checkpoints: Iterable[Checkpoint] = (),
    after: tuple[int, str] | None = None,
) -> int:
    """Checks the chain from the first record against the head (None: no head row, so no records may
    exist); returns the number of records or raises AuditChainBroken at the first problem.

    With `mac_key`, every record MAC, and `head_mac` unless it is None (a database from before heads
    were MACed), must verify; so must the MAC of a checkpoint that carries one. Each checkpoint must
    name a record still in the log with that hash: a log cut back below it, or rewritten, fails.

    With `after` = (seq, hash), `entries` is the tail that follows that record (the owner's check at
    start); the count returned is then the head's seq."""
    wanted = {c.seq: c for c in checkpoints}
    for c in wanted.values():
        if mac_key is not None and c.mac and not head_mac_ok(mac_key, c.seq, c.hash, c.mac):
            raise AuditChainBroken(c.seq, f"checkpoint {c}: its MAC does not verify with this KEK")
    empty = wanted.pop(0, None)
    if empty is not None and not _same(empty.hash, GENESIS):
        raise AuditChainBroken(0, f"checkpoint {empty}: seq 0 is the empty log, whose hash is {GENESIS}")
    count, prev = after if after is not None else (0, GENESIS)
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
        found = wanted.pop(seq, None)
        if found is not None and not _same(entry.hash, found.hash):
            raise AuditChainBroken(seq, f"checkpoint {found}: record {seq} has another hash (rewritten)")
    if wanted:
        first = min(wanted)
        raise AuditChainBroken(
            first, f"checkpoint {wanted[first]}: the log holds {count} records (cut back or rolled back)"
        )
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
    if mac_key is not None and head_mac is not None and not head_mac_ok(mac_key, head_seq, prev, head_mac):
        raise AuditChainBroken(
            head_seq,
            "the audit head's MAC does not verify (the head was moved or rewritten without the KEK)",
        )
    return count


def _same(stored: object, expected: str) -> bool:
    """Constant-time equality; a stored value that is not ASCII text (a database holds any type) differs."""
    return isinstance(stored, str) and stored.isascii() and hmac.compare_digest(stored, expected)


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
