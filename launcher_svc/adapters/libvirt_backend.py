"""The real hypervisor backend: libvirt-python against qemu:///system (or any URI).

The SEV calls are libvirt's own (PROTOCOL.md section 9): domain capabilities and virNodeGetSEVInfo for
cbitpos, reducedPhysBits and the ASID limits; defineXML; createWithFlags(VIR_DOMAIN_START_PAUSED), which
makes QEMU run LAUNCH_START/UPDATE/MEASURE; virDomainGetLaunchSecurityInfo; virDomainSetLaunchSecurityState
(LAUNCH_SECRET, with `sev-secret-set-address` when the OVMF declares no secret area); resume (LAUNCH_FINISH);
destroy and undefine; lifecycle events.

SEV-SNP needs libvirt 10.5 or newer: older ones (Debian bookworm has 9.0) reject or ignore
`<launchSecurity type='sev-snp'>`, so an SNP launch on them is refused before any XML is sent
(`snp_unsupported_by_libvirt`, naming both versions). An SNP domain is started running: QEMU issues
SNP_LAUNCH_START/UPDATE/FINISH while it starts, and exits when the firmware refuses one (e.g.
SNP_LAUNCH_FINISH finding a launch digest other than the ID block's); libvirt reports that as a start
error carrying QEMU's message, which becomes `snp_launch_refused` with the firmware status named.

libvirt errors become `ServiceError`s here, so the core never sees libvirt types. Their messages are
libvirt's, which never hold the secret (we never log the parameters of setLaunchSecurityState).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from launcher_svc.adapters import libvirt_errors
from launcher_svc.core.domain_xml import libvirt_cpu_model, parse_domain_xml
from launcher_svc.core.ports import (
    DomainInfo,
    DomainState,
    LaunchSecurityInfo,
    LifecycleHandler,
    LifecycleKind,
    SevCapabilities,
    SnpCapabilities,
)
from launcher_svc.core.preflight import FirmwareImage, SecretArea
from launcher_svc.core.reasons import LaunchReason
from sevlaunch.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from sevlaunch.firmware.status import StatusCode
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.vmsa import VCPU_TYPES
from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES

log = logging.getLogger("launcher_svc.libvirt")

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def ensure_event_loop() -> None:
    """libvirt delivers events only through a registered event loop, one per process, run in a thread.
    It must be registered before the connections whose events we want are opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# libvirt's message when the QEMU binary or the host cannot do SEV (VIR_ERR_CONFIG_UNSUPPORTED).
_SEV_UNSUPPORTED = "SEV launch security is not supported"


def libvirt_error(exc: libvirt.libvirtError, what: str) -> ServiceError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    detail = f"{what}: {message}"
    if code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED or (
        code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED and _SEV_UNSUPPORTED in message
    ):
        # libvirt 9.0 reports a launch-security call on a domain without SEV as OPERATION_UNSUPPORTED,
        # and SEV asked of a QEMU or host without it as CONFIG_UNSUPPORTED with this message: the host
        # or domain cannot do SEV, which is neither the caller's XML nor a hypervisor fault.
        return FailedPrecondition(LaunchReason.SEV_UNSUPPORTED, detail)
    precise = libvirt_errors.classify(code, message, detail)
    if precise is not None:
        return precise
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return FailedPrecondition(LaunchReason.HYPERVISOR_UNSUPPORTED, detail)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFound(LaunchReason.DOMAIN_NOT_FOUND, detail)
    if code in (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_CONFIG_UNSUPPORTED):
        return InvalidArgument(LaunchReason.DOMAIN_XML_REJECTED, detail)
    if code in (
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_OPERATION_FAILED,
    ):
        return FailedPrecondition(LaunchReason.HYPERVISOR_REFUSED, detail)
    return Unavailable(LaunchReason.HYPERVISOR_ERROR, detail)


#: The first libvirt that takes `<launchSecurity type='sev-snp'>` (major * 1_000_000 + minor * 1000 + micro).
SNP_MIN_LIBVIRT = 10_005_000

# QEMU's report of a refused SNP launch command before it exits ("SNP_LAUNCH_FINISH ret=-5 fw_error=11
# 'Bad measurement'"), which libvirt passes on in its start error.
_SNP_REFUSAL = re.compile(r"(SNP_LAUNCH_(?:START|UPDATE|FINISH)) ret=(-?\d+) fw_error=(\d+)")


def libvirt_version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def snp_start_error(exc: libvirt.libvirtError) -> ServiceError:
    """A failed start of an SNP domain: the firmware's refusal (QEMU's message names the command and
    the status) as `snp_launch_refused`, anything else as libvirt's error."""
    message = exc.get_error_message() or str(exc)
    found = _SNP_REFUSAL.search(message)
    if found is None:
        return libvirt_error(exc, "start")
    command, code = found.group(1), int(found.group(3))
    try:
        status = StatusCode(code).name
    except ValueError:
        status = f"0x{code:02x}"
    return FailedPrecondition(
        LaunchReason.SNP_LAUNCH_REFUSED,
        f"the firmware refused {command} with {status}",
        metadata={"firmware_status": status, "command": command},
    )


_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleKind.CRASHED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: LifecycleKind.UNDEFINED,
}

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
}


def _int(root: ET.Element, path: str) -> int | None:
    el = root.find(path)
    if el is None or el.text is None:
        return None
    return int(el.text.strip(), 0)


def check_cpu_model(domcaps_xml: str, model: str) -> None:
    """Refuses (`unsupported_vcpu_type`, FAILED_PRECONDITION) a CPU model that libvirt cannot pin on this
    host: one missing from the custom-mode models of its domain capabilities (its CPU map does not know
    it: libvirt 9.0 knows EPYC, EPYC-IBPB, EPYC-Rome and EPYC-Milan, no Genoa or Turin), or listed there
    as not usable on this host's CPU. Without the check, such a model passes our validation and fails
    later, at define or start."""
    try:
        root = ET.fromstring(domcaps_xml)  # noqa: S314 - from the local libvirt daemon
    except ET.ParseError:
        raise FailedPrecondition(
            LaunchReason.HYPERVISOR_REFUSED, "libvirt's domain capabilities do not parse"
        ) from None
    models = {
        (el.text or "").strip(): el.get("usable", "unknown")
        for el in root.findall("cpu/mode[@name='custom']/model")
    }
    offered = sorted(
        {libvirt_cpu_model(t) for t in VCPU_TYPES} & {m for m, usable in models.items() if usable != "no"}
    )
    if model not in models:
        raise FailedPrecondition(
            LaunchReason.UNSUPPORTED_VCPU_TYPE,
            f"libvirt on this host does not know the CPU model {model}; of the SEV-ES vCPU types it offers"
            f" {', '.join(offered) or 'none'}",
        )
    if models[model] == "no":
        raise FailedPrecondition(
            LaunchReason.UNSUPPORTED_VCPU_TYPE,
            f"this host cannot run the CPU model {model} (libvirt lists it as not usable); it offers"
            f" {', '.join(offered) or 'none'}",
        )


def without_locked_memory(xml: str) -> str:
    """The domain XML without `<memoryBacking><locked/>` (and the element, if that left it empty)."""
    root = ET.fromstring(xml)  # noqa: S314 - our own builder's XML
    backing = root.find("memoryBacking")
    if backing is not None:
        for locked in backing.findall("locked"):
            backing.remove(locked)
        if len(backing) == 0:
            root.remove(backing)
    return ET.tostring(root, encoding="unicode")


class LibvirtHypervisor:
    """Two settings are for test hosts only, where QEMU is a stand-in for an SEV host's (the launcher's
    `--test-host-*` flags, refused where /dev/sev exists):
    * `lock_memory=False` defines domains without `<locked/>`, which a host without CAP_SYS_RESOURCE
      refuses; encrypted guest memory must never be swapped on a real SEV host.
    * `test_asids=(sev, es)`: libvirt takes the ASID counts from the host CPU (CPUID 0x8000001F), which
      reports none on a CPU without SEV; these counts stand in when libvirt reports no ASIDs at all."""

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        libvirt_version: int | None = None,
        snp_guest_features: int = DEFAULT_GUEST_FEATURES,
        lock_memory: bool = True,
        test_asids: tuple[int, int] | None = None,
    ) -> None:
        """`libvirt_version` overrides the daemon's (tests); `snp_guest_features` is the VMSA
        SEV_FEATURES this host's QEMU sets for SNP guests (QEMU's default: SNPActive only)."""
        ensure_event_loop()
        self.uri = uri
        self._version_override = libvirt_version
        self._snp_guest_features = snp_guest_features
        self.lock_memory = lock_memory
        self.test_asids = test_asids
        try:
            self._conn: libvirt.virConnect = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, f"cannot connect to {uri}") from None
        self._handler: LifecycleHandler | None = None
        self._callback_id: int | None = None
        try:
            self._callback_id = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
            )
        except libvirt.libvirtError:
            # Without events the core still works: deadlines and the reconciler cover what they would.
            log.warning("libvirt lifecycle events unavailable", extra={"uri": uri})

    # -- events ---------------------------------------------------------------------------------

    def set_lifecycle_handler(self, handler: LifecycleHandler | None) -> None:
        self._handler = handler

    def _on_event(
        self, _conn: object, dom: libvirt.virDomain, event: int, _detail: int, _opaque: object
    ) -> None:
        handler = self._handler
        if handler is not None:
            handler(dom.name(), _LIFECYCLE.get(event, LifecycleKind.OTHER))

    def close(self) -> None:
        try:
            if self._callback_id is not None:
                self._conn.domainEventDeregisterAny(self._callback_id)
            self._conn.close()
        except libvirt.libvirtError:
            pass

    # -- capabilities ---------------------------------------------------------------------------

    def sev_capabilities(self) -> SevCapabilities:
        try:
            caps_xml = self._conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "domain capabilities") from None
        root = ET.fromstring(caps_xml)  # noqa: S314 - from the local libvirt daemon
        sev = root.find("features/sev")
        if sev is None or sev.get("supported") != "yes":
            raise FailedPrecondition(
                LaunchReason.SEV_UNSUPPORTED, "this host's hypervisor does not offer SEV"
            )
        cbitpos, reduced = _int(sev, "cbitpos"), _int(sev, "reducedPhysBits")
        max_guests, max_es = _int(sev, "maxGuests"), _int(sev, "maxESGuests")
        if max_guests is None or max_es is None:
            try:
                info: dict[str, Any] = self._conn.getSEVInfo()
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, "SEV info") from None
            max_guests = int(info.get("max-guests", 0))
            max_es = int(info.get("max-es-guests", 0))
        if cbitpos is None or reduced is None:
            raise FailedPrecondition(
                LaunchReason.SEV_UNSUPPORTED, "the hypervisor reports no cbitpos/reducedPhysBits"
            )
        if self.test_asids is not None and max_guests == 0 and max_es == 0:
            max_guests, max_es = self.test_asids
        return SevCapabilities(cbitpos, reduced, max_guests, max_es)

    def libvirt_version(self) -> int:
        if self._version_override is not None:
            return self._version_override
        try:
            return int(self._conn.getLibVersion())
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "libvirt version") from None

    def require_snp_libvirt(self) -> None:
        found = self.libvirt_version()
        if found < SNP_MIN_LIBVIRT:
            raise FailedPrecondition(
                LaunchReason.SNP_UNSUPPORTED_BY_LIBVIRT,
                f"libvirt {libvirt_version_text(found)} cannot launch SEV-SNP guests: <launchSecurity"
                f" type='sev-snp'> needs libvirt {libvirt_version_text(SNP_MIN_LIBVIRT)} or newer",
            )

    def snp_capabilities(self) -> SnpCapabilities:
        self.require_snp_libvirt()
        caps_xml = self._domain_capabilities()
        if caps_xml is None:
            raise FailedPrecondition(LaunchReason.SNP_UNSUPPORTED, "libvirt reports no domain capabilities")
        root = ET.fromstring(caps_xml)  # noqa: S314 - from the local libvirt daemon
        types = {
            (v.text or "").strip()
            for v in root.findall("features/launchSecurity/enum[@name='sectype']/value")
        }
        sev = root.find("features/sev")
        if "sev-snp" not in types or sev is None or sev.get("supported") != "yes":
            raise FailedPrecondition(
                LaunchReason.SNP_UNSUPPORTED, "this host's hypervisor does not offer SEV-SNP"
            )
        cbitpos, reduced = _int(sev, "cbitpos"), _int(sev, "reducedPhysBits")
        max_es = _int(sev, "maxESGuests")
        if max_es is None:
            try:
                max_es = int(self._conn.getSEVInfo().get("max-es-guests", 0))
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, "SEV info") from None
        if cbitpos is None or reduced is None:
            raise FailedPrecondition(
                LaunchReason.SNP_UNSUPPORTED, "the hypervisor reports no cbitpos/reducedPhysBits"
            )
        return SnpCapabilities(cbitpos, reduced, max_es, self._snp_guest_features)

    def _domain_capabilities(self) -> str | None:
        """The KVM domain capabilities XML; None when the driver has none (libvirt's test driver)."""
        try:
            return str(self._conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                return None
            raise libvirt_error(exc, "domain capabilities") from None

    # -- domains --------------------------------------------------------------------------------

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, f"domain {name}") from None

    def _find(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise libvirt_error(exc, f"domain {name}") from None

    def define(self, xml: str) -> str:
        try:
            parsed = parse_domain_xml(xml)
        except (ValueError, ET.ParseError):
            raise InvalidArgument(LaunchReason.DOMAIN_XML_REJECTED, "the domain XML does not parse") from None
        name = parsed.domain_name
        if parsed.snp:
            # Before anything reaches a daemon that would reject or drop the SNP settings.
            self.require_snp_libvirt()
        if parsed.cpu_model is not None:
            # A pinned model this libvirt cannot provide: refused before anything is defined.
            domcaps = self._domain_capabilities()
            if domcaps is not None:
                check_cpu_model(domcaps, parsed.cpu_model)
        if self._find(name) is not None:
            raise AlreadyExists(LaunchReason.DOMAIN_EXISTS, f"a domain named {name} exists")
        if not self.lock_memory:
            xml = without_locked_memory(xml)
        try:
            dom = self._conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "define") from None
        return str(dom.UUIDString())

    def start_paused(self, name: str, firmware: FirmwareImage) -> None:
        # QEMU reads the loader the domain XML names; `firmware` is what preflight checked of it.
        del firmware
        dom = self._lookup(name)
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "start paused") from None

    def start_snp(self, name: str, firmware: FirmwareImage) -> None:
        # QEMU reads the loader the domain XML names, and the firmware checks what it loaded against
        # the ID block: `firmware` (what preflight read) is not needed here.
        del firmware
        self.require_snp_libvirt()
        dom = self._lookup(name)
        try:
            dom.createWithFlags(0)
        except libvirt.libvirtError as exc:
            raise snp_start_error(exc) from None

    def launch_security_info(self, name: str) -> LaunchSecurityInfo:
        dom = self._lookup(name)
        try:
            params: dict[str, Any] = dom.launchSecurityInfo(0)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "launch security info") from None
        try:
            return LaunchSecurityInfo(
                measurement=base64.b64decode(params["sev-measurement"], validate=True),
                api_major=int(params["sev-api-major"]),
                api_minor=int(params["sev-api-minor"]),
                build_id=int(params["sev-build-id"]),
                policy=int(params["sev-policy"]),
            )
        except (KeyError, ValueError, TypeError):
            raise FailedPrecondition(
                LaunchReason.BAD_MEASUREMENT, "libvirt returned incomplete launch security info"
            ) from None

    def inject_secret(self, name: str, header: bytes, payload: bytes, area: SecretArea) -> None:
        dom = self._lookup(name)
        params: dict[str, Any] = {
            libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_HEADER: base64.b64encode(header).decode(),
            libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET: base64.b64encode(payload).decode(),
        }
        if not area.declared:
            # QEMU finds a declared area by itself; any other address must be given.
            params[libvirt.VIR_DOMAIN_LAUNCH_SECURITY_SEV_SECRET_SET_ADDRESS] = area.gpa
        try:
            dom.setLaunchSecurityState(params, 0)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "inject secret") from None
        finally:
            params.clear()

    def resume(self, name: str) -> None:
        dom = self._lookup(name)
        try:
            dom.resume()
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "resume") from None

    def destroy(self, name: str) -> bool:
        dom = self._find(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return True  # gone meanwhile (a transient domain, or someone else)
            raise libvirt_error(exc, "destroy") from None
        return True

    def domain_xml(self, name: str) -> str:
        dom = self._lookup(name)
        try:
            return str(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "domain XML") from None

    def list_domains(self) -> list[DomainInfo]:
        try:
            domains = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise libvirt_error(exc, "list domains") from None
        out: list[DomainInfo] = []
        for dom in domains:
            try:
                state = _STATES.get(dom.state()[0], DomainState.OTHER)
                parsed = parse_domain_xml(dom.XMLDesc(0))
                uuid = dom.UUIDString()
            except libvirt.libvirtError:
                continue  # undefined while we listed
            out.append(
                DomainInfo(
                    name=parsed.domain_name,
                    uuid=uuid,
                    state=state,
                    sev=parsed.sev or parsed.snp,
                    sev_es=parsed.snp or (parsed.sev and bool(parsed.policy & PolicyFlags.ES)),
                    launch_id=parsed.launch_id,
                    snp=parsed.snp,
                )
            )
        return out
