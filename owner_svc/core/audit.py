"""The owner's side of the audit chain: its `AuditEvent`/`AuditRecord` in the shared chain format.

The chain itself (canonical text, hash, MAC, verification) is `sevlaunch.audit`, the same code that
`sevlaunch owner audit verify` runs on a database file. The store keeps each record's canonical text and
the head (last seq and hash), so edits, deletions and a truncated tail all show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields

from owner_svc.core.model import AuditEvent, AuditRecord
from sevlaunch import audit

#: AuditEvent's fields, all text: a flat dict of them is what `dataclasses.asdict` gives, without its
#: recursive deep copy (a tenth of an audit append's time).
_EVENT_FIELDS = tuple(f.name for f in fields(AuditEvent))


def canonical_record(seq: int, time: float, event: AuditEvent, prev_hash: str) -> str:
    flat = {name: getattr(event, name) for name in _EVENT_FIELDS}
    if not flat["launch_id"]:
        del flat["launch_id"]  # records from before launch ids keep their canonical text and hash
    return audit.canonical_record(seq, time, flat, prev_hash)


def parse_canonical(canonical: str) -> tuple[int, float, AuditEvent, str]:
    seq, time, event, prev = audit.parse_canonical(canonical)
    return seq, time, AuditEvent(**event), prev


def verify_records(
    records: Iterable[AuditRecord], *, head: tuple[int, str] | None, mac_key: bytes | None = None
) -> int:
    """Checks the chain from the first record; returns the number of records or raises
    `sevlaunch.audit.AuditChainBroken`."""
    entries = (
        audit.ChainEntry(
            r.seq, canonical_record(r.seq, r.time, r.event, r.prev_hash), r.prev_hash, r.hash, r.mac
        )
        for r in records
    )
    return audit.verify_chain(entries, head=head, mac_key=mac_key)
