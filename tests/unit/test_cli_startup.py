"""`sevlaunch` starts lean: only the chosen command's module is imported, and the offline commands never
load grpc (nor asyncio, prometheus, protobuf, libvirt); `--help` still lists every command."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sevlaunch.cli import COMMANDS, build_parser, main

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
FIRMWARE = VECTORS / "measurement" / "ovmf_AmdSev_suffix.bin"
ONLINE = ("platform", "owner", "launch", "launches", "demo")  # these call the services: they need grpc
OFFLINE = tuple(name for name in COMMANDS if name not in ONLINE)
HEAVY = ("grpc", "asyncio", "prometheus_client", "google.protobuf", "libvirt", "sevlaunch.rpc")


def _python(script: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_offline_commands_do_not_import_grpc() -> None:
    out = _python(
        f"""
        import contextlib, io, sys
        from sevlaunch.cli import main

        with contextlib.redirect_stdout(io.StringIO()) as digest:
            code = main(["measurement", "digest", "--mode", "sev", "--firmware", {str(FIRMWARE)!r}])
        assert code == 0 and len(digest.getvalue().strip()) == 64, (code, digest.getvalue())
        for command in {OFFLINE!r}:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    main([command, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, (command, exc.code)
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_help_lists_every_command_without_importing_them() -> None:
    out = _python(
        """
        import contextlib, io, sys
        from sevlaunch.cli import COMMANDS, main

        try:
            with contextlib.redirect_stdout(io.StringIO()) as text:
                main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0
        loaded = sorted(m for m in sys.modules if m.startswith("sevlaunch.cli."))
        assert loaded == [], loaded
        print(text.getvalue())
        """
    )
    for name, (_, help_text) in COMMANDS.items():
        assert f"    {name}" in out, name
        assert " ".join(help_text.split()) in " ".join(out.split()), name


def test_table_matches_the_modules() -> None:
    # Every module registers exactly its table entry, with the table's help, in the table's order.
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    assert {a.dest: a.help for a in sub._choices_actions} == {n: h for n, (_, h) in COMMANDS.items()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sevlaunch {command} ")


def test_unknown_command_is_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no-such-command'" in err
    assert all(repr(name) in err for name in COMMANDS)
