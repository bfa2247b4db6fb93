"""A hypervisor in memory: domains and firmware guest contexts, kept the way libvirt and the firmware
would. A call can be held at its start (`hold`) until the test lets it go (`let_go`), blocking its worker
thread the way a slow libvirt call does: once started it runs to its end, whatever the caller does."""

from __future__ import annotations

import threading
import uuid

from launcher_svc.core.domain_xml import parse_domain_xml
from launcher_svc.core.ports import (
    DomainInfo,
    DomainState,
    LaunchSecurityInfo,
    LifecycleHandler,
    SevCapabilities,
    SnpCapabilities,
)
from launcher_svc.core.preflight import FirmwareImage, SecretArea
from launcher_svc.core.reasons import LaunchReason
from sevlaunch.errors import FailedPrecondition, ServiceError

#: How long a held call waits at most for the test to let it go (a test that forgets does not hang).
HOLD_LIMIT = 10.0


class FakeHypervisor:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.domains: dict[str, DomainState] = {}
        self.xml: dict[str, str] = {}
        self.contexts: set[str] = set()  # names holding an ASID and a firmware guest context
        self.injected: list[tuple[str, bytes, bytes, int]] = []
        self.calls: list[str] = []  # calls begun, in order
        self.ended: list[str] = []  # calls returned, in order
        self.firmware_seen: list[FirmwareImage] = []
        self._gates: dict[str, threading.Event] = {}
        # SEV-SNP: what `snp_capabilities` raises (a host without SNP) and whether the firmware refuses
        # SNP_LAUNCH_FINISH at start (QEMU exits: no domain runs, no guest context stays).
        self.snp_unsupported: ServiceError | None = None
        self.refuse_snp_finish = False

    # -- holding calls ---------------------------------------------------------------------------

    def hold(self, what: str) -> None:
        """Calls to `what` from now on block at their start until `let_go(what)`."""
        self._gates[what] = threading.Event()

    def let_go(self, what: str) -> None:
        gate = self._gates.pop(what, None)
        if gate is not None:
            gate.set()

    def _begin(self, what: str) -> None:
        self.calls.append(what)
        gate = self._gates.get(what)
        if gate is not None:
            gate.wait(HOLD_LIMIT)

    def _end(self, what: str) -> None:
        self.ended.append(what)

    # -- the Hypervisor port ---------------------------------------------------------------------

    def sev_capabilities(self) -> SevCapabilities:
        return SevCapabilities(cbitpos=51, reduced_phys_bits=1, max_guests=16, max_es_guests=16)

    def define(self, xml: str) -> str:
        self._begin("define")
        name = parse_domain_xml(xml).domain_name
        with self.lock:
            self.domains[name] = DomainState.SHUTOFF
            self.xml[name] = xml
        self._end("define")
        return str(uuid.uuid4())

    def start_paused(self, name: str, firmware: FirmwareImage) -> None:
        with self.lock:
            if name not in self.domains:
                raise FailedPrecondition("domain_not_found", name)
        self.firmware_seen.append(firmware)
        # LAUNCH_START happens first: from here on the guest holds a firmware context...
        self._begin("start_paused")
        with self.lock:
            # ...and the call finishes what it started, as QEMU would.
            self.contexts.add(name)
            self.domains[name] = DomainState.PAUSED
            self.xml.setdefault(name, "")
        self._end("start_paused")

    def snp_capabilities(self) -> SnpCapabilities:
        if self.snp_unsupported is not None:
            raise self.snp_unsupported
        return SnpCapabilities(cbitpos=51, reduced_phys_bits=1, max_snp_guests=16, guest_features=0x1)

    def start_snp(self, name: str, firmware: FirmwareImage) -> None:
        with self.lock:
            if name not in self.domains:
                raise FailedPrecondition("domain_not_found", name)
        self.firmware_seen.append(firmware)
        self._begin("start_snp")
        if self.refuse_snp_finish:
            self._end("start_snp")
            raise FailedPrecondition(
                LaunchReason.SNP_LAUNCH_REFUSED,
                "the firmware refused SNP_LAUNCH_FINISH with BAD_MEASUREMENT",
                metadata={"firmware_status": "BAD_MEASUREMENT", "command": "SNP_LAUNCH_FINISH"},
            )
        with self.lock:
            self.contexts.add(name)
            self.domains[name] = DomainState.RUNNING
        self._end("start_snp")

    def launch_security_info(self, name: str) -> LaunchSecurityInfo:
        self._begin("launch_security_info")
        policy = parse_domain_xml(self.xml[name]).policy
        self._end("launch_security_info")
        return LaunchSecurityInfo(b"\x33" * 48, api_major=0, api_minor=24, build_id=1, policy=policy)

    def inject_secret(self, name: str, header: bytes, payload: bytes, area: SecretArea) -> None:
        self._begin("inject_secret")
        self.injected.append((name, header, payload, area.gpa))
        self._end("inject_secret")

    def resume(self, name: str) -> None:
        self._begin("resume")
        with self.lock:
            self.domains[name] = DomainState.RUNNING
        self._end("resume")

    def destroy(self, name: str) -> bool:
        self._begin("destroy")
        with self.lock:
            existed = self.domains.pop(name, None) is not None
            self.contexts.discard(name)
            self.xml.pop(name, None)
        self._end("destroy")
        return existed

    def list_domains(self) -> list[DomainInfo]:
        with self.lock:
            out = []
            for name, state in self.domains.items():
                snp = bool(self.xml.get(name)) and parse_domain_xml(self.xml[name]).snp
                out.append(DomainInfo(name, name, state, sev=True, sev_es=snp, launch_id=None, snp=snp))
            return out

    def set_lifecycle_handler(self, handler: LifecycleHandler | None) -> None:
        pass

    def close(self) -> None:
        pass
