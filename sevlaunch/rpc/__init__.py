"""The server shell shared by the three services, and the client helpers.

See docs/CONTRACTS.md, section "sevlaunch.rpc (server shell)". The generated stubs live in
`sevlaunch.rpc.v1`.
"""

from __future__ import annotations

from sevlaunch.rpc.authz import ANY_AUTHENTICATED, AuthzPolicy, method_rules
from sevlaunch.rpc.errors import RpcErrorInfo, error_info, map_exception
from sevlaunch.rpc.flags import env_name, parse_args_with_env
from sevlaunch.rpc.interceptor import REQUEST_ID_KEY, Caller, current_caller
from sevlaunch.rpc.logs import JsonFormatter, configure_logging
from sevlaunch.rpc.metrics import RpcMetrics, split_host_port
from sevlaunch.rpc.server import RpcServer
from sevlaunch.rpc.tls import TLSMaterialError, channel_credentials, secure_channel, secure_channel_sync

__all__ = [
    "ANY_AUTHENTICATED",
    "REQUEST_ID_KEY",
    "AuthzPolicy",
    "Caller",
    "JsonFormatter",
    "RpcErrorInfo",
    "RpcMetrics",
    "RpcServer",
    "TLSMaterialError",
    "channel_credentials",
    "configure_logging",
    "current_caller",
    "env_name",
    "error_info",
    "map_exception",
    "method_rules",
    "parse_args_with_env",
    "secure_channel",
    "secure_channel_sync",
    "split_host_port",
]
