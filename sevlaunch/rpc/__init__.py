"""The server shell shared by the three services, and the client helpers.

See docs/CONTRACTS.md, section "sevlaunch.rpc (server shell)". The generated stubs live in
`sevlaunch.rpc.v1`.
"""

from __future__ import annotations

from sevlaunch.rpc.authz import ANY_AUTHENTICATED, AuthzPolicy, method_rules
from sevlaunch.rpc.client import ClientMetrics, aio_client_interceptors, intercept_sync
from sevlaunch.rpc.errors import RpcErrorInfo, error_info, map_exception
from sevlaunch.rpc.flags import env_name, parse_args_with_env
from sevlaunch.rpc.interceptor import ERROR, OK, REFUSED, REQUEST_ID_KEY, Caller, current_caller, mark_outcome
from sevlaunch.rpc.launchid import LAUNCH_ID_KEY, current_launch_id, launch_id_scope, set_launch_id
from sevlaunch.rpc.logs import JsonFormatter, configure_logging
from sevlaunch.rpc.metrics import RpcMetrics, split_host_port
from sevlaunch.rpc.server import RpcServer
from sevlaunch.rpc.tls import TLSMaterialError, channel_credentials, secure_channel, secure_channel_sync

__all__ = [
    "ANY_AUTHENTICATED",
    "ERROR",
    "LAUNCH_ID_KEY",
    "OK",
    "REFUSED",
    "REQUEST_ID_KEY",
    "AuthzPolicy",
    "Caller",
    "ClientMetrics",
    "JsonFormatter",
    "RpcErrorInfo",
    "RpcMetrics",
    "RpcServer",
    "TLSMaterialError",
    "aio_client_interceptors",
    "channel_credentials",
    "configure_logging",
    "current_caller",
    "current_launch_id",
    "env_name",
    "error_info",
    "intercept_sync",
    "launch_id_scope",
    "map_exception",
    "mark_outcome",
    "method_rules",
    "parse_args_with_env",
    "secure_channel",
    "secure_channel_sync",
    "set_launch_id",
    "split_host_port",
]
