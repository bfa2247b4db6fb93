"""Deny-by-default authorisation of RPCs by the caller's certificate identity.

A caller's identity is the subject CN of its client certificate (verified by the TLS handshake against
the folder's CA), read from the certificate itself: a subject with no CN or with several CNs has no
identity (gRPC's `x509_common_name` property shows only one of several, so `CN=owner-admin,
CN=platform-admin` would pass for whichever comes first), and SANs never name a caller.

Each identity has roles (by default exactly one role, its own name); each RPC, named by
its full method path `/package.Service/Method`, lists the roles allowed to call it. An RPC missing from
the table is refused for everyone, so a method added to a proto is closed until someone opens it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

#: Role every authenticated caller has; for the health and reflection services only.
ANY_AUTHENTICATED = "*"

#: Standard services open to any caller that passed mTLS: probes and grpcurl need them, and they expose
#: nothing beyond the service names and the protos.
STANDARD_METHODS: Mapping[str, frozenset[str]] = {
    "/grpc.health.v1.Health/Check": frozenset({ANY_AUTHENTICATED}),
    "/grpc.health.v1.Health/Watch": frozenset({ANY_AUTHENTICATED}),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": frozenset({ANY_AUTHENTICATED}),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": frozenset({ANY_AUTHENTICATED}),
}


def method_rules(service: str, rules: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """Expands {"Method": roles} for one service full name ("sevlaunch.v1.PlatformService")."""
    return {f"/{service}/{method}": frozenset(roles) for method, roles in rules.items()}


@dataclass(frozen=True)
class AuthzPolicy:
    """RPC full name → allowed roles; optional identity → roles (for CNs that differ from role names)."""

    rules: Mapping[str, frozenset[str]]
    identity_roles: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def roles_of(self, identity: str) -> frozenset[str]:
        return self.identity_roles.get(identity, frozenset({identity})) | {ANY_AUTHENTICATED}

    def allows(self, method: str, identity: str | None) -> bool:
        if not identity:
            return False
        allowed = self.rules.get(method)
        if not allowed:
            return False
        return bool(allowed & self.roles_of(identity))

    def with_standard_methods(self) -> AuthzPolicy:
        return AuthzPolicy({**STANDARD_METHODS, **self.rules}, self.identity_roles)


#: The auth context property holding the verified peer's leaf certificate (PEM).
PEER_CERT_PROPERTY = "x509_pem_cert"


def identity_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified peer's identity, or None: no TLS or no certificate, an unparsable certificate, a
    subject without exactly one CN, or a CN that is empty, not text or holds control characters."""
    values = list(auth_context.get(PEER_CERT_PROPERTY, ()))
    if len(values) != 1:
        return None
    return identity_from_certificate(bytes(values[0]))


@functools.lru_cache(maxsize=512)
def identity_from_certificate(pem: bytes) -> str | None:
    """The one subject CN of a PEM certificate; None unless there is exactly one usable CN.

    Cached by the certificate's bytes: the same few client certificates call again and again."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if len(names) != 1:
        return None
    name = names[0].value
    if not isinstance(name, str) or not name or not name.isprintable():
        return None
    return name
