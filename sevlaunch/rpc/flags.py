"""Every flag is also an environment variable: `--tls-dir` ↔ `SEVLAUNCH_TLS_DIR`; the flag wins.

Implemented as argparse defaults taken from the environment, so argparse still converts and validates
the value (a string default goes through the action's `type`). Members of a mutually exclusive group
take their variable only when no member of the group is on the command line, so that a flag overrides
the variable of a sibling too (`--dev-sev` on the command line beats SEVLAUNCH_EMULATOR).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

PREFIX = "SEVLAUNCH_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(option: str, prefix: str = PREFIX) -> str:
    return prefix + option.lstrip("-").upper().replace("-", "_")


def _on_command_line(action: argparse.Action, argv: Sequence[str]) -> bool:
    return any(arg == opt or arg.startswith(opt + "=") for arg in argv for opt in action.option_strings)


def _long_option(action: argparse.Action) -> str | None:
    return next((o for o in action.option_strings if o.startswith("--")), None)


def parse_args_with_env(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    prefix: str = PREFIX,
) -> argparse.Namespace:
    environ = os.environ if env is None else env
    args = list(argv) if argv is not None else sys.argv[1:]
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    for action in parser._actions:
        option = _long_option(action)
        if option is None or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = env_name(option, prefix)
        # Mention the variable in --help, so the environment is discoverable.
        if action.help is not None and action.help != argparse.SUPPRESS and name not in action.help:
            action.help = f"{action.help} [env {name}]"
        if name not in environ or _on_command_line(action, args):
            continue
        group = groups.get(id(action))
        if group is not None and any(_on_command_line(a, args) for a in group._group_actions):
            continue
        raw = environ[name]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            value = raw.strip().lower()
            if value not in _TRUE | _FALSE:
                parser.error(f"{name} must be a boolean, got {raw!r}")
            truth = value in _TRUE
            action.default = truth if isinstance(action, argparse._StoreTrueAction) else not truth
        else:
            action.default = raw
        action.required = False
        if group is not None:
            group.required = False
    return parser.parse_args(args)
