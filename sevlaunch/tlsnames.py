"""Server names of the deployment's identities, for TLS server authentication (gRPC-free).

Convention: the server certificate of identity NAME carries the DNS SAN `NAME.sevlaunch.internal`
(`sevlaunch dev-certs` writes it for the server identities platform, launcher and owner). A client that
must talk to one identity, not just to any certificate of the CA, sets gRPC's
`grpc.ssl_target_name_override` to that name, so the TLS handshake itself checks that the certificate is
valid for it. `sevlaunch.internal` is reserved for this: no certificate may carry a name below it except
the identity's own (dev-certs refuses it as a shared `--san`), and it never resolves, so it cannot be
confused with a host name. An expected identity containing a dot is taken as a full DNS name instead
(e.g. `sevlaunch-owner.tenant.svc` for a certificate a production CA issued for a Kubernetes service).
Such a full name must be unique to that identity's certificate: a name that other certificates of the CA
also carry (a shared host name, a wildcard's match) lets their holders pass for the identity. An IP
address is refused outright: every dev server certificate carries 127.0.0.1 and ::1, so naming one
would accept any of them.
"""

from __future__ import annotations

import ipaddress
import re

SERVER_NAME_DOMAIN = "sevlaunch.internal"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# A last label like this makes a dotted name an IPv4 address to inet_aton ("127.1", "1.2.3.0x4"); no
# top-level domain looks like it.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")


def _is_ip_literal(name: str) -> bool:
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return "." in bare and bool(_NUMERIC_LABEL.match(bare.rsplit(".", 1)[1]))
    return True


def server_name(identity: str) -> str:
    """The DNS name a server certificate of `identity` must be valid for: `NAME.sevlaunch.internal` for a
    bare identity name, the name itself (lower-cased) when it contains a dot. ValueError otherwise, also
    for an IP address (v4 or v6), which would pass any certificate carrying it."""
    name = identity.strip().lower().rstrip(".")
    if _is_ip_literal(name):
        raise ValueError(
            f"{identity!r} is an IP address, not an identity: give the identity's name or a full DNS name"
            " that only its certificate carries"
        )
    full = name if "." in name else f"{name}.{SERVER_NAME_DOMAIN}"
    if len(full) > 253 or not _DNS_NAME.match(full):
        raise ValueError(f"{identity!r} is neither an identity name nor a DNS name")
    return full


def is_reserved(name: str) -> bool:
    """Whether `name` lies in the reserved domain (only an identity's own certificate may carry one)."""
    n = name.strip().lower().rstrip(".")
    return n == SERVER_NAME_DOMAIN or n.endswith("." + SERVER_NAME_DOMAIN)
