"""PostgreSQL connection strings shown in logs and errors without their secrets (gRPC-free).

Shown by an allow-list: only conninfo keys known to hold no secret appear with their value; every other
key (`password`, `sslpassword`, and whatever libpq adds later) appears as `key=***`. Used by the owner's
PostgreSQL store and by `sevlaunch owner audit verify`. psycopg (extra `sevlaunch[postgres]`) parses the
DSN; it is imported only when a DSN is given.
"""

from __future__ import annotations

from collections.abc import Mapping

#: conninfo keys whose values are shown; everything else is masked.
SHOWN_KEYS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "sslmode",
        "gssencmode",
        "target_session_attrs",
        "connect_timeout",
        "application_name",
    }
)
MASK = "***"
UNPARSABLE = "<unparsable DSN>"


def redact_params(params: Mapping[str, object]) -> str:
    """`key=value ...` (sorted) with every value outside `SHOWN_KEYS` masked."""
    return " ".join(f"{k}={v if k in SHOWN_KEYS else MASK}" for k, v in sorted(params.items()))


def _params(dsn: str) -> dict[str, object] | None:
    import psycopg
    from psycopg import conninfo

    try:
        return dict(conninfo.conninfo_to_dict(dsn))
    except psycopg.ProgrammingError:
        return None


def redact_dsn(dsn: str) -> str:
    """The DSN as `key=value ...` for logs and error messages, secrets masked."""
    params = _params(dsn)
    return UNPARSABLE if params is None else redact_params(params)


def scrub(text: str, dsn: str) -> str:
    """`text` (say, libpq's error message) with the value of every masked key of `dsn` replaced by
    `***`, longest first; values under four characters are left (they would garble the text)."""
    params = _params(dsn) or {}
    hidden = sorted(
        {str(v) for k, v in params.items() if k not in SHOWN_KEYS and v is not None and len(str(v)) >= 4},
        key=len,
        reverse=True,
    )
    for value in hidden:
        text = text.replace(value, MASK)
    return text
