"""The owner's refusal reasons (`owner_svc.core.reasons.Reason`) against what owner.proto and README.md
document, both ways: every reason the core can raise is documented, and every documented owner reason
exists (the chain's and manifests' reasons are the protocol's, `sevlaunch.sev.errors.Reason`)."""

from __future__ import annotations

import re
from pathlib import Path

from owner_svc.core.reasons import Reason
from sevlaunch.sev.errors import Reason as ProtocolReason

ROOT = Path(__file__).resolve().parents[2]
SNAKE = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
OWNER = {r.value for r in Reason}
PROTOCOL = {r.value for r in ProtocolReason}


def _proto_error_block() -> str:
    """The header comment of owner.proto from "Errors:" to the line on the audit log."""
    text = (ROOT / "protos" / "sevlaunch" / "rpc" / "v1" / "owner.proto").read_text()
    header = text[: text.index("syntax = ")]
    start = header.index("// Errors:")
    end = header.index("// Every decision", start)
    return header[start:end]


def _readme_refusals() -> str:
    text = (ROOT / "README.md").read_text()
    owner = text[text.index("**owner_svc**") :]
    start = owner.index("- **Refusals.**")
    block = owner[start:]
    ends = [i for i in (block.find("\n- ", 1), block.find("\n#", 1), block.find("\n\n", 1)) if i > 0]
    return block[: min(ends)] if ends else block


def test_every_reason_is_documented_in_the_proto_and_nothing_more() -> None:
    documented = set(SNAKE.findall(_proto_error_block()))
    assert OWNER - documented == set(), "reasons the core raises that owner.proto does not document"
    assert documented - OWNER - PROTOCOL == set(), "reasons owner.proto documents that nothing raises"


def test_every_reason_is_listed_in_the_readme_and_nothing_more() -> None:
    listed = set(re.findall(r"`([a-z][a-z0-9_]*)`", _readme_refusals()))
    assert OWNER - listed == set(), "reasons the core raises that README.md does not list"
    assert listed - OWNER - PROTOCOL == set(), "reasons README.md lists that nothing raises"


def test_reasons_are_unique_snake_case_names() -> None:
    assert len(OWNER) == len(Reason)
    assert all(SNAKE.fullmatch(r.value) for r in Reason)
