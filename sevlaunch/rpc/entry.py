"""What the three server commands share: their common flags and `main()` around an asyncio server.

    def build_parser():
        p = argparse.ArgumentParser(prog="sevlaunch-platform")
        add_server_flags(p, listen="0.0.0.0:50051", identity="platform", metrics_listen=":9101")
        ...                                     # the service's own flags

    def main(argv=None):
        return server_main(build_parser(), argv, lambda args: serve(config_from_args(args)))

`server_options(args)` gives the common fields of a service config (`tls_dir`, `listen`, `identity`,
`metrics_listen`, `health_listen`, `grace`), and `RpcServer(**rpc_server_options(cfg), ...)` passes
them on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from sevlaunch.rpc import tracing
from sevlaunch.rpc.flags import parse_args_with_env
from sevlaunch.rpc.logs import configure_logging
from sevlaunch.rpc.server import DEFAULT_GRACE_SECONDS
from sevlaunch.rpc.stderr import json_stderr
from sevlaunch.rpc.tls import TLSMaterialError

log = logging.getLogger("sevlaunch.rpc")

_OFF = ("", "off")


class StartupError(Exception):
    """A configuration problem found while starting a server; logged as one line, exit status 1."""


class ServerSettings(Protocol):
    """The common fields of the services' config classes."""

    @property
    def tls_dir(self) -> Path: ...
    @property
    def listen(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def metrics_listen(self) -> str | None: ...
    @property
    def health_listen(self) -> str | None: ...
    @property
    def grace(self) -> float: ...


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default (unless the help text already names one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, "", False) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_server_flags(
    parser: argparse.ArgumentParser, *, listen: str, identity: str, metrics_listen: str
) -> None:
    """The flags every service has, `--version`, and help texts that show defaults."""
    from sevlaunch import __version__

    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = HelpFormatter
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--listen", default=listen, help="gRPC (mTLS) address HOST:PORT")
    parser.add_argument("--tls-dir", required=True, help="folder with ca.pem and IDENTITY.pem/.key")
    parser.add_argument(
        "--identity", default=identity, help="certificate name in the TLS folder (also the client identity)"
    )
    parser.add_argument(
        "--metrics-listen",
        default=metrics_listen,
        help="Prometheus /metrics at HOST:PORT; a bare :PORT listens on 127.0.0.1 only, give "
        "0.0.0.0:PORT for every interface; '' or 'off' disables",
    )
    parser.add_argument(
        "--health-listen",
        default="",
        help="plaintext HOST:PORT serving only grpc.health.v1.Health (probes); '' or 'off' disables",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        metavar="SECONDS",
        help="seconds in-flight calls get to finish on SIGTERM",
    )
    parser.add_argument("--otlp-endpoint", default="", metavar="URL", help=tracing.ENDPOINT_HELP)
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
        help="least severe level logged (JSON lines on stderr)",
    )  # fmt: skip


def optional_address(value: str | None) -> str | None:
    """A listen flag's value, None when it is '' or 'off' (disabled)."""
    return None if value is None or value.strip() in _OFF else value


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The common config fields from the flags of `add_server_flags`."""
    return {
        "tls_dir": Path(args.tls_dir),
        "listen": args.listen,
        "identity": args.identity,
        "metrics_listen": optional_address(args.metrics_listen),
        "health_listen": optional_address(args.health_listen),
        "grace": args.grace,
    }


def rpc_server_options(cfg: ServerSettings) -> dict[str, Any]:
    """The `RpcServer` keyword arguments taken from a service config."""
    return {
        "tls_dir": cfg.tls_dir,
        "identity": cfg.identity,
        "listen": cfg.listen,
        "metrics_listen": cfg.metrics_listen,
        "health_listen": cfg.health_listen,
        "grace": cfg.grace,
    }


def server_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
) -> int:
    """Parses the flags (and their SEVLAUNCH_ variables), sets up JSON logging and runs `run(args)`.
    A configuration, TLS or bind problem is logged as "cannot start" and gives exit status 1. While it
    runs, whatever reaches stderr outside Python's logging (the gRPC core's own lines) is JSON too."""
    with json_stderr() as direct:
        args = parse_args_with_env(parser, argv)  # a usage error is JSON too (logger "stderr")
        configure_logging(args.log_level, direct)
        try:
            tracing.configure(parser.prog, optional_address(getattr(args, "otlp_endpoint", None)))
            asyncio.run(run(args))
        except (StartupError, TLSMaterialError, OSError, ValueError) as exc:
            log.error("cannot start", extra={"error": str(exc)})
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            tracing.shutdown()  # the spans still buffered go out before the process ends
    return 0
