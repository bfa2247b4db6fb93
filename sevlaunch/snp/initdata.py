"""The init data of an attested SEV-SNP launch, and HOST_DATA, its digest (PROTOCOL.md section 11).

The owner decides, when it authorises a launch, where and how the guest will reach it after boot: its
guest-facing attestation endpoint, the CA certificate that endpoint's server certificate chains to, the
authorisation id the guest quotes, and a fresh nonce that makes every launch's init data (and so its
HOST_DATA) unique. The launcher hands the document to the guest (a disk, fw_cfg, the kernel command line);
the guest cannot trust the channel, but does not need to: HOST_DATA, which the firmware copies into every
report from SNP_LAUNCH_START and which the host cannot change afterwards, is

    HOST_DATA = SHA-256(canonical bytes of the init data)        (32 bytes, the field's size)

so the owner, checking HOST_DATA in the report against the value it authorised, knows the guest ran with
exactly the endpoint and CA it chose. SHA-256 because HOST_DATA is 32 bytes: the digest fills it with no
truncation, and collision resistance of 128 bits matches the rest of the launch.

Encoding (version 1): canonical JSON, one object with exactly these members, no others, keys sorted, no
white space, ASCII only (`json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`)::

    {"authorization_id":"...","ca_pem":"-----BEGIN CERTIFICATE-----\\n...","endpoint":"https://h:p",
     "nonce":"<64 hex digits>","version":1}

JSON rather than a binary layout because the guest side is a shell-level tool that people read; canonical
so that the digest is of one byte string only. `InitData.parse` accepts the canonical bytes, optionally
followed by one newline (a file written by hand or by `echo`), and nothing else: any other spelling of the
same document is refused, never normalised, so a parsed document always hashes to what the owner signed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sevlaunch.sev.errors import MalformedInput

VERSION: Final = 1
HOST_DATA_SIZE: Final = 32
NONCE_SIZE: Final = 32
MAX_INIT_DATA_BYTES: Final = 32 * 1024
MAX_CA_PEM_BYTES: Final = 16 * 1024
MAX_ENDPOINT_CHARS: Final = 512
MAX_AUTHORIZATION_ID_CHARS: Final = 128
_KEYS: Final = frozenset({"version", "endpoint", "ca_pem", "authorization_id", "nonce"})

_AUTHORIZATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NONCE_HEX = re.compile(r"[0-9a-f]{64}\Z")
# A DNS name of LDH labels, or an IPv4 address; an IPv6 address goes in brackets (RFC 3986 host).
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\Z")
_PORT = re.compile(r"[1-9]\d{0,4}\Z")


class InitDataReason(StrEnum):
    BAD_INIT_DATA = "bad_init_data"


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            return isinstance(ipaddress.ip_address(host[1:-1]), ipaddress.IPv6Address)
        except ValueError:
            return False
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        pass
    # A DNS name whose last label is all digits would read as a (bad) address: RFC 3696 section 2.
    return bool(_DNS_NAME.match(host)) and not host.rsplit(".", 1)[-1].isdigit()


def _bad(detail: str) -> MalformedInput:
    return MalformedInput(InitDataReason.BAD_INIT_DATA, detail)


@dataclass(frozen=True)
class Endpoint:
    """`https://HOST:PORT`: the only form accepted (no user info, path, query or fragment; port given)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        # Parsed by hand: `urllib.parse` is lenient (it accepts and drops what a strict reader refuses), and
        # the SNP core must not import it anyway.
        if not isinstance(url, str) or not 0 < len(url) <= MAX_ENDPOINT_CHARS:
            raise _bad(f"endpoint: a string of 1..{MAX_ENDPOINT_CHARS} characters")
        scheme, sep, rest = url.partition("://")
        if not sep or scheme != "https":
            raise _bad("endpoint: the scheme must be https (server-authenticated TLS only)")
        if rest.endswith("/"):
            rest = rest[:-1]
        if any(c in rest for c in "/?#@ \\") or not rest.isascii():
            raise _bad("endpoint: https://HOST:PORT only (no path, query, fragment or user info)")
        host, colon, port = rest.rpartition(":")
        if not colon or not _PORT.match(port) or int(port) > 0xFFFF:
            raise _bad("endpoint: needs an explicit port 1..65535")
        if not _valid_host(host):
            raise _bad("endpoint: the host is not a DNS name, an IPv4 address or a bracketed IPv6 address")
        if host.startswith("["):
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        endpoint = cls(host.lower(), int(port))
        if endpoint.url != url:
            raise _bad(
                "endpoint: not in canonical form (lower-case host, compressed IPv6, no trailing slash)"
            )
        return endpoint

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """`HOST:PORT` as grpc's channel target takes it."""
        return f"{self.host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name the server certificate must carry (brackets off an IPv6 address)."""
        return self.host[1:-1] if self.host.startswith("[") else self.host


def _parse_ca(pem: str) -> x509.Certificate:
    if not isinstance(pem, str) or not pem.isascii() or not 0 < len(pem) <= MAX_CA_PEM_BYTES:
        raise _bad(f"ca_pem: an ASCII PEM of at most {MAX_CA_PEM_BYTES} bytes")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
        for cert in certs:
            # cryptography decodes some fields only when read: read them here, where a bad one is typed.
            _ = (cert.version, cert.subject, cert.issuer, cert.public_key())
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm):
        raise _bad("ca_pem: not a PEM certificate") from None
    if len(certs) != 1:
        raise _bad(f"ca_pem: {len(certs)} certificates, exactly one CA certificate expected")
    cert = certs[0]
    if cert.public_bytes(serialization.Encoding.PEM).decode("ascii") != pem:
        # Text around the PEM block, or a second block of another kind, would be hashed but never read.
        raise _bad("ca_pem: must be exactly one PEM certificate block, as cryptography writes it")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _bad("ca_pem: the certificate has no basicConstraints; a CA certificate is needed") from None
    except ValueError:
        raise _bad("ca_pem: the certificate's extensions do not decode") from None
    if not constraints.ca:
        raise _bad("ca_pem: the certificate is not a CA (basicConstraints cA is false)")
    return cert


@dataclass(frozen=True)
class InitData:
    """One launch's init data. Construct with `new` (fresh nonce) or `parse`; both validate every field."""

    endpoint: Endpoint
    ca_pem: str
    authorization_id: str
    nonce: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, Endpoint):
            raise TypeError("endpoint must be an Endpoint")
        Endpoint.parse(self.endpoint.url)
        _parse_ca(self.ca_pem)
        aid = self.authorization_id
        if (
            not isinstance(aid, str)
            or not 0 < len(aid) <= MAX_AUTHORIZATION_ID_CHARS
            or not _AUTHORIZATION_ID.match(aid)
        ):
            raise _bad(
                f"authorization_id: 1..{MAX_AUTHORIZATION_ID_CHARS} of [A-Za-z0-9._-], starting alphanumeric"
            )
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE:
            raise _bad(f"nonce: must be {NONCE_SIZE} bytes")
        if len(self.to_bytes()) > MAX_INIT_DATA_BYTES:
            raise _bad(f"init data larger than {MAX_INIT_DATA_BYTES} bytes")

    @classmethod
    def new(cls, *, endpoint: str, ca_pem: str | bytes, authorization_id: str) -> InitData:
        pem = ca_pem.decode("ascii", "replace") if isinstance(ca_pem, bytes) else ca_pem
        return cls(Endpoint.parse(endpoint), pem, authorization_id, secrets.token_bytes(NONCE_SIZE))

    @property
    def ca_certificate(self) -> x509.Certificate:
        return _parse_ca(self.ca_pem)

    def to_obj(self) -> dict[str, object]:
        return {
            "version": VERSION,
            "endpoint": self.endpoint.url,
            "ca_pem": self.ca_pem,
            "authorization_id": self.authorization_id,
            "nonce": self.nonce.hex(),
        }

    def to_bytes(self) -> bytes:
        """The canonical encoding: what HOST_DATA digests, and what a guest's file holds."""
        return json.dumps(self.to_obj(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
            "ascii"
        )

    @property
    def host_data(self) -> bytes:
        return host_data(self.to_bytes())

    @classmethod
    def parse(cls, data: bytes) -> InitData:
        """The init data from its canonical bytes (one trailing newline allowed). Raises MalformedInput."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("init data is bytes")
        data = bytes(data)
        if len(data) > MAX_INIT_DATA_BYTES + 1:
            raise _bad(f"init data larger than {MAX_INIT_DATA_BYTES} bytes")
        body = data[:-1] if data.endswith(b"\n") else data
        try:
            obj = json.loads(body.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise _bad("init data is not ASCII JSON") from None
        if not isinstance(obj, dict):
            raise _bad("init data is not a JSON object")
        if unknown := obj.keys() - _KEYS:
            raise _bad(f"unknown field(s) {', '.join(sorted(unknown))}")
        if missing := _KEYS - obj.keys():
            raise _bad(f"missing field(s) {', '.join(sorted(missing))}")
        version = obj["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
            raise _bad(f"version: {version!r}, only {VERSION} is known")
        for name in ("endpoint", "ca_pem", "authorization_id", "nonce"):
            if not isinstance(obj[name], str):
                raise _bad(f"{name}: not a string")
        if not _NONCE_HEX.match(obj["nonce"]):
            raise _bad(f"nonce: {2 * NONCE_SIZE} lower-case hex digits")
        parsed = cls(
            Endpoint.parse(obj["endpoint"]),
            obj["ca_pem"],
            obj["authorization_id"],
            bytes.fromhex(obj["nonce"]),
        )
        if parsed.to_bytes() != body:
            raise _bad("init data is not in canonical form (sorted keys, no white space, ASCII escapes)")
        return parsed

    def __repr__(self) -> str:
        return (
            f"InitData(endpoint={self.endpoint.url!r}, authorization_id={self.authorization_id!r}, "
            f"host_data={self.host_data.hex()[:16]}...)"
        )


def host_data(init_data: bytes) -> bytes:
    """HOST_DATA of canonical init data bytes: SHA-256, 32 bytes."""
    return hashlib.sha256(init_data).digest()
