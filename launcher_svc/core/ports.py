"""What the launch core needs from the outside world, as structural protocols.

* `Hypervisor`: libvirt (real) or libvirt's test driver plus the firmware emulator (emulated). Methods
  are blocking (libvirt-python is); the core runs them in worker threads.
* `PlatformPort`: the host's platform_svc (certificate chain; for SEV-SNP, its SNP status and VCEK chain).
* `OwnerPort`: the guest owner's owner_svc (session, secret; for SEV-SNP, the launch's authorisation and
  the guest's attestation verdict), reached at an endpoint the request names.

The chain is `PlatformChain`, forwarded to the owner as the platform sent it (the owner verifies it);
the secret is `ReleasedSecret`, whose repr hides its bytes so that it cannot end up in a log by accident.
The hypervisor gets the launch's `FirmwareImage` and `SecretArea` as preflight found them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from launcher_svc.core.preflight import FirmwareImage, SecretArea
from sevlaunch.sev.kernel_hashes import KernelHashes


@dataclass(frozen=True)
class SevCapabilities:
    cbitpos: int
    reduced_phys_bits: int
    max_guests: int  # SEV (non-ES) ASIDs
    max_es_guests: int  # SEV-ES ASIDs


@dataclass(frozen=True)
class SnpCapabilities:
    """What an SEV-SNP launch needs of the host. SNP guests take their ASIDs from the SEV-ES range."""

    cbitpos: int
    reduced_phys_bits: int
    max_snp_guests: int
    guest_features: int  # the VMSA SEV_FEATURES this host's QEMU sets (its launch digests depend on it)


@dataclass(frozen=True)
class LaunchSecurityInfo:
    """`virDomainGetLaunchSecurityInfo` of a paused SEV guest."""

    measurement: bytes  # 48 bytes: measure || mnonce
    api_major: int
    api_minor: int
    build_id: int
    policy: int


class DomainState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    OTHER = "other"


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: DomainState
    sev: bool  # any SEV launch security (SEV, SEV-ES or SEV-SNP)
    sev_es: bool  # holds an SEV-ES ASID: SEV-ES, and SEV-SNP (whose ASIDs are in the same range)
    launch_id: str | None  # from our <metadata>; None for domains the launcher did not create
    snp: bool = False

    @property
    def active(self) -> bool:
        return self.state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.OTHER)


class LifecycleKind(StrEnum):
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    CRASHED = "crashed"
    UNDEFINED = "undefined"
    OTHER = "other"


LifecycleHandler = Callable[[str, LifecycleKind], None]


class Hypervisor(Protocol):
    def sev_capabilities(self) -> SevCapabilities:
        """cbitpos, reducedPhysBits and the ASID limits; raises if the host cannot run SEV guests."""
        ...

    def define(self, xml: str) -> str:
        """Defines (persistently) a domain; returns its UUID. libvirt's parser validates the XML."""
        ...

    def start_paused(self, name: str, firmware: FirmwareImage) -> None:
        """Starts the domain paused: LAUNCH_START, LAUNCH_UPDATE_*, LAUNCH_MEASURE happen here.
        `firmware` is the image the domain's loader names, as preflight read it."""
        ...

    def launch_security_info(self, name: str) -> LaunchSecurityInfo: ...

    def snp_capabilities(self) -> SnpCapabilities:
        """cbitpos, reducedPhysBits, SNP ASIDs, guest features; raises `snp_unsupported` (or, for
        libvirt before 10.5, `snp_unsupported_by_libvirt`) when the host cannot launch SNP guests."""
        ...

    def start_snp(self, name: str, firmware: FirmwareImage) -> None:
        """Starts an SEV-SNP domain running: SNP_LAUNCH_START, SNP_LAUNCH_UPDATE and SNP_LAUNCH_FINISH
        (with the XML's ID block, ID auth and HOST_DATA) happen here. A firmware refusal is
        FailedPrecondition `snp_launch_refused`; the caller destroys the domain."""
        ...

    def inject_secret(self, name: str, header: bytes, payload: bytes, area: SecretArea) -> None:
        """LAUNCH_SECRET into `area` (QEMU finds a declared area by itself)."""
        ...

    def resume(self, name: str) -> None:
        """LAUNCH_FINISH and run."""
        ...

    def destroy(self, name: str) -> bool:
        """Destroys (if active) and undefines; frees the firmware guest context. False if no such domain."""
        ...

    def list_domains(self) -> list[DomainInfo]: ...

    def set_lifecycle_handler(self, handler: LifecycleHandler | None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PlatformChain:
    """platform_svc's certificate chain (common.proto `CertificateChain`), forwarded to the owner as sent:
    the owner verifies it, the launcher only carries it."""

    pdh_cert: bytes
    pek_cert: bytes
    oca_cert: bytes
    cek_cert: bytes
    ask_cert: bytes
    ark_cert: bytes


@dataclass(frozen=True)
class SnpPlatformStatus:
    """platform.proto `GetSnpStatusResponse`, as the launcher forwards it. TCB versions are the
    firmware's raw u64s: their layout depends on the product."""

    product: str  # "Milan", "Genoa", "Turin": which VCEK layout and which pinned ARK apply
    api_major: int
    api_minor: int
    build_id: int
    current_tcb: int
    reported_tcb: int
    committed_tcb: int | None  # None when the platform cannot tell
    mask_chip_id: bool
    guest_count: int
    hwid: str  # lower hex, as the KDS addresses the chip


@dataclass(frozen=True)
class SnpPlatformEvidence:
    """The SNP status and the VEK chain of the reported TCB (`GetVekChainResponse`), forwarded to the
    owner as sent: the owner verifies it (chain to its pinned ARK, TCB floors); the launcher only
    carries it."""

    status: SnpPlatformStatus
    vek_type: str  # "vcek" | "vlek"
    vek_der: bytes  # the VCEK (or the VLEK) of the reported TCB
    ask_der: bytes  # the ASK (or the ASVK for a VLEK)
    ark_der: bytes
    vek_tcb: int  # the reported TCB the VEK was issued for (raw u64)


class PlatformPort(Protocol):
    async def certificate_chain(self) -> PlatformChain: ...

    async def snp_evidence(self) -> SnpPlatformEvidence:
        """platform.proto `GetSnpStatus` and `GetVekChain`: the status and the chain of its TCB."""
        ...


@dataclass(frozen=True)
class OwnerSession:
    session_id: str
    godh_cert: bytes
    session: bytes
    policy: int


@dataclass(frozen=True)
class ReleasedSecret:
    """The owner's LAUNCH_SECRET packet, or its explicit agreement to run without one (`no_secret`,
    owner.proto's `ReleaseSecretResponse.no_secret`; header and payload are then empty). Empty blobs
    alone are never consent."""

    header: bytes = field(default=b"", repr=False)
    payload: bytes = field(default=b"", repr=False)
    no_secret: bool = False


@dataclass(frozen=True)
class SnpLaunchConfig:
    """The launch the launcher asks the owner to authorise: everything that fixes its launch digest
    except the image's bytes, which the owner knows from its signed reference values (the firmware
    checks the result at SNP_LAUNCH_FINISH: a host that swapped the image is refused there)."""

    firmware_sha256: str  # of the image the launcher will load, for the owner's records and checks
    vcpus: int
    vcpu_type: str
    guest_features: int
    vmm_type: str  # "QEMU"
    policy: int  # the 64-bit guest policy the spec asks for
    # With a kernel: the table QEMU measures through the OVMF's SNP_KERNEL_HASHES page (the SHA-256 of
    # the kernel, the initrd and the command line); None without one.
    kernel_hashes: KernelHashes | None = None


@dataclass(frozen=True)
class SnpAuthorization:
    """The owner's authorisation of one SNP launch. Nothing here is secret: the ID key and author key
    stay with the owner; their signatures and public keys are in the ID auth."""

    authorization_id: str
    id_block: bytes = field(repr=False)  # 96 bytes
    id_auth: bytes = field(repr=False)  # 4096 bytes
    author_key: bool  # AUTHOR_KEY_EN: the ID auth carries an author key and its signature
    policy: int
    host_data: bytes = field(repr=False)  # 32 bytes: SHA-256 of `init_data`
    init_data: bytes = field(repr=False)  # the canonical init data the guest reads


class AttestationState(StrEnum):
    PENDING = "pending"  # no verified report yet
    RELEASED = "released"  # the report verified and the secret was released to the guest
    REFUSED = "refused"  # the attestation failed; `reason` says why


@dataclass(frozen=True)
class AttestationVerdict:
    state: AttestationState
    reason: str = ""  # with REFUSED: the owner's reason (e.g. tcb_below_minimum)
    detail: str = ""


class OwnerPort(Protocol):
    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: PlatformChain, policy: int
    ) -> OwnerSession: ...

    async def release_secret(
        self,
        endpoint: str,
        *,
        session_id: str,
        measurement: bytes,
        api_major: int,
        api_minor: int,
        build_id: int,
        policy: int,
    ) -> ReleasedSecret: ...

    async def authorize_snp_launch(
        self,
        endpoint: str,
        *,
        workload_id: str,
        platform: SnpPlatformEvidence,
        config: SnpLaunchConfig,
    ) -> SnpAuthorization:
        """owner.proto `AuthorizeSnpLaunch`: the ID block, ID auth, policy and init data of this launch."""
        ...

    async def snp_attestation(self, endpoint: str, *, authorization_id: str) -> AttestationVerdict:
        """owner.proto `GetSnpAttestation`: where the guest of this authorisation stands."""
        ...

    async def revoke_snp_authorization(self, endpoint: str, *, authorization_id: str) -> None:
        """owner.proto `RevokeSnpAuthorization` of an authorisation this launcher got, for a launch it
        gave up before RUNNING: no guest can attest for it afterwards."""
        ...

    async def close(self) -> None: ...
