"""The `sevlaunch` command. Each sub-command lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sevlaunch.sev.errors import SevError

# Modules under sevlaunch.cli, each registering one or more sub-commands.
COMMAND_MODULES = (
    "verify",
    "measurement",
    "session",
    "secret",
    "emulator",
    "export",
    "devcerts",
    "platform",
    "owner",
    "refvalues",
    "keygen",
    "launch",
    "demo",
)


class CommandError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sevlaunch", description="Attested launch of AMD SEV / SEV-ES confidential VMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"sevlaunch.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (SevError, CommandError) as exc:
        print(f"sevlaunch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sevlaunch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
