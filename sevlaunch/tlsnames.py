"""Server names of the deployment's identities, for TLS server authentication (gRPC-free).

Convention: the server certificate of identity NAME carries the DNS SAN `NAME.sevlaunch.internal`
(`sevlaunch dev-certs` writes it for the server identities platform, launcher and owner). A client that
must talk to one identity, not just to any certificate of the CA, sets gRPC's
`grpc.ssl_target_name_override` to that name, so the TLS handshake itself checks that the certificate is
valid for it. `sevlaunch.internal` is reserved for this: no certificate may carry a name below it except
the identity's own (dev-certs refuses it as a shared `--san`), and it never resolves, so it cannot be
confused with a host name. An expected identity containing a dot is taken as a full DNS name instead
(e.g. `sevlaunch-owner.tenant.svc` for a certificate a production CA issued for a Kubernetes service).
"""

from __future__ import annotations

import re

SERVER_NAME_DOMAIN = "sevlaunch.internal"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def server_name(identity: str) -> str:
    """The DNS name a server certificate of `identity` must be valid for: `NAME.sevlaunch.internal` for a
    bare identity name, the name itself (lower-cased) when it contains a dot. ValueError otherwise."""
    name = identity.strip().lower().rstrip(".")
    full = name if "." in name else f"{name}.{SERVER_NAME_DOMAIN}"
    if len(full) > 253 or not _DNS_NAME.match(full):
        raise ValueError(f"{identity!r} is neither an identity name nor a DNS name")
    return full


def is_reserved(name: str) -> bool:
    """Whether `name` lies in the reserved domain (only an identity's own certificate may carry one)."""
    n = name.strip().lower().rstrip(".")
    return n == SERVER_NAME_DOMAIN or n.endswith("." + SERVER_NAME_DOMAIN)
