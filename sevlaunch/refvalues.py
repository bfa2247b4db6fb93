"""Reference values: signed manifests of launch digests, in DSSE envelopes (gRPC-free).

A firmware publisher (a distro) computes the launch digest of each firmware build and configuration it
supports (SEV; SEV-ES per vCPU count, vCPU type and VMSA layout; SEV-SNP per vCPU count, vCPU type, guest
features and VMM type, 48-byte digests with the ID block's family and image id, guest SVN and minimum TCB
per product in the manifest's `snp` section; with or without kernel hashes), lists them
in a JSON manifest with a validity window, and signs the manifest in a DSSE envelope
(https://github.com/secure-systems-lab/dsse, "DSSEv1" pre-authentication encoding) with ECDSA P-256
(SHA-256, DER signature) or Ed25519. The owner accepts a digest only from a manifest that

* is signed by one of the publisher keys it was configured with (`verify_envelope`),
* parses strictly as this module's manifest schema (unknown fields are refused, not ignored),
* is within its validity window at the time of use, and
* is not revoked (by its id, the SHA-256 of its payload).

Several manifests may be in force at once, which is how a provider rolls a firmware update across hosts.
Verifiers raise `VerificationFailed` or `MalformedInput` (STYLE.md rule 4); none returns a bool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sevlaunch.sev.errors import MalformedInput, Reason, VerificationFailed
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.reference import SnpReference

PAYLOAD_TYPE = "application/vnd.sevlaunch.refvalues+json"
SCHEMA = "sevlaunch.refvalues/v1"
#: Envelopes above this size are refused before parsing: a manifest is a few KiB, and the envelope may
#: come from an HTTP server the owner does not control.
MAX_ENVELOPE_BYTES = 1 << 20
MAX_DIGESTS = 4096
SEV_DIGEST_SIZE = 32
SNP_DIGEST_SIZE = 48
SNP_MAX_VCPUS = 4096
#: VMM types as `sevlaunch.snp.vmsa.VmmType` spells them (sev-snp-measure's `--vmm-type`).
SNP_VMM_TYPES = ("QEMU", "ec2", "gce")

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class KeyType(StrEnum):
    ECDSA_P256 = "ecdsa-p256"
    ED25519 = "ed25519"


# --------------------------------------------------------------------------------------------- DSSE


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding: what is actually signed.

    "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, lengths as ASCII decimal of the byte length.
    Signing the PAE rather than the payload binds the payload type, so a signature over one kind of
    document cannot be replayed as another.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes

    def __repr__(self) -> str:
        return f"Signature(keyid={self.keyid!r})"


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Parses an envelope; anything malformed (too large, not JSON, nested too deeply, wrong types)
        raises MalformedInput, never another exception: the bytes may come from a remote server."""
        if len(data) > MAX_ENVELOPE_BYTES:
            raise MalformedInput(Reason.BAD_LENGTH, f"envelope larger than {MAX_ENVELOPE_BYTES} bytes")
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedInput(Reason.BAD_ENCODING, "envelope is not JSON") from None
        except RecursionError:
            # `[[[[...]]]]` nested deeper than the interpreter's stack: hostile, not a bug of ours.
            raise MalformedInput(Reason.BAD_ENCODING, "envelope JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise MalformedInput(Reason.BAD_FIELD, "envelope is not a JSON object")
        payload_type = obj.get("payloadType")
        payload_b64 = obj.get("payload")
        sigs = obj.get("signatures", [])
        if not isinstance(payload_type, str) or not isinstance(payload_b64, str):
            raise MalformedInput(Reason.BAD_FIELD, "envelope needs string payloadType and payload")
        if not isinstance(sigs, list):
            raise MalformedInput(Reason.BAD_FIELD, "envelope signatures is not a list")
        signatures = []
        for s in sigs:
            if not isinstance(s, dict) or not isinstance(s.get("sig"), str):
                raise MalformedInput(Reason.BAD_FIELD, "envelope signature needs a string sig")
            keyid = s.get("keyid", "")
            if not isinstance(keyid, str):
                raise MalformedInput(Reason.BAD_FIELD, "envelope signature keyid is not a string")
            signatures.append(Signature(keyid=keyid, sig=_b64decode(s["sig"], "signature")))
        return cls(payload_type, _b64decode(payload_b64, "payload"), tuple(signatures))

    def to_json(self) -> bytes:
        obj = {
            "payloadType": self.payload_type,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures
            ],
        }
        return json.dumps(obj, indent=2).encode("utf-8") + b"\n"


def _b64decode(value: str, what: str) -> bytes:
    try:
        # DSSE allows standard or URL-safe base64; normalise, then decode strictly.
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInput(Reason.BAD_ENCODING, f"envelope {what} is not base64") from None


@dataclass(frozen=True)
class PublisherKey:
    """A trusted publisher's public key. `keyid` is the SHA-256 of its SubjectPublicKeyInfo (DER)."""

    public_key: PublicKey
    name: str = ""

    @property
    def keyid(self) -> str:
        return key_id(self.public_key)

    @classmethod
    def from_pem(cls, data: bytes, name: str = "") -> PublisherKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise MalformedInput(
                Reason.BAD_ENCODING, f"publisher key {name!r} is not a PEM public key"
            ) from None
        return cls(_check_public_key(key), name)


def key_id(public_key: PublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _check_public_key(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, "publisher keys are ECDSA P-256 or Ed25519")


def generate_private_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(data: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise MalformedInput(Reason.BAD_ENCODING, "not an unencrypted PEM private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise MalformedInput(Reason.UNSUPPORTED_ALGORITHM, "signing keys are ECDSA P-256 or Ed25519")


def sign_envelope(payload: bytes, key: PrivateKey, payload_type: str = PAYLOAD_TYPE) -> Envelope:
    message = pae(payload_type, payload)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(message)
    else:
        sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return Envelope(payload_type, payload, (Signature(key_id(key.public_key()), sig),))


def _signature_valid(key: PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, message)
        else:
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_envelope(
    envelope: Envelope, trusted: Sequence[PublisherKey], *, payload_type: str = PAYLOAD_TYPE
) -> PublisherKey:
    """Returns the trusted key one of the envelope's signatures verifies under; raises otherwise.

    The keyid is an unauthenticated hint (DSSE), so every trusted key is tried on every signature. The
    keyid is only used to tell "a trusted key's signature that does not verify" (BAD_SIGNATURE: tampered
    payload or signature) from "signed, but by nobody we trust" (WRONG_SIGNER).
    """
    if not trusted:
        # Deny by default: no configured publisher means no reference value is trusted.
        raise VerificationFailed(Reason.WRONG_SIGNER, "no publisher key is trusted")
    if envelope.payload_type != payload_type:
        raise VerificationFailed(
            Reason.BAD_MANIFEST, f"payloadType {envelope.payload_type!r}, expected {payload_type!r}"
        )
    if not envelope.signatures:
        raise VerificationFailed(Reason.MISSING_SIGNATURE, "the envelope is not signed")
    message = pae(envelope.payload_type, envelope.payload)
    for signature in envelope.signatures:
        for key in trusted:
            if _signature_valid(key.public_key, signature.sig, message):
                return key
    trusted_ids = {k.keyid for k in trusted}
    if any(s.keyid in trusted_ids for s in envelope.signatures):
        raise VerificationFailed(Reason.BAD_SIGNATURE, "a trusted publisher's signature does not verify")
    raise VerificationFailed(Reason.WRONG_SIGNER, "not signed by any trusted publisher key")


# ----------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class KernelHashes:
    """SHA-256 (hex) of the kernel, initrd and command line (with its NUL) measured by QEMU."""

    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class DigestConfig:
    """The launch configuration that yields one launch digest.

    `vcpus`, `vcpu_type` and `vmsa_layout` only matter (and are only set) for SEV-ES, where every
    vCPU's VMSA is measured. SEV-SNP digests (48 bytes) also depend on the vCPU count and type, and on the
    guest features (the VMSA's SEV_FEATURES) and the VMM type they were computed for; `vcpu_type` may be
    left out under EC2 and GCE, whose VMSAs do not carry the vCPU's signature.
    """

    mode: Technology
    vcpus: int | None = None
    vcpu_type: str | None = None
    vmsa_layout: str | None = None
    kernel_hashes: KernelHashes | None = None
    guest_features: int | None = None
    vmm_type: str | None = None

    def __post_init__(self) -> None:
        if self.mode is Technology.SEV_SNP:
            _check_snp_config(self)
            return
        if self.guest_features is not None or self.vmm_type is not None:
            raise MalformedInput(Reason.BAD_FIELD, "guest_features and vmm_type are for SEV-SNP digests only")
        if self.mode is Technology.SEV_ES:
            if self.vcpus is None or not 1 <= self.vcpus <= 512:
                raise MalformedInput(Reason.BAD_FIELD, "an SEV-ES digest needs vcpus in 1..512")
            if not self.vcpu_type or not self.vmsa_layout:
                raise MalformedInput(Reason.BAD_FIELD, "an SEV-ES digest needs vcpu_type and vmsa_layout")
        elif self.vcpus is not None or self.vcpu_type is not None or self.vmsa_layout is not None:
            raise MalformedInput(Reason.BAD_FIELD, "an SEV digest takes no vcpus, vcpu_type or vmsa_layout")

    @property
    def digest_size(self) -> int:
        return SNP_DIGEST_SIZE if self.mode is Technology.SEV_SNP else SEV_DIGEST_SIZE

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mode": self.mode.value}
        if self.mode is Technology.SEV_ES:
            obj.update(vcpus=self.vcpus, vcpu_type=self.vcpu_type, vmsa_layout=self.vmsa_layout)
        if self.mode is Technology.SEV_SNP:
            obj.update(vcpus=self.vcpus, guest_features=self.guest_features, vmm_type=self.vmm_type)
            if self.vcpu_type is not None:
                obj["vcpu_type"] = self.vcpu_type
        if self.kernel_hashes is not None:
            kh = self.kernel_hashes
            obj["kernel_hashes"] = {"kernel": kh.kernel, "initrd": kh.initrd, "cmdline": kh.cmdline}
        return obj

    @classmethod
    def from_obj(cls, obj: object) -> DigestConfig:
        o = _object(
            obj,
            "config",
            required={"mode"},
            optional={"vcpus", "vcpu_type", "vmsa_layout", "kernel_hashes", "guest_features", "vmm_type"},
        )
        if not isinstance(o["mode"], str) or o["mode"] not in {t.value for t in Technology}:
            raise MalformedInput(Reason.BAD_FIELD, "config mode must be 'sev', 'sev-es' or 'sev-snp'")
        mode = Technology(o["mode"])
        kh = None
        if "kernel_hashes" in o:
            k = _object(o["kernel_hashes"], "kernel_hashes", required={"kernel", "initrd", "cmdline"})
            kh = KernelHashes(
                *(_hex(k[n], f"kernel_hashes.{n}", 32).hex() for n in ("kernel", "initrd", "cmdline"))
            )
        for name in ("vcpus", "guest_features"):
            value = o.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise MalformedInput(Reason.BAD_FIELD, f"config {name} must be an integer")
        return cls(
            mode=mode,
            vcpus=o.get("vcpus"),
            vcpu_type=_opt_str(o.get("vcpu_type"), "vcpu_type"),
            vmsa_layout=_opt_str(o.get("vmsa_layout"), "vmsa_layout"),
            kernel_hashes=kh,
            guest_features=o.get("guest_features"),
            vmm_type=_opt_str(o.get("vmm_type"), "vmm_type"),
        )


def _check_snp_config(cfg: DigestConfig) -> None:
    if cfg.vcpus is None or isinstance(cfg.vcpus, bool) or not 1 <= cfg.vcpus <= SNP_MAX_VCPUS:
        raise MalformedInput(Reason.BAD_FIELD, f"an SEV-SNP digest needs vcpus in 1..{SNP_MAX_VCPUS}")
    if cfg.vmsa_layout is not None:
        raise MalformedInput(Reason.BAD_FIELD, "an SEV-SNP digest takes no vmsa_layout")
    features = cfg.guest_features
    if features is None or isinstance(features, bool) or not 0 <= features < 1 << 64 or not features & 1:
        raise MalformedInput(
            Reason.BAD_FIELD, "an SEV-SNP digest needs guest_features, a u64 with bit 0 (SNPActive) set"
        )
    if cfg.vmm_type not in SNP_VMM_TYPES:
        raise MalformedInput(Reason.BAD_FIELD, f"an SEV-SNP digest needs vmm_type, one of {SNP_VMM_TYPES}")
    if cfg.vmm_type == "QEMU" and not cfg.vcpu_type:
        raise MalformedInput(Reason.BAD_FIELD, "an SEV-SNP digest under QEMU needs vcpu_type")
    if cfg.vcpu_type is not None and not 0 < len(cfg.vcpu_type) <= 64:
        raise MalformedInput(Reason.BAD_FIELD, "vcpu_type must be 1..64 characters")


@dataclass(frozen=True)
class ReferenceDigest:
    launch_digest: bytes
    config: DigestConfig

    def __post_init__(self) -> None:
        size = self.config.digest_size
        if len(self.launch_digest) != size:
            raise MalformedInput(
                Reason.BAD_LENGTH, f"a {self.config.mode.value} launch digest is {size} bytes"
            )


@dataclass(frozen=True)
class Manifest:
    publisher: str
    firmware_name: str
    firmware_version: str
    not_before: datetime
    not_after: datetime
    digests: tuple[ReferenceDigest, ...]
    firmware_sha256: str | None = None
    #: Ids (payload SHA-256, hex) of earlier manifests this one withdraws, e.g. a firmware build with a
    #: known flaw. Honoured only from a manifest signed by a trusted key.
    revokes: tuple[str, ...] = ()
    issued_at: datetime | None = None
    #: The SEV-SNP facts vouched for with the SNP digests (`sevlaunch.snp.reference`): required exactly
    #: when the manifest lists an SNP digest. Manifests without one encode as they always did.
    snp: SnpReference | None = None

    def __post_init__(self) -> None:
        for name in ("publisher", "firmware_name", "firmware_version"):
            value = getattr(self, name)
            if not value or len(value) > 256:
                raise MalformedInput(Reason.BAD_FIELD, f"manifest {name} must be 1..256 characters")
        for t in (self.not_before, self.not_after):
            if t.tzinfo is None:
                raise MalformedInput(Reason.BAD_FIELD, "manifest times need a time zone")
        if self.not_after <= self.not_before:
            raise MalformedInput(Reason.BAD_FIELD, "manifest not_after is not after not_before")
        if not self.digests:
            # An empty manifest would be harmless, but it is certainly a mistake of the publisher.
            raise MalformedInput(Reason.BAD_FIELD, "manifest lists no launch digest")
        if len(self.digests) > MAX_DIGESTS:
            raise MalformedInput(Reason.BAD_FIELD, f"manifest lists more than {MAX_DIGESTS} digests")
        for rid in self.revokes:
            if not re.fullmatch(r"[0-9a-f]{64}", rid):
                raise MalformedInput(Reason.BAD_FIELD, "manifest revokes entries are SHA-256 hex ids")
        has_snp = any(d.config.mode is Technology.SEV_SNP for d in self.digests)
        if has_snp != (self.snp is not None):
            raise MalformedInput(
                Reason.BAD_FIELD, "a manifest has an snp section exactly when it lists SEV-SNP digests"
            )

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "schema": SCHEMA,
            "publisher": self.publisher,
            "firmware": {"name": self.firmware_name, "version": self.firmware_version},
            "not_before": _fmt_time(self.not_before),
            "not_after": _fmt_time(self.not_after),
            "digests": [
                {"launch_digest": d.launch_digest.hex(), "config": d.config.to_obj()} for d in self.digests
            ],
        }
        if self.firmware_sha256 is not None:
            obj["firmware"]["sha256"] = self.firmware_sha256
        if self.revokes:
            obj["revokes"] = list(self.revokes)
        if self.issued_at is not None:
            obj["issued_at"] = _fmt_time(self.issued_at)
        if self.snp is not None:
            obj["snp"] = self.snp.to_obj()
        return json.dumps(obj, indent=2, sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise MalformedInput(Reason.BAD_LENGTH, f"manifest larger than {MAX_ENVELOPE_BYTES} bytes")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MalformedInput(Reason.BAD_MANIFEST, "manifest is not JSON") from None
        except RecursionError:
            raise MalformedInput(Reason.BAD_MANIFEST, "manifest JSON is nested too deeply") from None
        o = _object(
            raw,
            "manifest",
            required={"schema", "publisher", "firmware", "not_before", "not_after", "digests"},
            optional={"revokes", "issued_at", "snp"},
        )
        if o["schema"] != SCHEMA:
            raise MalformedInput(Reason.BAD_MANIFEST, f"manifest schema must be {SCHEMA!r}")
        fw = _object(o["firmware"], "firmware", required={"name", "version"}, optional={"sha256"})
        digests_raw = o["digests"]
        if not isinstance(digests_raw, list):
            raise MalformedInput(Reason.BAD_MANIFEST, "manifest digests is not a list")
        digests = []
        for d in digests_raw:
            do = _object(d, "digest", required={"launch_digest", "config"})
            config = DigestConfig.from_obj(do["config"])
            digests.append(
                ReferenceDigest(_hex(do["launch_digest"], "launch_digest", config.digest_size), config)
            )
        revokes = o.get("revokes", [])
        if not isinstance(revokes, list) or not all(isinstance(r, str) for r in revokes):
            raise MalformedInput(Reason.BAD_MANIFEST, "manifest revokes is not a list of ids")
        sha = fw.get("sha256")
        return cls(
            publisher=_str(o["publisher"], "publisher"),
            firmware_name=_str(fw["name"], "firmware.name"),
            firmware_version=_str(fw["version"], "firmware.version"),
            firmware_sha256=None if sha is None else _hex(sha, "firmware.sha256", 32).hex(),
            not_before=_parse_time(o["not_before"], "not_before"),
            not_after=_parse_time(o["not_after"], "not_after"),
            digests=tuple(digests),
            revokes=tuple(revokes),
            issued_at=None if o.get("issued_at") is None else _parse_time(o["issued_at"], "issued_at"),
            snp=SnpReference.from_obj(o["snp"]) if "snp" in o else None,
        )


def manifest_id(payload: bytes) -> str:
    """A manifest's id: SHA-256 of the exact signed payload bytes (what `revokes` lists)."""
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class VerifiedManifest:
    id: str
    manifest: Manifest
    keyid: str
    envelope: bytes = field(repr=False)

    def check_valid_at(self, now: datetime) -> None:
        if now < self.manifest.not_before:
            raise VerificationFailed(Reason.EXPIRED, f"manifest {self.id[:16]} is not valid yet")
        if now >= self.manifest.not_after:
            raise VerificationFailed(Reason.EXPIRED, f"manifest {self.id[:16]} has expired")


def verify_manifest(
    envelope_json: bytes,
    trusted: Sequence[PublisherKey],
    *,
    now: datetime | None,
    revoked: Iterable[str] = (),
) -> VerifiedManifest:
    """Verifies a DSSE envelope holding a manifest: signature, schema, validity at `now`, revocation.

    The signature is checked before the payload is parsed, so unsigned data never reaches the parser.
    `now=None` skips the validity window only (for re-loading stored manifests, whose validity is
    checked again at each use).
    """
    envelope = Envelope.from_json(envelope_json)
    key = verify_envelope(envelope, trusted)
    manifest = Manifest.from_json(envelope.payload)
    mid = manifest_id(envelope.payload)
    if mid in set(revoked):
        raise VerificationFailed(Reason.REVOKED, f"manifest {mid[:16]} is revoked")
    if mid in manifest.revokes:
        raise MalformedInput(Reason.BAD_MANIFEST, "a manifest cannot revoke itself")
    verified = VerifiedManifest(mid, manifest, key.keyid, envelope_json)
    if now is not None:
        verified.check_valid_at(now)
    return verified


def make_manifest(
    *,
    publisher: str,
    firmware_name: str,
    firmware_version: str,
    digests: Sequence[ReferenceDigest],
    valid_days: int,
    now: datetime | None = None,
    firmware_sha256: str | None = None,
    revokes: Sequence[str] = (),
    snp: SnpReference | None = None,
) -> Manifest:
    if valid_days <= 0:
        raise MalformedInput(Reason.BAD_FIELD, "valid days must be positive")
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    return Manifest(
        publisher=publisher,
        firmware_name=firmware_name,
        firmware_version=firmware_version,
        firmware_sha256=firmware_sha256,
        not_before=issued,
        not_after=issued + timedelta(days=valid_days),
        digests=tuple(digests),
        revokes=tuple(revokes),
        issued_at=issued,
        snp=snp,
    )


# ------------------------------------------------------------------------------------- versions


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key for firmware versions such as "2023.11-6" or "edk2-stable202405".

    Digit runs compare as numbers and letter runs as text; a number sorts after text at the same place,
    so "1.10" > "1.9" and "2024.02" > "2023.11-6".
    """
    return tuple((1, int(t)) if t.isdigit() else (0, t) for t in re.findall(r"\d+|[A-Za-z]+", version))


def version_in_range(version: str, minimum: str | None, maximum: str | None) -> bool:
    """Inclusive range check; an absent bound is open on that side."""
    key = version_key(version)
    if minimum and key < version_key(minimum):
        return False
    return not (maximum and key > version_key(maximum))


# ------------------------------------------------------------------------------------ JSON helpers


def _object(obj: object, what: str, *, required: set[str], optional: Iterable[str] = ()) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} is not a JSON object")
    missing = required - obj.keys()
    if missing:
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} lacks {', '.join(sorted(missing))}")
    # Strict: a field this version does not know might carry a restriction it would silently drop.
    unknown = obj.keys() - required - set(optional)
    if unknown:
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} has unknown fields {', '.join(sorted(unknown))}")
    return obj


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} is not a string")
    return value


def _opt_str(value: object, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _hex(value: object, what: str, length: int) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]*", value):
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} is not hex")
    raw = bytes.fromhex(value)
    if len(raw) != length:
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} must be {length} bytes")
    return raw


def _parse_time(value: object, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(_str(value, what))
    except ValueError:
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise MalformedInput(Reason.BAD_MANIFEST, f"{what} needs a time zone")
    return t


def _fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
