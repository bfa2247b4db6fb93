"""One output style for every command that prints data (docs/CLI.md, "JSON output").

With `--json` a command prints exactly one JSON document on stdout (an object, or for a listing an object
holding a list), compact, on one line, so that `jq` and scripts read it without guessing:

* keys are snake_case, the proto field names;
* integers are JSON numbers (never strings, whatever their width; a policy or flags word too);
* times are RFC 3339 strings in UTC with a `Z` (`2026-12-06T12:05:14.123Z`); a proto field `x_unix`
  (seconds since the epoch) is printed as `x` in that form; durations are numbers of milliseconds in a
  key ending `_ms`;
* enum values are their name without the enum's prefix (`"RUNNING"`, not `"PHASE_RUNNING"`); the unset
  value (`..._UNSPECIFIED`) is `null`;
* bytes are lower-case hex (measurements, digests, certificates);
* a message field that is not set is `null`; every other field is always present, so the schema of a
  command does not depend on the values.

Without `--json` the same facts are printed for people: `key: value` lines or a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from google.protobuf.message import Message

# Descriptors are typed loosely: protobuf's pure-Python and upb classes differ in their stubs.
EnumDescriptor = Any
FieldDescriptor = Any

JSON_HELP = "print the result as one JSON object (schema: docs/CLI.md)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def rfc3339(value: float | _dt.datetime) -> str:
    """A time as RFC 3339 in UTC, milliseconds, `Z`."""
    when = value if isinstance(value, _dt.datetime) else _dt.datetime.fromtimestamp(value, _dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def enum_short_name(descriptor: EnumDescriptor, number: int) -> str | None:
    """The value's name without the prefix its enum's values share; None for 0 (unset) or unknown."""
    if number == 0:
        return None
    value = descriptor.values_by_number.get(number)
    if value is None:
        return str(number)  # a value from a newer proto: still a fact worth printing
    names = [v.name for v in descriptor.values]
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[: prefix.rfind("_") + 1]  # whole words only: SEV_MODE_, not SEV_MODE_SEV
    return str(value.name[len(prefix) :] or value.name)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    from google.protobuf.descriptor import FieldDescriptor as FD

    if field.type == FD.TYPE_ENUM:
        return enum_short_name(field.enum_type, int(value))
    if field.type == FD.TYPE_BYTES:
        return bytes(value).hex()
    if field.type == FD.TYPE_MESSAGE:
        return message_dict(value)
    if field.name.endswith("_unix"):
        return rfc3339(float(value)) if value else None
    return value


def _key(field: FieldDescriptor) -> str:
    name = str(field.name)
    if name.endswith("_unix"):
        return name.removesuffix("_unix")
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration":
        return f"{name}_ms"
    return name


def message_dict(msg: Message) -> Any:
    """A protobuf message in the one style (module docstring). Timestamps become strings and Durations
    milliseconds where they are fields; every other message becomes an object of all its fields."""
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Timestamp":
        seconds, nanos = getattr(msg, "seconds", 0), getattr(msg, "nanos", 0)
        return rfc3339(seconds + nanos / 1e9) if (seconds or nanos) else None
    if name == "google.protobuf.Duration":
        return round(getattr(msg, "seconds", 0) * 1000 + getattr(msg, "nanos", 0) / 1e6, 3)
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if _is_repeated(field):
            out[_key(field)] = [_scalar(field, item) for item in value]
        elif field.message_type is not None and not msg.HasField(field.name):
            out[_key(field)] = None
        else:
            out[_key(field)] = _scalar(field, value)
    return out


def _is_repeated(field: FieldDescriptor) -> bool:
    from google.protobuf.descriptor import FieldDescriptor as FD

    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29 prefers the property
    if isinstance(is_repeated, bool):
        return is_repeated
    return bool(getattr(field, "label", None) == FD.LABEL_REPEATED)


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=False, ensure_ascii=False)


def emit(args: argparse.Namespace, data: Mapping[str, Any], text: str | None = None) -> None:
    """Prints `data` as JSON with `--json`, else `text` (default: `key: value` lines of `data`)."""
    if getattr(args, "json", False):
        print(dumps(data), flush=True)
    else:
        print(text if text is not None else key_values(data), flush=True)


def key_values(data: Mapping[str, Any], indent: str = "") -> str:
    lines: list[str] = []
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"{indent}{key}:")
            lines.append(key_values(value, indent + "  "))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            lines.append(f"{indent}{key}:")
            for item in value:
                lines.append(key_values(item, indent + "  - "))
        else:
            shown = (
                "-"
                if value is None or value == []
                else (", ".join(map(str, value)) if isinstance(value, list) else value)
            )
            lines.append(f"{indent}{key + ':':<{width + 1}} {shown}")
    return "\n".join(line for line in lines if line)


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table of `columns` (upper-case headings); `-` for empty cells."""
    cells = [[c.upper() for c in columns]]
    for row in rows:
        cells.append(["-" if row.get(c) in (None, "", []) else str(row.get(c)) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)
