"""The docs a user reads live in the repository, in its own words (issue 13): no `--help` text of any
`sevlaunch` command or service, nor README.md or docs/, points to the design notes outside the clone
(`../shared/docs`, "PROTOCOL.md"), which a user's clone does not have."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevlaunch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("shared/docs", "PROTOCOL.md", "../shared")


def _helps(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, str]]:
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _helps(sub, f"{path} {name}")


def test_no_help_text_points_outside_the_clone() -> None:
    helps = dict(_helps(build_parser(), "sevlaunch"))
    for module in ("platform_svc.server", "launcher_svc.server", "owner_svc.server"):
        helps[module] = importlib.import_module(module).build_parser().format_help()
    assert len(helps) > 60  # every command and action, not a few
    assert {path for path, text in helps.items() if any(o in text for o in OUTSIDE)} == set()


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=str)
def test_user_docs_are_self_contained(doc: Path) -> None:
    text = doc.read_text()
    assert [o for o in OUTSIDE if o in text] == []
