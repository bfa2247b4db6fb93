"""The launch session: what the guest owner hands to LAUNCH_START (PROTOCOL.md §4; AMD SEV API spec §6.2,
"LAUNCH_START", and the "Transport Keys" / "Session Buffer" descriptions).

The owner makes an ephemeral ECDH key (the GODH), agrees a secret Z with the platform's PDH, derives KEK and
KIK from it, and wraps two fresh keys for the guest's launch channel: TEK (encryption) and TIK (integrity).
Only the firmware holding the PDH private key can unwrap them. `unwrap_session` is that firmware side,
used by the emulator and by tests.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.kdf import aes128_ctr, derive_kek, derive_kik, derive_master_secret, hmac_sha256
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.types import Nonce

if TYPE_CHECKING:
    # Imported lazily at run time: `secret` needs TransportKeys without pulling in certificate parsing.
    from sevlaunch.sev.cert import SEVCertificate

TEK_SIZE = 16
TIK_SIZE = 16
NONCE_SIZE = 16
WRAP_IV_SIZE = 16
MAC_SIZE = 32
SESSION_BLOB_SIZE = 128
# Z is the x-coordinate of the shared P-384 point, 48 bytes big-endian as OpenSSL returns it; the
# firmware byte-reverses its little-endian CCP output to match (AMD-ASPFW ecdh.c, via tests/vectors/README).
Z_SIZE = 48


@dataclass(frozen=True, eq=False)
class TransportKeys:
    """TEK and TIK of one launch. Fresh for every launch: re-using them across launches is insecure."""

    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tek, bytes) or not isinstance(self.tik, bytes):
            raise TypeError("TEK and TIK are bytes")
        if len(self.tek) != TEK_SIZE or len(self.tik) != TIK_SIZE:
            # The sizes are safe to tell; the values never are.
            raise MalformedInput(
                Reason.BAD_LENGTH,
                f"TEK and TIK are {TEK_SIZE} bytes each, got {len(self.tek)} and {len(self.tik)}",
            )

    @classmethod
    def generate(cls) -> TransportKeys:
        return cls(secrets.token_bytes(TEK_SIZE), secrets.token_bytes(TIK_SIZE))

    def __repr__(self) -> str:
        return "TransportKeys(tek=<hidden>, tik=<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransportKeys):
            return NotImplemented
        return hmac.compare_digest(self.tek + self.tik, other.tek + other.tik)

    # Keys hashed into dict buckets would leak timing; they are not meant to be set members.
    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class SessionBlob:
    """The 128-byte session buffer of LAUNCH_START (PROTOCOL.md §4.5; sev-tool `sev_session_buf`).

    nonce[16] @0x00 · wrap_tk[32] @0x10 · wrap_iv[16] @0x30 · wrap_mac[32] @0x40 · policy_mac[32] @0x60.
    wrap_tk is TEK‖TIK encrypted, so the blob is safe to show and to hand to the host.
    """

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def __post_init__(self) -> None:
        for name, size in (
            ("nonce", NONCE_SIZE),
            ("wrap_tk", TEK_SIZE + TIK_SIZE),
            ("wrap_iv", WRAP_IV_SIZE),
            ("wrap_mac", MAC_SIZE),
            ("policy_mac", MAC_SIZE),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise TypeError(f"session blob {name} must be bytes")
            if len(value) != size:
                raise MalformedInput(
                    Reason.BAD_LENGTH, f"session blob {name} must be {size} bytes, got {len(value)}"
                )

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionBlob:
        if len(data) != SESSION_BLOB_SIZE:
            raise MalformedInput(
                Reason.TRUNCATED if len(data) < SESSION_BLOB_SIZE else Reason.BAD_LENGTH,
                f"a session blob is {SESSION_BLOB_SIZE} bytes, got {len(data)}",
            )
        data = bytes(data)
        return cls(
            nonce=data[0x00:0x10],
            wrap_tk=data[0x10:0x30],
            wrap_iv=data[0x30:0x40],
            wrap_mac=data[0x40:0x60],
            policy_mac=data[0x60:0x80],
        )

    def to_bytes(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac


@dataclass(frozen=True)
class LaunchSession:
    """What the owner keeps (keys, policy) and sends (GODH certificate, blob) for one launch."""

    godh: SEVCertificate
    blob: SessionBlob
    keys: TransportKeys
    policy: GuestPolicy


def _policy_value(policy: GuestPolicy | int) -> int:
    return policy.value if isinstance(policy, GuestPolicy) else GuestPolicy(policy).value


def policy_mac(tik: bytes, policy: GuestPolicy | int) -> bytes:
    """HMAC-SHA256(TIK, u32le(policy)): binds the policy to the keys, so the host cannot swap it."""
    return hmac_sha256(tik, struct.pack("<I", _policy_value(policy)))


def wrap_session(
    z: bytes, keys: TransportKeys, policy: GuestPolicy | int, *, nonce: bytes, wrap_iv: bytes
) -> SessionBlob:
    """Builds the session blob from the ECDH secret Z (the key-agreement-free half of `create_session`)."""
    master = derive_master_secret(z, Nonce(nonce))
    wrap_tk = aes128_ctr(derive_kek(master), wrap_iv, keys.tek + keys.tik)
    return SessionBlob(
        nonce=bytes(nonce),
        wrap_tk=wrap_tk,
        wrap_iv=bytes(wrap_iv),
        wrap_mac=hmac_sha256(derive_kik(master), wrap_tk),
        policy_mac=policy_mac(keys.tik, policy),
    )


def unwrap_blob(z: bytes, blob: SessionBlob, policy: GuestPolicy | int) -> TransportKeys:
    """The firmware's check of a session blob given Z: wrap_mac before any decryption, then policy_mac."""
    master = derive_master_secret(z, Nonce(blob.nonce))
    if not hmac.compare_digest(hmac_sha256(derive_kik(master), blob.wrap_tk), blob.wrap_mac):
        raise VerificationFailed(
            Reason.BAD_WRAP_MAC, "session wrap_mac does not match (wrong PDH, GODH or blob)"
        )
    plain = aes128_ctr(derive_kek(master), blob.wrap_iv, blob.wrap_tk)
    keys = TransportKeys(plain[:TEK_SIZE], plain[TEK_SIZE:])
    if not hmac.compare_digest(policy_mac(keys.tik, policy), blob.policy_mac):
        raise VerificationFailed(Reason.BAD_POLICY_MAC, "session policy_mac does not match the guest policy")
    return keys


def _p384_public_key(cert: SEVCertificate, what: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, f"the {what} key must be ECDH P-384")
    return key


def _shared_z(private_key: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    z = private_key.exchange(ec.ECDH(), peer)
    if len(z) != Z_SIZE:  # pragma: no cover - P-384 always gives 48 bytes
        raise MalformedInput(Reason.BAD_LENGTH, "ECDH shared secret is not 48 bytes")
    return z


def create_session(
    pdh: SEVCertificate,
    policy: GuestPolicy | int,
    *,
    keys: TransportKeys | None = None,
    godh_private_key: ec.EllipticCurvePrivateKey | None = None,
    nonce: bytes | None = None,
    wrap_iv: bytes | None = None,
) -> LaunchSession:
    """The owner's side of LAUNCH_START, against a PDH taken from a verified chain.

    Every optional argument defaults to fresh randomness; they are parameters only so tests and known
    answers can pin them. The GODH is an unsigned SEV certificate (usage PDH, algo ECDH-SHA256): the
    firmware does not check its signatures, only uses its key.
    """
    from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage

    if pdh.usage != Usage.PDH:
        raise VerificationFailed(
            Reason.WRONG_USAGE, "session key agreement needs a PDH certificate", link="PDH"
        )
    pdh_key = _p384_public_key(pdh, "PDH")
    guest_policy = policy if isinstance(policy, GuestPolicy) else GuestPolicy(policy)
    if godh_private_key is None:
        godh_private_key = ec.generate_private_key(ec.SECP384R1())
    elif not isinstance(godh_private_key.curve, ec.SECP384R1):
        raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, "the GODH key must be P-384")
    keys = keys if keys is not None else TransportKeys.generate()
    blob = wrap_session(
        _shared_z(godh_private_key, pdh_key),
        keys,
        guest_policy,
        nonce=nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE),
        wrap_iv=wrap_iv if wrap_iv is not None else secrets.token_bytes(WRAP_IV_SIZE),
    )
    godh = SEVCertificate.for_ec_key(
        usage=Usage.PDH,
        algorithm=Algorithm.ECDH_SHA256,
        public_key=godh_private_key.public_key(),
        api_major=pdh.api_major,
        api_minor=pdh.api_minor,
    )
    return LaunchSession(godh=godh, blob=blob, keys=keys, policy=guest_policy)


def unwrap_session(
    pdh_private_key: ec.EllipticCurvePrivateKey,
    godh: SEVCertificate,
    blob: SessionBlob,
    policy: GuestPolicy | int,
) -> TransportKeys:
    """The firmware's side of LAUNCH_START: recovers TEK/TIK, or raises BAD_WRAP_MAC / BAD_POLICY_MAC."""
    godh_key = _p384_public_key(godh, "GODH")
    return unwrap_blob(_shared_z(pdh_private_key, godh_key), blob, policy)
