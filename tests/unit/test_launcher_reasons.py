"""The launcher's refusal and failure reasons: the enum in the core, the list in launcher.proto and the
reasons README.md's launcher section names are the same set, and the code raises no other fixed reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from launcher_svc.core.reasons import FIRMWARE_PREFIX, LaunchReason

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "sevlaunch" / "rpc" / "v1" / "launcher.proto"
README = ROOT / "README.md"


def _proto_reasons() -> set[str]:
    text = PROTO.read_text()
    block = text[text.index("// Reasons:") : text.index("message LaunchEvent {")]
    return set(re.findall(r"^//   ([a-z0-9_]+) - ", block, flags=re.MULTILINE))


def _readme_launcher_reasons() -> set[str]:
    text = README.read_text()
    section = text[text.index("**launcher_svc**") : text.index("**owner_svc**")]
    # Reasons are the snake_case words in backquotes (flags are --kebab-case, XML is not snake_case).
    return set(re.findall(r"`([a-z]+(?:_[a-z0-9]+)+)`", section))


def test_every_reason_is_documented_in_the_proto_and_every_documented_reason_exists() -> None:
    documented = _proto_reasons()
    members = {r.value for r in LaunchReason}
    assert documented - members == set(), "documented in launcher.proto but not in LaunchReason"
    assert members - documented == set(), "in LaunchReason but not documented in launcher.proto"


def test_the_readme_names_only_reasons_that_exist() -> None:
    named = _readme_launcher_reasons()
    assert named, "README's launcher section names no reason"
    assert named - {r.value for r in LaunchReason} == set()


def _literal_reasons_raised() -> set[str]:
    """String literals given as the first argument of a ServiceError subclass in launcher_svc."""
    errors = {
        "InvalidArgument",
        "NotFound",
        "AlreadyExists",
        "FailedPrecondition",
        "PermissionDenied",
        "ResourceExhausted",
        "Unavailable",
        "DeadlineExceeded",
    }
    found: set[str] = set()
    for path in (ROOT / "launcher_svc").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in errors
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
    return found


def test_the_code_raises_no_reason_outside_the_enum() -> None:
    stray = {r for r in _literal_reasons_raised() if not r.startswith(FIRMWARE_PREFIX)}
    assert stray - {m.value for m in LaunchReason} == set()
