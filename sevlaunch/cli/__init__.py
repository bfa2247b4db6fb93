"""The `sevlaunch` command. Each sub-command lives in its own module with a `register(subparsers)`.

Only the chosen command's module is imported and registered: the offline commands (measurement, verify,
session, secret, ...) then never load grpc, asyncio or prometheus, and start in a fraction of the time.
`sevlaunch --help` lists every command from the table below without importing any of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from sevlaunch.sev.errors import SevError

# Command name -> (module under sevlaunch.cli whose `register` adds it, the one-line help of the command
# list). In the order `sevlaunch --help` lists them. A module's own `add_parser(..., help=...)` must give
# the same help (tests/unit/test_cli_startup.py checks).
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("verify", "verify a platform certificate chain against pinned AMD roots"),
    "measurement": ("measurement", "expected launch digests and measurements"),
    "session": ("session", "create a launch session (GODH, session blob, TEK/TIK) for a verified platform"),
    "secret": ("secret", "launch secrets"),
    "emulator": ("emulator", "manage an emulated SEV chip (software PSP)"),
    "export": ("export", "export the platform certificate chain"),
    "dev-certs": ("devcerts", "make a local CA and mTLS certificates for the services (development only)"),
    "platform": ("platform", "query and administer a platform service (status, id, chain; sevctl verbs)"),
    "owner": ("owner", "administer an owner service; verify its audit log"),
    "refvalues": ("refvalues", "make, sign and verify reference value manifests"),
    "keygen": ("keygen", "make a reference value signing key pair (KEY and KEY.pub)"),
    "snp": ("snp", "SEV-SNP attestation reports, VCEK URLs and ID blocks (offline)"),
    "launch": ("launch", "launch an attested SEV/SEV-ES guest through a launcher"),
    "launches": ("launches", "list, inspect, abort and destroy a launcher's launches; the two-phase steps"),
    "demo": ("demo", "attested launch on the embedded defaults, then a tampered launch refused"),
    "guest": ("guest", "inside an SEV-SNP guest: attest to the owner and receive the secret"),
    "completion": ("completion", "print a shell completion script (bash, zsh, tcsh)"),
}

# Modules under sevlaunch.cli, each registering one sub-command.
COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


#: Exit statuses of every command: done, refused or failed, and a usage error (argparse's own too).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure of a command (refused by a service, a file that cannot be read, a check
    that failed): printed as one line, exit status 1."""

    exit_code = EXIT_FAILED


class UsageError(CommandError):
    """Options that contradict each other or miss a partner, found after argparse: exit status 2, like
    argparse's own usage errors."""

    exit_code = EXIT_USAGE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default unless its help already says it; keeps descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from sevlaunch import __version__

    return __version__


def _apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Every parser of the tree gets `HelpFormatter` (one that chose another keeps it)."""
    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _apply_formatter(child)


def build_parser(
    commands: Collection[str] | None = None, *, list_others: bool = True
) -> argparse.ArgumentParser:
    """The parser with `commands` imported and registered (None: every command). With `list_others`, the
    other commands are listed by name and help only (nothing imported), so `--help` and argparse's
    invalid-choice error still name them all."""
    parser = argparse.ArgumentParser(
        prog="sevlaunch",
        description="Attested launch of AMD SEV / SEV-ES confidential VMs.",
        epilog="Exit status: 0 done, 1 refused or failed, 2 usage error. docs/CLI.md describes every "
        "command, its --json output and the SEVLAUNCH_* variables the client options read.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if commands is None or name in commands:
            module = importlib.import_module(f"sevlaunch.cli.{module_name}")
            module.register(sub)
        elif list_others:
            sub.add_parser(name, help=help_text, add_help=False)
    _apply_formatter(parser)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The least parser that parses `argv` exactly as the whole command tree would."""
    if argv and argv[0] in COMMANDS:
        # `sevlaunch COMMAND ...`: argparse goes straight to COMMAND's parser and never shows the others.
        return build_parser((argv[0],), list_others=False)
    if not any(arg in COMMANDS for arg in argv):
        # No command (`--help`, nothing, a typo): the listing serves the help or the invalid-choice error.
        return build_parser(())
    return build_parser()  # anything else (`--help measurement`, `-- measurement`): the whole tree


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser_for(args_list).parse_args(args_list)
    try:
        code: int = args.func(args)
    except CommandError as exc:
        print(f"sevlaunch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SevError as exc:
        print(f"sevlaunch: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"sevlaunch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
