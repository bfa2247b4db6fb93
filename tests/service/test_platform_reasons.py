"""The platform's refusal reasons: one typed enum, documented in README.md and platform.proto, used at
every raise site of the service."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from platform_svc.core.reasons import PlatformReason
from sevlaunch import errors

REPO = Path(__file__).parents[2]
SNAKE = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+"
#: The domain error classes a core or adapter raises, by name (InvalidArgument, FailedPrecondition, ...).
ERROR_CLASSES = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.ServiceError)
}


def _proto_reasons() -> dict[str, str]:
    """reason → gRPC code, from the "Refusal reasons" block of platform.proto's header comment."""
    lines = (REPO / "protos/sevlaunch/rpc/v1/platform.proto").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("// Refusal reasons"))
    found: dict[str, str] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("//"):
            break
        m = re.match(rf"//\s+({SNAKE})\s+([A-Z_]+)\s+\S", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _readme_reasons() -> set[str]:
    """The backticked reasons of the "refusal reasons" bullet in README.md's platform_svc section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("**platform_svc**") : text.index("**launcher_svc**")]
    bullet = re.search(r"^- Its own refusal reasons.*?(?=^- |^\S|\Z)", section, re.M | re.S)
    assert bullet is not None, "README.md's platform_svc section lists no refusal reasons"
    return set(re.findall(rf"`({SNAKE})`", bullet.group(0)))


def test_the_proto_documents_exactly_the_enum() -> None:
    documented = _proto_reasons()
    assert set(documented) == {r.value for r in PlatformReason}
    assert set(documented.values()) <= {cls.code_name for cls in ERROR_CLASSES.values()}, documented


def test_the_readme_documents_exactly_the_enum() -> None:
    assert _readme_reasons() == {r.value for r in PlatformReason}


def _raise_sites(path: Path) -> list[tuple[int, str, ast.expr | None]]:
    """(line, class name, first argument) of every call of a ServiceError class in one module."""
    sites = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERROR_CLASSES:
            sites.append((node.lineno, node.func.id, node.args[0] if node.args else None))
    return sites


def test_every_refusal_the_service_raises_names_a_typed_reason_with_its_documented_code() -> None:
    documented = _proto_reasons()
    sites = {path: _raise_sites(path) for path in sorted((REPO / "platform_svc").rglob("*.py"))}
    assert sum(len(s) for s in sites.values()) >= len(PlatformReason)
    used = set()
    for path, found in sites.items():
        for line, cls, arg in found:
            where = f"{path.relative_to(REPO)}:{line}"
            assert isinstance(arg, ast.Attribute), f"{where}: the reason is not a PlatformReason member"
            assert isinstance(arg.value, ast.Name) and arg.value.id == "PlatformReason", where
            reason = PlatformReason[arg.attr]
            assert ERROR_CLASSES[cls].code_name == documented[reason], f"{where}: {reason} as {cls}"
            used.add(reason)
    # No documented reason is dead: each is raised somewhere.
    assert used == set(PlatformReason)
