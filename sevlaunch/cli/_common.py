"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import base64
import binascii
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sevlaunch.cli import CommandError, UsageError
from sevlaunch.cli.bounds import float_in
from sevlaunch.files import write_private_file
from sevlaunch.limits import MAX_TIMEOUT_SECONDS

if TYPE_CHECKING:
    import grpc

    from sevlaunch.sev.chain import CertificateChain, TrustedRoot

# Heavy imports live in the functions that need them: grpc and sevlaunch.rpc (asyncio, prometheus) for the
# service-calling commands, the certificate parsers (x509) for the chain commands. A command that needs
# neither (measurement, secret, ...) starts without them.

S = TypeVar("S")


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def write_private(path: Path, data: bytes) -> None:
    """Writes key or secret material: 0600 from the first byte, never world-readable even for an instant.

    The bytes go to a new 0600 file beside `path` (O_EXCL|O_NOFOLLOW) that is renamed over it, so an
    existing file with a wider mode, or a symlink planted at `path`, never receives them.
    """
    if not path.parent.is_dir():
        raise CommandError(f"cannot write {path}: folder {path.parent} does not exist")
    write_private_file(path, data)


def parse_hex(value: str, *, what: str, length: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{what} is not hex") from None
    if length is not None and len(raw) != length:
        raise UsageError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def parse_b64(value: str, *, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not base64") from None


def parse_int(value: str) -> int:
    """argparse type: decimal or 0x-prefixed hex."""
    return int(value, 0)


# ------------------------------------------------------------- a platform chain from the command line

_CHAIN_PARTS = ("pdh", "pek", "oca", "cek")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def add_chain_args(parser: argparse.ArgumentParser) -> None:
    """--chain FILE, or --pdh/--pek/--oca/--cek [--ask --ark]; and --ca extra roots (repeatable)."""
    parser.add_argument("--chain", metavar="FILE", help="full chain PDH||PEK||OCA||CEK||ASK||ARK")
    for name in (*_CHAIN_PARTS, "ask", "ark"):
        parser.add_argument(f"--{name}", metavar="FILE", help=f"the {name.upper()} certificate")
    parser.add_argument(
        "--ca",
        metavar="FILE",
        action="append",
        default=[],
        help="an extra trusted root, an ASK||ARK file (repeatable)",
    )


def extra_roots(args: argparse.Namespace) -> tuple[TrustedRoot, ...]:
    """The --ca roots."""
    from sevlaunch.sev.chain import load_roots_file

    return tuple(load_roots_file(read_bytes(path), path) for path in args.ca)


def maybe_base64(data: bytes, *, what: str) -> bytes:
    """Certificates are binary; text made only of the base64 alphabet is taken as base64 (libvirt, QEMU)."""
    compact = b"".join(data.split())
    if not compact or compact.strip(_B64_ALPHABET):
        return data
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(f"{what} looks like base64 but does not decode") from None


def load_chain(
    args: argparse.Namespace, roots: Sequence[TrustedRoot], *, accept_base64: bool = False
) -> CertificateChain:
    """The chain of `add_chain_args`. Without --ask/--ark, the ASK/ARK of the root whose ASK signed the
    CEK. With `accept_base64`, the chain file and the PDH..CEK files may also be base64 text."""
    from sevlaunch.sev.amd_cert import AMDCertificate, parse_ark
    from sevlaunch.sev.cert import SEVCertificate
    from sevlaunch.sev.chain import CertificateChain, root_for_cek

    def read(path: str, what: str) -> bytes:
        data = read_bytes(path)
        return maybe_base64(data, what=what) if accept_base64 else data

    if args.chain is not None:
        if any(getattr(args, n) is not None for n in (*_CHAIN_PARTS, "ask", "ark")):
            raise UsageError("give either --chain or the separate certificate files, not both")
        return CertificateChain.from_full_bytes(read(args.chain, args.chain))
    missing = [f"--{n}" for n in _CHAIN_PARTS if getattr(args, n) is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or give --chain)")
    if (args.ask is None) != (args.ark is None):
        raise UsageError("give --ask and --ark together, or neither")
    pdh, pek, oca, cek = (SEVCertificate.from_bytes(read(getattr(args, n), f"--{n}")) for n in _CHAIN_PARTS)
    if args.ask is not None:
        ask = AMDCertificate.from_bytes(read_bytes(args.ask))
        ark = parse_ark(read_bytes(args.ark))
    else:
        root = root_for_cek(cek, tuple(roots))
        ask, ark = root.ask, root.ark
    return CertificateChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark)


# ------------------------------------------------------------------- gRPC client commands (mTLS)


#: The SEVLAUNCH_* variables the client options read (docs/CLI.md); the option wins. `SERVICE` is the
#: service called, upper-case: SEVLAUNCH_PLATFORM_ENDPOINT, SEVLAUNCH_OWNER_ENDPOINT, ...
CLIENT_ENV = {
    "--endpoint": "SEVLAUNCH_{SERVICE}_ENDPOINT",
    "--tls-dir": "SEVLAUNCH_TLS_DIR",
    "--identity": "SEVLAUNCH_CLIENT_IDENTITY",
    "--server-identity": "SEVLAUNCH_{SERVICE}_IDENTITY",
    "--timeout": "SEVLAUNCH_TIMEOUT",
}


def client_env(option: str, service: str) -> str:
    """The variable of a client option (CLIENT_ENV) for calls to `service`."""
    return CLIENT_ENV[option].replace("{SERVICE}", service.upper().replace("-", "_"))


def env_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    option: str,
    variable: str,
    *aliases: str,
    default: str | None = None,
    required: bool = False,
    **kwargs: Any,
) -> None:
    """An option whose default comes from `variable` when it is set (argparse converts it with the
    option's `type`); required only when neither the option nor the variable is given."""
    value = os.environ.get(variable)
    help_text = kwargs.pop("help", "")
    parser.add_argument(
        option,
        *aliases,
        default=value if value else default,
        required=required and not value,
        help=f"{help_text} [env {variable}]".strip(),
        **kwargs,
    )


def add_client_args(
    parser: argparse.ArgumentParser,
    *,
    service: str,
    identity: str,
    endpoint_option: str = "--endpoint",
    server_identity_aliases: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> None:
    """--endpoint, --tls-dir, --identity, --server-identity, --timeout of a command that calls a service,
    each also read from its SEVLAUNCH_* variable (CLIENT_ENV)."""
    group = parser.add_argument_group(f"connection to the {service} service (mTLS)")
    env_option(
        group,
        endpoint_option,
        client_env("--endpoint", service),
        required=True,
        dest="endpoint",
        metavar="HOST:PORT",
        help=f"{service} service gRPC address",
    )
    env_option(
        group,
        "--tls-dir",
        client_env("--tls-dir", service),
        required=True,
        metavar="DIR",
        help="folder with ca.pem and IDENTITY.pem/IDENTITY.key (`sevlaunch dev-certs` makes one)",
    )
    env_option(
        group,
        "--identity",
        client_env("--identity", service),
        default=identity,
        metavar="NAME",
        help=f"the client certificate to present, DIR/NAME.pem (default {identity}); the service "
        "authorises by its CN",
    )
    env_option(
        group,
        "--server-identity",
        client_env("--server-identity", service),
        *server_identity_aliases,
        default=service,
        metavar="NAME",
        help=f"the identity the server must prove (default {service}, i.e. {service}.sevlaunch.internal; "
        "a name with a dot is a full DNS name)",
    )
    env_option(
        group,
        "--timeout",
        client_env("--timeout", service),
        default=str(timeout),
        type=float_in(0, MAX_TIMEOUT_SECONDS),
        metavar="SECONDS",
        help=f"deadline of each call, seconds (default {timeout:g})",
    )


def _strip_reason(message: str, reason: str) -> str:
    """Service messages start with their reason ("path_not_allowed: firmware: ..."); the reason is
    printed once, in the parentheses."""
    return message.removeprefix(f"{reason}: ") if reason else message


#: Metadata a refusal carries for the caller's benefit, printed as hints rather than key=value.
_HINT_KEYS = ("identity", "allowed_roles", "field", "allowed_dirs", "server_option")


def describe_rpc_error(err: grpc.RpcError, args: argparse.Namespace | None = None) -> str:
    """One line: status, message, the ErrorInfo reason with its metadata, and what to change."""
    import grpc

    from sevlaunch.rpc import error_info

    info = error_info(err)
    meta = dict(info.metadata)
    hints: list[str] = []
    if info.reason == "caller_not_authorized":
        used = meta.get("identity") or "(no usable identity)"
        allowed = meta.get("allowed_roles", "")
        hint = f"you called as {used!r}"
        if args is not None and getattr(args, "tls_dir", None):
            hint += f" ({Path(args.tls_dir) / (str(getattr(args, 'identity', used)) + '.pem')})"
        hint += f"; allowed: {allowed.replace(',', ', ') or 'nobody'}"
        if allowed:
            hint += f"; use --identity {allowed.split(',')[0]} with that certificate"
        hints.append(hint)
    if info.reason == "path_not_allowed":
        dirs = meta.get("allowed_dirs", "")
        hints.append(
            "give a file under the launcher's allowed folders"
            + (f" ({dirs.replace(':', ', ')})" if dirs else "")
            + ", or have the operator add its folder to the launcher's --image-dir"
        )
    if "field" in meta:
        hints.append(f"field: {meta['field']}")
    if info.code is grpc.StatusCode.UNAVAILABLE and _is_name_mismatch(info.message) and args is not None:
        expected = getattr(args, "server_identity", "")
        return (
            f"{args.endpoint} did not prove the identity {expected!r}: this endpoint is not the "
            f"{expected} service; check the address, or see --server-identity"
        )
    extra = ", ".join(f"{k}={v}" for k, v in sorted(meta.items()) if k not in _HINT_KEYS)
    text = f"{info.code.name}: {_strip_reason(info.message, info.reason)}"
    if info.reason:
        text += f" ({info.reason}{'; ' + extra if extra else ''})"
    return text + "".join(f"; {h}" for h in hints)


def _is_name_mismatch(message: str) -> bool:
    """gRPC's text for a server certificate that does not hold the expected name (the handshake is
    refused by our own check, so the server never answered)."""
    lowered = message.lower()
    return any(
        marker in lowered
        for marker in ("hostname verification check failed", "peer name", "not in peer certificate")
    )


def call_service(
    args: argparse.Namespace,
    stub_class: Callable[[grpc.Channel], S],
    action: Callable[[S, argparse.Namespace], int],
) -> int:
    """Opens the mTLS channel of `add_client_args`, runs `action(stub, args)`; an RPC or TLS failure
    becomes a CommandError naming the status and reason."""
    import grpc

    from sevlaunch.rpc import secure_channel_sync
    from sevlaunch.rpc.tls import TLSMaterialError
    from sevlaunch.tlsnames import server_name

    try:
        # Every dev server certificate is valid for localhost: only the identity name tells an owner
        # from a platform on the same host, so the server must prove the identity we meant to reach.
        channel = secure_channel_sync(
            args.endpoint, args.tls_dir, args.identity, server_name=server_name(args.server_identity)
        )
    except (TLSMaterialError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    with channel:
        try:
            return int(action(stub_class(channel), args))
        except grpc.RpcError as err:
            raise CommandError(describe_rpc_error(err, args)) from None
