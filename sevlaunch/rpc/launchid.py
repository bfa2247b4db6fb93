"""The launch id of the work in progress, carried across the three services.

A launch touches the launcher, the platform and the owner; their log lines (and the owner's audit
records) are tied together by one id, the launcher's launch id, sent as gRPC metadata
`x-sevlaunch-launch-id`:

* the server shell reads it from each incoming call into a context variable (`current_launch_id()`),
  and the JSON log formatter adds it to every line logged while the call runs (`launch_id`);
* `launch_id_scope(launch_id)` sets it for a block of code (the launcher, around the work of one launch);
* the client interceptors of `sevlaunch.rpc.client` attach the current id to every outgoing call, so
  calls made while serving a launch, or inside a scope, pass it on without any argument threading.

Only a short plain token is accepted from the wire (the same rule as the request id): a caller cannot
inject text into the logs.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

LAUNCH_ID_KEY = "x-sevlaunch-launch-id"
_LAUNCH_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("sevlaunch_launch_id", default=None)


def valid_launch_id(value: object) -> bool:
    return isinstance(value, str) and bool(_LAUNCH_ID_RE.match(value))


def current_launch_id() -> str | None:
    """The launch id of the code running now: the incoming call's, or the innermost scope's."""
    return _current.get()


def set_launch_id(launch_id: str | None) -> contextvars.Token[str | None]:
    """Sets the id for the rest of the current context (task); returns the token to reset it."""
    if launch_id is not None and not valid_launch_id(launch_id):
        raise ValueError("a launch id is 1..64 characters of A-Z a-z 0-9 . _ -")
    return _current.set(launch_id)


def reset_launch_id(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


@contextmanager
def launch_id_scope(launch_id: str) -> Iterator[str]:
    """`with launch_id_scope(lid): ...`: log lines and outgoing calls in the block carry `lid`."""
    token = set_launch_id(launch_id)
    try:
        yield launch_id
    finally:
        _current.reset(token)


def launch_id_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The valid launch id of incoming metadata, or None (absent or not a plain token)."""
    for key, value in metadata or ():
        if key == LAUNCH_ID_KEY and valid_launch_id(value):
            return str(value)
    return None


def with_launch_id(metadata: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """`metadata` plus the current launch id (unless it already names one)."""
    items = list(metadata or ())
    launch_id = _current.get()
    if launch_id is not None and not any(key == LAUNCH_ID_KEY for key, _ in items):
        items.append((LAUNCH_ID_KEY, launch_id))
    return items
