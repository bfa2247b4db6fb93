"""A workload's SEV-SNP ID and author keys (ECDSA P-384): made by the owner on first use or imported by an
admin, sealed under the KEK like every other owner key, rotatable.

A rotation adds a version and retires the older ones; nothing is deleted. Each authorisation records
the digest of the ID (and author) key that signed its ID block, so a launch authorised before a rotation
still attests against the key it was signed with until it is released or expires, while every new
authorisation is signed with the new key. Private keys never leave this module but sealed; their repr,
logs and audit records show versions and public digests only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from owner_svc.core.model import AuditEvent, Workload, check_workload_id
from owner_svc.core.ports import Sealer, SealError, Store, StoreConflict
from owner_svc.core.reasons import Reason
from owner_svc.core.snp_model import SnpKeyKind, SnpKeyRecord, snp_key_aad
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound
from sevlaunch.sev.errors import SevError
from sevlaunch.snp.idblock import key_digest, load_signing_key

log = logging.getLogger("owner_svc.core")

MAX_KEY_PEM_BYTES = 16 * 1024


@dataclass(frozen=True)
class SnpKeyInfo:
    """A key version as an admin sees it: public facts only."""

    kind: SnpKeyKind
    version: int
    public_digest: str
    created_at: float
    retired_at: float | None
    source: str


class SigningKey:
    """An opened ID or author key. Holds the private key: `repr` shows the version and digest only."""

    __slots__ = ("_key", "record")

    def __init__(self, record: SnpKeyRecord, key: ec.EllipticCurvePrivateKey) -> None:
        self.record = record
        self._key = key

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    def __repr__(self) -> str:
        r = self.record
        return f"SigningKey({r.kind.value} v{r.version}, digest={r.public_digest[:16]}...)"

    __str__ = __repr__


class OwnerSnpKeys:
    """Mixed into `OwnerCore`, which provides these attributes."""

    store: Store
    sealer: Sealer
    clock: Callable[[], float]

    def _workload_or_none(self, workload_id: str) -> Workload | None:
        raise NotImplementedError

    def _snp_workload(self, workload_id: str) -> Workload:
        check_workload_id(workload_id)
        workload = self._workload_or_none(workload_id)
        if workload is None:
            raise NotFound(Reason.UNKNOWN_WORKLOAD, f"no workload {workload_id!r}")
        if workload.snp is None:
            raise FailedPrecondition(Reason.NO_SNP_RULES, "the workload has no SEV-SNP rules")
        return workload

    def snp_key_infos(self, workload_id: str) -> list[SnpKeyInfo]:
        """Every version of the workload's ID and author keys (admin)."""
        self._snp_workload(workload_id)
        return [
            SnpKeyInfo(r.kind, r.version, r.public_digest, r.created_at, r.retired_at, r.source)
            for kind in SnpKeyKind
            for r in self.store.snp_keys(workload_id, kind)
        ]

    def known_snp_key_digests(self, workload_id: str, kind: SnpKeyKind) -> set[str]:
        return {r.public_digest for r in self.store.snp_keys(workload_id, kind)}

    def active_snp_key(self, caller: str, workload_id: str, kind: SnpKeyKind) -> SigningKey:
        """The newest unretired key of `kind`, generated (and audited) the first time one is needed."""
        for _ in range(3):
            records = [r for r in self.store.snp_keys(workload_id, kind) if r.retired_at is None]
            if records:
                return self._open_snp_key(records[-1])
            # No key yet: make version 1. A concurrent caller making it too loses the insert, then reads.
            self._add_snp_key(
                caller, workload_id, kind, ec.generate_private_key(ec.SECP384R1()), 1, "generated"
            )
        raise StoreConflict("the workload's SEV-SNP key kept changing; retry")

    def rotate_snp_key(
        self, caller: str, workload_id: str, kind: SnpKeyKind, private_key_pem: bytes = b""
    ) -> SnpKeyInfo:
        """A new version of the workload's `kind` key: `private_key_pem` (an unencrypted P-384 key) or, empty,
        a fresh one. Older versions are retired, kept for the launches they already signed."""
        if not isinstance(kind, SnpKeyKind):
            raise InvalidArgument(Reason.BAD_SNP_KEY, "key kind is id or author")
        if len(private_key_pem) > MAX_KEY_PEM_BYTES:
            raise InvalidArgument(Reason.BAD_SNP_KEY, f"a key PEM is at most {MAX_KEY_PEM_BYTES} bytes")
        if private_key_pem:
            try:
                key = load_signing_key(private_key_pem, what=f"the {kind.value} key")
            except SevError as exc:
                # The detail never quotes the key.
                raise InvalidArgument(Reason.BAD_SNP_KEY, exc.detail) from None
            source = "imported"
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            source = "generated"
        self._snp_workload(workload_id)
        existing = self.store.snp_keys(workload_id, kind)
        if any(r.public_digest == key_digest(key).hex() for r in existing):
            raise InvalidArgument(Reason.BAD_SNP_KEY, f"that {kind.value} key was this workload's already")
        version = max((r.version for r in existing), default=0) + 1
        record = self._add_snp_key(caller, workload_id, kind, key, version, source)
        if record is None:
            raise StoreConflict("another rotation of this key won; retry")
        return SnpKeyInfo(kind, version, record.public_digest, record.created_at, None, source)

    def _add_snp_key(
        self,
        caller: str,
        workload_id: str,
        kind: SnpKeyKind,
        key: ec.EllipticCurvePrivateKey,
        version: int,
        source: str,
    ) -> SnpKeyRecord | None:
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        digest = key_digest(key).hex()
        record = SnpKeyRecord(
            workload_id=workload_id,
            kind=kind,
            version=version,
            public_digest=digest,
            sealed=self.sealer.seal(der, snp_key_aad(workload_id, kind, version)),
            created_at=self.clock(),
            source=source,
        )
        event = AuditEvent(
            actor=caller,
            action=f"{'rotate' if version > 1 else 'create'}_snp_{kind.value}_key",
            outcome="allowed",
            workload_id=workload_id,
            digest=digest,
            detail=f"{kind.value} key version {version} ({source})",
        )
        if not self.store.add_snp_key(record, event):
            return None
        log.info(
            "snp key added",
            extra={"workload": workload_id, "kind": kind.value, "version": version, "source": source},
        )
        return record

    def _open_snp_key(self, record: SnpKeyRecord) -> SigningKey:
        try:
            der = self.sealer.open(
                record.sealed, snp_key_aad(record.workload_id, record.kind, record.version)
            )
        except SealError:
            log.error("an SEV-SNP key does not open (wrong KEK or tampered database)")
            raise RuntimeError("SEV-SNP key does not open") from None
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key_digest(key).hex() != record.public_digest:
            # The row's digest and its sealed key disagree: written by something other than this code.
            raise RuntimeError("SEV-SNP key row is inconsistent")
        return SigningKey(record, key)
