"""The owner's schema, once for both databases: migrations rendered by a `Dialect`.

Each entry migrates from version i to i+1; all pending ones run in one transaction (`SqlStore.migrate`).
`{blob}`, `{real}` and `{int64}` become the dialect's types; `AppendOnly(table)` its triggers (SQLite:
BEFORE UPDATE / BEFORE DELETE; PostgreSQL: also BEFORE TRUNCATE). The audit log, the manifests and the
revocations are append-only for anyone using SQL through this code; the hash chain and its MACed head
show tampering by anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

from owner_svc.adapters.dialect import AppendOnly
from sevlaunch.audit import GENESIS


@dataclass(frozen=True)
class MacHead:
    """A migration step the store runs with its audit key: MACs the head row as it stands (the baseline
    a database from before heads were MACed starts from). Without a key it leaves the MAC empty."""


@dataclass(frozen=True)
class MacWorkloads:
    """A migration step the store runs with its audit key: MACs every workload row as it stands."""


Step = str | AppendOnly | MacHead | MacWorkloads

MIGRATIONS: tuple[tuple[Step, ...], ...] = (
    (
        """CREATE TABLE workloads (
            workload_id TEXT PRIMARY KEY,
            config_json TEXT NOT NULL,
            updated_at {real} NOT NULL
        )""",
        """CREATE TABLE secrets (
            workload_id TEXT PRIMARY KEY REFERENCES workloads(workload_id),
            sealed {blob} NOT NULL,
            updated_at {real} NOT NULL
        )""",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            workload_id TEXT NOT NULL,
            caller TEXT NOT NULL,
            policy {int64} NOT NULL,
            generation TEXT NOT NULL,
            cek_fingerprint TEXT NOT NULL,
            godh_cert {blob} NOT NULL,
            session_blob {blob} NOT NULL,
            sealed_keys {blob} NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            state TEXT NOT NULL,
            finished_at {real},
            matched_digest TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX sessions_by_workload ON sessions(workload_id, created_at)",
        """CREATE TABLE manifests (
            manifest_id TEXT PRIMARY KEY,
            envelope {blob} NOT NULL,
            source TEXT NOT NULL,
            imported_at {real} NOT NULL
        )""",
        """CREATE TABLE revoked_manifests (
            manifest_id TEXT PRIMARY KEY,
            revoked_by TEXT NOT NULL,
            revoked_at {real} NOT NULL
        )""",
        """CREATE TABLE audit (
            seq {int64} PRIMARY KEY,
            canonical TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            mac TEXT NOT NULL
        )""",
        AppendOnly("audit"),
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq {int64} NOT NULL,
            hash TEXT NOT NULL
        )""",
        f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS}')",  # noqa: S608 - a constant
    ),
    # 2: the reference value generation, bumped in the transaction of every manifest or revocation
    # stored, so every replica (or process sharing the file) notices a change made by another.
    (
        """CREATE TABLE refvalues_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation {int64} NOT NULL
        )""",
        "INSERT INTO refvalues_generation (id, generation) VALUES (1, 1)",
    ),
    # 3: manifests and revocations are append-only, like the audit: deleting a revoking manifest and
    # its revocation rows would put a revoked (validly signed) manifest back in force on every replica.
    # (`ON CONFLICT DO NOTHING` fires no UPDATE trigger.)
    (AppendOnly("manifests"), AppendOnly("revoked_manifests")),
    # 4: the head row exists from the start (seq 0, no record yet) in both databases, so the first append
    # locks it like every other; SQLite files made before had none until their first record.
    (
        f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS}') "  # noqa: S608 - a constant
        "ON CONFLICT (id) DO NOTHING",
        "CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions(created_at)",
    ),
    # 5: the head is authenticated (`sevlaunch.audit.make_head_mac`), so whoever can write the database
    # but lacks the KEK cannot move it back over a cut tail.
    ("ALTER TABLE audit_head ADD COLUMN mac TEXT NOT NULL DEFAULT ''", MacHead()),
    # 6: so is each workload's configuration (`sevlaunch.audit.workload_mac`): editing a row to allow a
    # debug policy or another generation would otherwise open the secret to whoever can write the rows.
    ("ALTER TABLE workloads ADD COLUMN mac TEXT NOT NULL DEFAULT ''", MacWorkloads()),
    # 7: SEV-SNP (`snpstore.py`). The ID and author keys, sealed under the KEK like every owner key (a
    # rotation retires a version, never deletes it); authorised launches (single use, expiring); and the
    # attestation challenges issued for them (single use, short-lived). IF NOT EXISTS: a database whose
    # version was set back by hand (as the upgrade tests do) migrates again without failing here.
    (
        """CREATE TABLE IF NOT EXISTS snp_keys (
            workload_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            version {int64} NOT NULL,
            public_digest TEXT NOT NULL,
            sealed {blob} NOT NULL,
            created_at {real} NOT NULL,
            retired_at {real},
            source TEXT NOT NULL,
            PRIMARY KEY (workload_id, kind, version)
        )""",
        """CREATE TABLE IF NOT EXISTS snp_authorizations (
            authorization_id TEXT PRIMARY KEY,
            workload_id TEXT NOT NULL,
            caller TEXT NOT NULL,
            product TEXT NOT NULL,
            policy {int64} NOT NULL,
            vcpus {int64} NOT NULL,
            launch_digest TEXT NOT NULL,
            manifest_id TEXT NOT NULL,
            host_data TEXT NOT NULL,
            id_key_digest TEXT NOT NULL,
            author_key_digest TEXT NOT NULL,
            id_key_version {int64} NOT NULL,
            init_data {blob} NOT NULL,
            vek_cert {blob} NOT NULL,
            created_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            state TEXT NOT NULL,
            finished_at {real},
            reason TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX IF NOT EXISTS snp_authorizations_by_workload "
        "ON snp_authorizations(workload_id, created_at)",
        """CREATE TABLE IF NOT EXISTS snp_challenges (
            challenge TEXT PRIMARY KEY,
            authorization_id TEXT NOT NULL,
            issued_at {real} NOT NULL,
            expires_at {real} NOT NULL,
            used_at {real}
        )""",
        "CREATE INDEX IF NOT EXISTS snp_challenges_by_authorization ON snp_challenges(authorization_id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

SNP_AUTHORIZATION_COLUMNS = (
    "authorization_id, workload_id, caller, product, policy, vcpus, launch_digest, manifest_id, host_data, "
    "id_key_digest, author_key_digest, id_key_version, init_data, vek_cert, created_at, expires_at, state, "
    "finished_at, reason"
)
SNP_KEY_COLUMNS = "workload_id, kind, version, public_digest, sealed, created_at, retired_at, source"

SESSION_COLUMNS = (
    "session_id, workload_id, caller, policy, generation, cek_fingerprint, godh_cert, session_blob, "
    "sealed_keys, created_at, expires_at, state, finished_at, matched_digest, reason"
)
