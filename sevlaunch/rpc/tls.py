"""mTLS material from a TLS folder (`ca.pem`, `NAME.pem`, `NAME.key`) and client channels.

Servers always require a client certificate signed by the folder's CA: an unauthenticated peer never
reaches a servicer, so authorisation can rely on the certificate's subject CN.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from sevlaunch.rpc.client import ClientMetrics, aio_client_interceptors, intercept_sync

# A client whose server certificate lacks the endpoint's name may pin the expected name instead.
ChannelOptions = Sequence[tuple[str, Any]]


class TLSMaterialError(Exception):
    """The TLS folder lacks a file or a file cannot be read. The message names the file, never its bytes."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSMaterialError(f"cannot read {path}: {exc.strerror}") from None


def load_identity(tls_dir: str | Path, identity: str) -> tuple[bytes, bytes, bytes]:
    """Returns (ca.pem, NAME.key, NAME.pem) bytes from the folder."""
    base = Path(tls_dir)
    return _read(base / "ca.pem"), _read(base / f"{identity}.key"), _read(base / f"{identity}.pem")


#: A CA private key in a service's TLS folder lets anyone who can read that folder mint any identity.
CA_KEY_NAMES = ("ca.key",)


def refuse_ca_key(tls_dir: str | Path) -> None:
    """TLSMaterialError when the folder holds the CA's private key (as older `dev-certs` left it)."""
    for name in CA_KEY_NAMES:
        path = Path(tls_dir) / name
        if path.exists():
            raise TLSMaterialError(
                f"{path}: the CA's private key must not be in a service's TLS folder (whoever reads it "
                "can mint any identity); move it to a folder of its own, e.g. `sevlaunch dev-certs --out "
                f"{tls_dir} --ca-dir DIR` moves it there"
            )


def server_credentials(tls_dir: str | Path, identity: str) -> grpc.ServerCredentials:
    refuse_ca_key(tls_dir)
    ca, key, cert = load_identity(tls_dir, identity)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls_dir: str | Path, identity: str = "client") -> grpc.ChannelCredentials:
    ca, key, cert = load_identity(tls_dir, identity)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _options(server_name: str | None, options: ChannelOptions) -> list[tuple[str, Any]]:
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def secure_channel(
    endpoint: str,
    tls_dir: str | Path,
    identity: str = "client",
    *,
    server_name: str | None = None,
    options: ChannelOptions = (),
    metrics: ClientMetrics | None = None,
) -> grpc.aio.Channel:
    """An asyncio mTLS channel presenting `identity`'s certificate. Its calls carry the current launch
    id (sevlaunch.rpc.launchid) and, with `metrics`, are counted as grpc_client_*."""
    return grpc.aio.secure_channel(
        endpoint,
        channel_credentials(tls_dir, identity),
        options=_options(server_name, options),
        interceptors=aio_client_interceptors(metrics),
    )


def secure_channel_sync(
    endpoint: str,
    tls_dir: str | Path,
    identity: str = "client",
    *,
    server_name: str | None = None,
    options: ChannelOptions = (),
) -> grpc.Channel:
    """A blocking mTLS channel presenting `identity`'s certificate; its calls carry the current launch
    id (sevlaunch.rpc.launchid)."""
    credentials = channel_credentials(tls_dir, identity)
    return intercept_sync(grpc.secure_channel(endpoint, credentials, options=_options(server_name, options)))
