"""Generates the gRPC stubs from protos/ into sevlaunch/rpc/v1/ (with .pyi), or checks them (--check).

The stubs are committed; CI runs `--check`, which regenerates into a temporary tree and fails on any diff.
"""

from __future__ import annotations

import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_SUBDIR = Path("sevlaunch/rpc/v1")


def generate(out: Path) -> None:
    # The mypy-protobuf plugins live beside this interpreter, which may not be on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / OUT_SUBDIR).glob("*.proto"))
    if not protos:
        return
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    target = ROOT / OUT_SUBDIR
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            fresh = Path(tmp) / OUT_SUBDIR
            names = {p.name for p in fresh.glob("*")} | {
                p.name for p in target.glob("*") if p.suffix in {".py", ".pyi"} and p.name != "__init__.py"
            }
            stale = [
                n for n in sorted(names)
                if not (fresh / n).exists() or not (target / n).exists()
                or not filecmp.cmp(fresh / n, target / n, shallow=False)
            ]
        if stale:
            print("generated stubs are stale; run python scripts/gen_protos.py:", ", ".join(stale))
            return 1
        print("generated stubs are current")
        return 0
    generate(ROOT)
    (target / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
