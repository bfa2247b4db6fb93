"""A lifecycle event the launch store cannot answer (closed under a late event, or failing) is one
warning line, never an exception escaping into asyncio's "Exception in callback" traceback."""

from __future__ import annotations

import logging
import sqlite3
from types import SimpleNamespace
from typing import Any

import pytest

from launcher_svc.core.ports import LifecycleKind
from launcher_svc.core.reconciler import Reconciler


class ClosedStore:
    def by_domain(self, domain_name: str) -> Any:
        raise sqlite3.ProgrammingError("Cannot operate on a closed database.")


def test_an_event_after_the_store_closed_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    reconciler = Reconciler(SimpleNamespace(store=ClosedStore()))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        reconciler._on_lifecycle("sl-abc-g", LifecycleKind.STARTED)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.__dict__["domain"] == "sl-abc-g" and record.__dict__["event"] == "started"
    assert "closed database" in record.__dict__["error"]
