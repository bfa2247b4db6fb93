"""The audit log's hash chain (pure).

Each record's hash is SHA-256 over a canonical JSON of its sequence number, time, event and the previous
record's hash, so editing, inserting or deleting a record breaks every later link. A plain hash chain can
be recomputed by whoever can write the database, so each record also carries an HMAC of its hash under an
audit key derived from the key-encryption key: with that key, `verify_records` also proves that the
records were written by the owner service. The store keeps the last (seq, hash) as the head, so a
truncated tail shows too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import asdict

from owner_svc.core.model import AuditEvent, AuditRecord

GENESIS = "0" * 64


class AuditChainBroken(Exception):
    def __init__(self, seq: int, why: str) -> None:
        self.seq = seq
        self.why = why
        super().__init__(f"audit record {seq}: {why}")


def canonical_record(seq: int, time: float, event: AuditEvent, prev_hash: str) -> str:
    """The exact text that is hashed and stored. Self-describing, so a verifier needs only SHA-256 and
    a JSON parser (`sevlaunch owner audit verify` reads the database without this package)."""
    return json.dumps(
        {"seq": seq, "time": repr(time), "event": asdict(event), "prev": prev_hash},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )


def parse_canonical(canonical: str) -> tuple[int, float, AuditEvent, str]:
    obj = json.loads(canonical)
    return int(obj["seq"]), float(obj["time"]), AuditEvent(**obj["event"]), str(obj["prev"])


def record_hash(seq: int, time: float, event: AuditEvent, prev_hash: str) -> str:
    return hashlib.sha256(canonical_record(seq, time, event, prev_hash).encode("ascii")).hexdigest()


def record_mac(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def verify_records(
    records: Iterable[AuditRecord], *, head: tuple[int, str] | None, mac_key: bytes | None = None
) -> int:
    """Checks the chain from the first record; returns the number of records or raises AuditChainBroken."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for rec in records:
        if rec.seq != expected_seq:
            raise AuditChainBroken(expected_seq, f"missing (next record is {rec.seq})")
        if not hmac.compare_digest(rec.prev_hash, prev):
            raise AuditChainBroken(rec.seq, "does not link to the previous record")
        if not hmac.compare_digest(record_hash(rec.seq, rec.time, rec.event, rec.prev_hash), rec.hash):
            raise AuditChainBroken(rec.seq, "content does not match its hash (edited)")
        if mac_key is not None and not hmac.compare_digest(record_mac(mac_key, rec.hash), rec.mac):
            raise AuditChainBroken(rec.seq, "MAC does not verify (not written by this owner)")
        prev = rec.hash
        expected_seq += 1
        count += 1
    if head is None:
        if count:
            raise AuditChainBroken(count, "records exist but the head is missing")
    else:
        head_seq, head_hash = head
        if head_seq != count or not hmac.compare_digest(head_hash, prev):
            raise AuditChainBroken(
                count + 1 if head_seq > count else head_seq,
                f"head says {head_seq} records, the log has {count} (truncated)",
            )
    return count
