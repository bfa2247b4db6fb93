"""What is checked before anything is defined or anyone is called, parsed once for the whole launch.

* The firmware image is read once: its OVMF footer decides whether the launch can go ahead (hashes table
  for a kernel, SEV-ES reset block, a secret area or a configured address), and the findings (bytes,
  SHA-256, secret area) travel with the launch to the hypervisor, which neither re-reads nor re-parses.
  Its layout also decides how QEMU loads it (`launcher_svc.core.loader`: pflash or ROM), and an image
  QEMU could not load that way is refused here rather than after the domain was defined.
* The GODH and the session blob become `sevlaunch.sev` types (`SEVCertificate`, `SessionBlob`) here, for
  both flows: the two-phase flow's client and the orchestrated flow's owner send the same structures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from launcher_svc.core.loader import LoaderType, choose_loader, loadable_problem
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import FailedPrecondition, InvalidArgument
from sevlaunch.sev.cert import CERT_SIZE as GODH_SIZE
from sevlaunch.sev.cert import Algorithm, Curve, ECKey, SEVCertificate, Usage
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.ovmf import OVMF
from sevlaunch.sev.secret import DEFAULT_SECRET_AREA_SIZE
from sevlaunch.sev.session import SESSION_BLOB_SIZE as SESSION_SIZE
from sevlaunch.sev.session import SessionBlob
from sevlaunch.sev.technology import Technology
from sevlaunch.snp.metadata import SectionType, SnpFirmware

MAX_FIRMWARE_READ = 64 << 20


@dataclass(frozen=True)
class SecretArea:
    """Where LAUNCH_SECRET writes: the area the OVMF declares (QEMU finds it by itself), or the
    configured `--secret-gpa` for an OVMF that declares none (libvirt then passes the address)."""

    gpa: int
    size: int
    declared: bool


@dataclass(frozen=True)
class FirmwareImage:
    """The firmware image as preflight read it: the one read of the launch."""

    path: str
    data: bytes = field(repr=False)
    sha256: str
    ovmf: OVMF = field(repr=False)


@dataclass(frozen=True)
class Preflight:
    firmware: FirmwareImage
    secret_area: SecretArea | None  # None only for a launch that asked to run without a secret
    loader: LoaderType  # how QEMU loads the image (launcher_svc.core.loader)


@dataclass(frozen=True)
class SessionMaterial:
    """The owner's GODH and launch session blob, parsed (both public: the TEK/TIK inside are wrapped)."""

    godh: SEVCertificate
    session: SessionBlob


def read_firmware(path: str) -> FirmwareImage:
    try:
        with open(Path(path), "rb") as fh:
            data = fh.read(MAX_FIRMWARE_READ + 1)
    except OSError:
        raise InvalidArgument(LaunchReason.BAD_PATH, "firmware image cannot be read") from None
    try:
        ovmf = OVMF.from_bytes(data)
    except SevError as exc:
        raise InvalidArgument(LaunchReason.BAD_FIRMWARE, str(exc)) from None
    return FirmwareImage(path=path, data=data, sha256=hashlib.sha256(data).hexdigest(), ovmf=ovmf)


def preflight(spec: GuestSpec, *, secret_gpa: int | None) -> Preflight:
    """What the firmware image allows for `spec`; `secret_gpa` is the configured `--secret-gpa`."""
    image = read_firmware(spec.firmware_path)
    loader = choose_loader(image.data, spec.mode)
    area: SecretArea | None = None  # an SNP guest has none: its secret goes to the guest itself
    if spec.mode is Technology.SEV_SNP:
        _preflight_snp(spec, image)
    else:
        area = _preflight_sev(spec, image, secret_gpa)
    # Last, so that a firmware lacking what the technology needs is named for that first.
    problem = loadable_problem(len(image.data), loader)
    if problem is not None:
        # QEMU would refuse it at start ("could not load PC BIOS"), after the domain was defined.
        raise FailedPrecondition(LaunchReason.FIRMWARE_NOT_LOADABLE, problem)
    return Preflight(image, area, loader)


def _preflight_sev(spec: GuestSpec, image: FirmwareImage, secret_gpa: int | None) -> SecretArea | None:
    ovmf = image.ovmf
    if spec.kernel_path is not None and ovmf.hashes_table is None:
        # Without a hashes table the kernel would run unmeasured (PROTOCOL.md section 7).
        raise FailedPrecondition(
            LaunchReason.NO_HASHES_TABLE, "a kernel needs an OVMF with a kernel hashes table"
        )
    if spec.mode is Technology.SEV_ES and ovmf.sev_es_reset_eip is None:
        raise FailedPrecondition(LaunchReason.NO_SEV_ES_RESET_BLOCK, "the OVMF cannot boot SEV-ES guests")
    if ovmf.secret_area is not None:
        gpa, size = ovmf.secret_area
        return SecretArea(gpa, size, declared=True)
    if secret_gpa is not None:
        return SecretArea(secret_gpa, DEFAULT_SECRET_AREA_SIZE, declared=False)
    if spec.launch_without_secret:
        return None
    raise FailedPrecondition(
        LaunchReason.NO_SECRET_AREA,
        "the OVMF declares no secret area and no secret guest physical address is configured",
    )


def _preflight_snp(spec: GuestSpec, image: FirmwareImage) -> None:
    """An SNP guest needs the OVMF's SEV metadata (its secrets and CPUID pages and the pre-validated
    memory QEMU launches: without them OVMF cannot boot under SNP) and, for a kernel, its
    SNP_KERNEL_HASHES page. No secret area: the owner releases an SNP guest's secret to the guest."""
    try:
        firmware = SnpFirmware.from_bytes(image.data)
    except SevError as exc:
        raise InvalidArgument(LaunchReason.BAD_FIRMWARE, str(exc)) from None
    if firmware.metadata is None or firmware.sev_es_reset_eip is None:
        raise FailedPrecondition(
            LaunchReason.NO_SNP_METADATA, "the OVMF has no SEV metadata: it cannot boot SEV-SNP guests"
        )
    if spec.kernel_path is not None and not firmware.metadata.has(SectionType.SNP_KERNEL_HASHES):
        raise FailedPrecondition(
            LaunchReason.NO_HASHES_TABLE, "an SEV-SNP kernel needs an OVMF with an SNP_KERNEL_HASHES page"
        )


def parse_godh(godh_cert: bytes) -> SEVCertificate:
    """The GODH, if the firmware could use it: a SEV certificate for a PDH (usage 0x1003) with an ECDH
    algorithm and a P-384 public key on its curve; else InvalidArgument bad_godh."""
    if len(godh_cert) != GODH_SIZE:
        raise InvalidArgument(LaunchReason.BAD_GODH, f"the GODH certificate is {GODH_SIZE} bytes")
    try:
        cert = SEVCertificate.from_bytes(godh_cert)
    except SevError as exc:
        raise InvalidArgument(
            LaunchReason.BAD_GODH, f"the GODH certificate does not parse: {exc.detail}"
        ) from None
    if cert.usage is not Usage.PDH:
        raise InvalidArgument(
            LaunchReason.BAD_GODH, f"the GODH certificate is for a {cert.usage.name} key, not a PDH"
        )
    if cert.algorithm not in (Algorithm.ECDH_SHA256, Algorithm.ECDH_SHA384):
        raise InvalidArgument(LaunchReason.BAD_GODH, f"the GODH algorithm is {cert.algorithm.name}, not ECDH")
    if not isinstance(cert.key, ECKey) or cert.key.curve is not Curve.P384:
        raise InvalidArgument(LaunchReason.BAD_GODH, "the GODH key is not an EC P-384 key")
    try:
        cert.public_key()
    except SevError as exc:
        raise InvalidArgument(
            LaunchReason.BAD_GODH, f"the GODH public key does not load: {exc.detail}"
        ) from None
    if cert.to_bytes() != godh_cert:
        # What reaches the firmware is what was checked: the bytes must be the certificate's own.
        raise InvalidArgument(LaunchReason.BAD_GODH, "the GODH certificate does not round-trip")
    return cert


def parse_session(session: bytes) -> SessionBlob:
    """The launch session blob; InvalidArgument bad_session if it does not parse."""
    if len(session) != SESSION_SIZE:
        raise InvalidArgument(LaunchReason.BAD_SESSION, f"the session blob is {SESSION_SIZE} bytes")
    try:
        return SessionBlob.from_bytes(session)
    except SevError as exc:
        raise InvalidArgument(
            LaunchReason.BAD_SESSION, f"the session blob does not parse: {exc.detail}"
        ) from None


def parse_session_material(godh_cert: bytes, session: bytes) -> SessionMaterial:
    return SessionMaterial(parse_godh(godh_cert), parse_session(session))
