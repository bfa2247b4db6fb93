"""The PEK-signed attestation report of the ATTESTATION command (SEV API 0.23+; PROTOCOL.md section 10).

    0x00 mnonce[16]   0x10 launch_digest[32]   0x30 policy u32   0x34 sig_usage u32   0x38 sig_algo u32
    0x3C reserved u32   0x40 ECDSA P-384 signature: r[72] ‖ s[72], little-endian

The signature is by the PEK, ECDSA with SHA-256 over bytes [0x00, 0x34). It shows the launch digest in
clear, chained to the ARK through the PEK, independently of the TIK.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevlaunch.sev.cert import EC_COORD_SIZE, Algorithm, SEVCertificate, Usage
from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.types import LaunchDigest, MNonce

REPORT_SIZE = 0xD0
SIGNED_SIZE = 0x34
_LAYOUT = struct.Struct("<16s32sIIII144s")
assert _LAYOUT.size == REPORT_SIZE


@dataclass(frozen=True)
class AttestationReport:
    mnonce: MNonce
    launch_digest: LaunchDigest
    policy: int
    sig_usage: int = Usage.NONE
    sig_algo: int = Algorithm.NONE
    signature: bytes = field(default=bytes(2 * EC_COORD_SIZE), repr=False)
    reserved: int = 0

    def __post_init__(self) -> None:
        if len(self.mnonce) != 16 or len(self.launch_digest) != 32:
            raise MalformedInput(Reason.BAD_LENGTH, "mnonce is 16 bytes and the launch digest 32")
        if len(self.signature) != 2 * EC_COORD_SIZE:
            raise MalformedInput(Reason.BAD_LENGTH, "the report signature is r[72] || s[72]")
        for value in (self.policy, self.sig_usage, self.sig_algo, self.reserved):
            if not 0 <= value < 2**32:
                raise MalformedInput(Reason.BAD_FIELD, "report integers are u32")

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationReport:
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            reason = Reason.TRUNCATED if len(data) < REPORT_SIZE else Reason.BAD_LENGTH
            raise MalformedInput(reason, f"attestation report is {len(data)} bytes, not {REPORT_SIZE:#x}")
        mnonce, digest, policy, usage, algo, reserved, signature = _LAYOUT.unpack(data)
        return cls(
            mnonce=MNonce(mnonce),
            launch_digest=LaunchDigest(digest),
            policy=policy,
            sig_usage=usage,
            sig_algo=algo,
            reserved=reserved,
            signature=signature,
        )

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(
            self.mnonce,
            self.launch_digest,
            self.policy,
            self.sig_usage,
            self.sig_algo,
            self.reserved,
            self.signature,
        )

    def signed_bytes(self) -> bytes:
        return self.to_bytes()[:SIGNED_SIZE]

    def sign(self, pek_private_key: ec.EllipticCurvePrivateKey) -> AttestationReport:
        """A copy signed by the PEK (what the firmware does)."""
        der = pek_private_key.sign(self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(EC_COORD_SIZE, "little") + s.to_bytes(EC_COORD_SIZE, "little")
        return replace(self, sig_usage=Usage.PEK, sig_algo=Algorithm.ECDSA_SHA256, signature=signature)

    def verify(self, pek_cert: SEVCertificate) -> None:
        """Checks the PEK signature (raises VerificationFailed). Verify the PEK with its chain first."""
        if pek_cert.usage is not Usage.PEK:
            raise VerificationFailed(
                Reason.WRONG_USAGE, f"report signer is a {pek_cert.usage.name}, not the PEK"
            )
        if self.sig_usage != Usage.PEK or self.sig_algo != Algorithm.ECDSA_SHA256:
            raise VerificationFailed(
                Reason.WRONG_SIGNER, f"report signature usage {self.sig_usage:#x} algo {self.sig_algo:#x}"
            )
        key = pek_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise VerificationFailed(Reason.UNSUPPORTED_ALGORITHM, "the PEK is not an EC key")
        r = int.from_bytes(self.signature[:EC_COORD_SIZE], "little")
        s = int.from_bytes(self.signature[EC_COORD_SIZE:], "little")
        if r == 0 or s == 0:
            raise VerificationFailed(Reason.MISSING_SIGNATURE, "the report is not signed")
        try:
            key.verify(encode_dss_signature(r, s), self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationFailed(
                Reason.BAD_SIGNATURE, "PEK signature on the report does not verify"
            ) from None
