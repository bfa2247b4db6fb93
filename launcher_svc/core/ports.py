"""What the launch core needs from the outside world, as structural protocols.

* `Hypervisor`: libvirt (real) or libvirt's test driver plus the firmware emulator (emulated). Methods
  are blocking (libvirt-python is); the core runs them in worker threads.
* `PlatformPort`: the host's platform_svc (certificate chain).
* `OwnerPort`: the guest owner's owner_svc (session, secret), reached at an endpoint the request names.

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


@dataclass(frozen=True)
class SevCapabilities:
    cbitpos: int
    reduced_phys_bits: int
    max_guests: int  # SEV (non-ES) ASIDs
    max_es_guests: int  # SEV-ES ASIDs


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
    sev: bool
    sev_es: bool
    launch_id: str | None  # from our <metadata>; None for domains the launcher did not create

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


class PlatformPort(Protocol):
    async def certificate_chain(self) -> PlatformChain: ...


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

    async def close(self) -> None: ...
