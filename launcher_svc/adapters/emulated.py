"""The emulated hypervisor: libvirt's test driver for the domain lifecycle, the firmware emulator for
QEMU's part of an SEV launch.

* libvirt: a private `test:///<file>` connection (one driver instance per launcher, unlike the
  process-wide `test:///default`). It parses and validates the domain XML with libvirt's own parser and
  keeps domain state and lifecycle events. The test driver has no VIR_DOMAIN_START_PAUSED, so a start is
  create() followed at once by suspend(); the test driver runs no guest code, so nothing runs between.
* QEMU's part, on the `EmulatedFirmware` chip that platform_svc shares: LAUNCH_START with the XML's
  dhCert, session and policy; LAUNCH_UPDATE_DATA of the firmware file the XML names and of the kernel
  hashes table (`launch_updates`, QEMU's order); LAUNCH_UPDATE_VMSA for SEV-ES, of the vCPU model the
  XML pins; LAUNCH_MEASURE; LAUNCH_SECRET into the secret area; LAUNCH_FINISH on resume; DECOMMISSION
  on destroy. Each command is reported to an optional observer (the launcher's firmware metrics).

Surviving a restart (why `domains_dir` exists): the test driver's domains live in this process, and QEMU
processes would outlive a killed launcher on a real host. So every emulated domain is also written to
`<domains_dir>/<name>.json` (its XML, its firmware guest handle and its run state), the way libvirt keeps
`/run/libvirt/qemu/<name>.xml` status files. Opening the backend re-creates those domains in the test
driver in the state they had; the reconciler then sees them as a real host would show them, and
destroying one DECOMMISSIONs its firmware guest context, so the chip's guest count comes back.
Nothing secret is written: the wrapped secret is passed to the firmware and dropped.

SEV-SNP: the backend plays a libvirt 10.5+ with QEMU 9.1+. The test driver (libvirt 9.0 here) does not
know `<launchSecurity type='sev-snp'>`, so it keeps the domain without it, and the backend keeps the
full XML (the one the unit tests validate against libvirt 10.5+'s schema) in its own record. Starting
an SNP domain replays `sevlaunch.snp.launch_digest.launch_plan` (QEMU's SNP_LAUNCH_UPDATE order) onto
the emulated firmware between SNP_LAUNCH_START (the XML's policy) and SNP_LAUNCH_FINISH (its ID block,
ID auth, author key flag and HOST_DATA). A refusal there is `snp_launch_refused` naming the firmware's
status, as the libvirt backend reports QEMU's. A running SNP guest gets a guest-request channel to the
firmware (`snp_guest`): what an emulated guest agent calls for its attestation report, with the init
data the domain carries.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import libvirt

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor, libvirt_error
from launcher_svc.core.domain_xml import parse_domain_xml
from launcher_svc.core.ports import DomainInfo, LaunchSecurityInfo, SevCapabilities, SnpCapabilities
from launcher_svc.core.preflight import FirmwareImage, SecretArea
from launcher_svc.core.reasons import FIRMWARE_PREFIX, LaunchReason
from sevlaunch.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError
from sevlaunch.firmware import EmulatedFirmware, FirmwareError, StatusCode
from sevlaunch.firmware.emulator.commands.snp_guest import EmulatedSnpGuest
from sevlaunch.guest.source import GuestReportSource
from sevlaunch.sev.digest import launch_updates
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.vmsa import VMSALayout, vcpu_signature
from sevlaunch.snp.gctx import LaunchUpdate
from sevlaunch.snp.launch_digest import launch_plan
from sevlaunch.snp.vmsa import DEFAULT_GUEST_FEATURES, VmmType

T = TypeVar("T")

_NODE_XML = "<node/>\n"
MAX_IMAGE = 1 << 30


#: Told (command, status name, seconds) of every launch command the backend issues, e.g. for metrics.
FirmwareObserver = Callable[[str, str, float], None]


def firmware_error(exc: FirmwareError) -> ServiceError:
    """The firmware's refusal as a service error whose reason names the status (e.g. BAD_MEASUREMENT
    for a secret packaged for another launch)."""
    name = exc.status.name if isinstance(exc.status, StatusCode) else f"0x{int(exc.status):02x}"
    meta = {"firmware_status": name, "command": exc.command}
    if exc.status == StatusCode.RESOURCE_LIMIT:
        return ResourceExhausted(LaunchReason.FIRMWARE_RESOURCE_LIMIT, exc.detail, metadata=meta)
    return FailedPrecondition(f"{FIRMWARE_PREFIX}{name.lower()}", exc.detail, metadata=meta)


def snp_firmware_error(exc: FirmwareError) -> ServiceError:
    """The firmware's refusal of an SNP launch command, as the libvirt backend reports QEMU's."""
    if exc.status == StatusCode.RESOURCE_LIMIT:
        return firmware_error(exc)
    name = exc.status.name if isinstance(exc.status, StatusCode) else f"0x{int(exc.status):02x}"
    return FailedPrecondition(
        LaunchReason.SNP_LAUNCH_REFUSED,
        f"the firmware refused {exc.command} with {name}: {exc.detail}",
        metadata={"firmware_status": name, "command": exc.command},
    )


def driver_xml(xml: str) -> str:
    """The XML the test driver (libvirt 9.0) takes: an SNP domain without its `<launchSecurity>`."""
    root = ET.fromstring(xml)  # noqa: S314 - our own builder's XML, or the backend's record of it
    ls = root.find("launchSecurity")
    if ls is None or ls.get("type") != "sev-snp":
        return xml
    root.remove(ls)
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class SnpGuestChannel:
    """What an emulated SNP guest has of its host: the guest request to the firmware (the source of
    its attestation reports) and the init data its domain carries (fw_cfg on a real host)."""

    source: GuestReportSource
    init_data: bytes


@dataclass
class _Domain:
    """What a QEMU process would hold of one SEV guest; persisted as JSON."""

    name: str
    xml: str
    run_state: str  # "defined" | "starting" | "paused" | "running"
    handle: int | None = None
    measurement: bytes = b""
    # While "starting": the chip's guest handles just before this domain's LAUNCH_START, so that a
    # process killed before it could record its handle can tell its guest from the others at restart.
    handles_before: tuple[int, ...] | None = None
    snp: bool = False  # `handle` is an SNP guest context (SNP_DECOMMISSION), `xml` our full SNP XML

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "xml": self.xml,
                "run_state": self.run_state,
                "handle": self.handle,
                "measurement": base64.b64encode(self.measurement).decode(),
                "handles_before": None if self.handles_before is None else list(self.handles_before),
                "snp": self.snp,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> _Domain:
        data = json.loads(raw)
        return cls(
            name=str(data["name"]),
            xml=str(data["xml"]),
            run_state=str(data["run_state"]),
            handle=None if data.get("handle") is None else int(data["handle"]),
            measurement=base64.b64decode(data.get("measurement", "")),
            handles_before=(
                None if data.get("handles_before") is None else tuple(int(h) for h in data["handles_before"])
            ),
            snp=bool(data.get("snp", False)),
        )


class EmulatedHypervisor(LibvirtHypervisor):
    def __init__(
        self,
        firmware: EmulatedFirmware,
        domains_dir: str | Path,
        *,
        cbitpos: int = 51,
        reduced_phys_bits: int = 1,
        vcpu_type: str = "EPYC-v4",
        vmsa_layout: VMSALayout = VMSALayout.init2,
        firmware_observer: FirmwareObserver | None = None,
        checkpoint: Callable[[str], None] | None = None,
        snp_guest_features: int = DEFAULT_GUEST_FEATURES,
    ) -> None:
        self.firmware = firmware
        self._observe = firmware_observer
        # Told "after <COMMAND>" as each firmware command returns (tests kill the process there).
        self._checkpoint = checkpoint
        # Absolute: libvirt reads `test://chip/...` as a host named "chip", not a relative path.
        self.domains_dir = Path(domains_dir).resolve()
        self.domains_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        node = self.domains_dir / "testnode.xml"
        node.write_text(_NODE_XML)
        self._cbitpos = cbitpos
        self._reduced = reduced_phys_bits
        self._vcpu_sig = vcpu_signature(vcpu_type)
        self._layout = vmsa_layout
        # One lock: the emulated "QEMU" handles one command at a time, like the PSP it talks to.
        self._mutex = threading.RLock()
        super().__init__(f"test://{node}", snp_guest_features=snp_guest_features)
        self._snp_features = snp_guest_features
        self._restore()

    # -- persistence ----------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.domains_dir / f"{name}.json"

    def _save(self, dom: _Domain) -> None:
        tmp = self._path(dom.name).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(dom.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path(dom.name))

    def _load(self, name: str) -> _Domain | None:
        try:
            return _Domain.from_json(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def _restore(self) -> None:
        """Re-creates the persisted domains in the fresh test driver, in the state they were left in,
        after accounting for the chip's guests (`_adopt`)."""
        domains = [_Domain.from_json(p.read_text()) for p in sorted(self.domains_dir.glob("*.json"))]
        self._adopt(domains)
        for dom in domains:
            try:
                vdom = self._conn.defineXML(driver_xml(dom.xml))
                if dom.run_state in ("paused", "running"):
                    vdom.create()
                    if dom.run_state == "paused":
                        vdom.suspend()
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, f"restore {dom.name}") from None

    def _adopt(self, domains: list[_Domain]) -> None:
        """A process killed between LAUNCH_START and recording its handle left a guest on the chip
        (LUPDATE, holding an ASID) that no domain names. Like QEMU's guest, it belongs to the domain
        that was starting: that domain takes the guest that appeared on the chip after its snapshot and
        that no other domain holds, and comes back paused, so that the reconciler destroys it (and its
        guest) like any other paused domain no advancing launch owns."""
        held = {d.handle for d in domains if d.handle is not None}
        on_chip = self._handles_on_chip()
        for dom in domains:
            if dom.run_state != "starting":
                continue
            before = set(dom.handles_before or ())
            # Handles only grow, so the first new one is the one this domain's LAUNCH_START made.
            new = sorted(on_chip - before - held)
            if new:
                dom.handle, dom.run_state = new[0], "paused"
                held.add(new[0])
            else:
                dom.run_state = "defined"  # killed before LAUNCH_START: nothing on the chip
            dom.handles_before = None
            self._save(dom)

    def _handles_on_chip(self) -> set[int]:
        # SEV and SNP guest contexts take their handles from one counter: together they tell which
        # guest appeared after a snapshot.
        return set(self.firmware.guest_handles()) | set(self.firmware.snp_guest_handles())

    # -- the SEV parts QEMU would play ----------------------------------------------------------

    def _fw(self, command: str, fn: Callable[..., T], *args: object) -> T:
        """One firmware launch command, reported to the observer with its status (the firmware's status
        name, or ERROR when the emulator failed otherwise)."""
        start = time.perf_counter()
        status = StatusCode.SUCCESS.name
        try:
            result = fn(*args)
        except FirmwareError as exc:
            status = exc.status.name if isinstance(exc.status, StatusCode) else f"0x{int(exc.status):02x}"
            raise
        except Exception:
            status = "ERROR"
            raise
        finally:
            if self._observe is not None:
                self._observe(command, status, time.perf_counter() - start)
        if self._checkpoint is not None:
            self._checkpoint(f"after {command}")
        return result

    def sev_capabilities(self) -> SevCapabilities:
        cfg = self.firmware.config
        return SevCapabilities(self._cbitpos, self._reduced, cfg.max_guests, cfg.max_es_guests)

    def snp_capabilities(self) -> SnpCapabilities:
        cfg = self.firmware.config
        return SnpCapabilities(self._cbitpos, self._reduced, cfg.max_es_guests, self._snp_features)

    def define(self, xml: str) -> str:
        with self._mutex:
            try:
                snp = parse_domain_xml(xml).snp
            except (ValueError, ET.ParseError):
                snp = False  # libvirt's parser says what is wrong with it
            uuid = super().define(driver_xml(xml) if snp else xml)
            name = parse_domain_xml(xml).domain_name
            # An SNP domain's record keeps our XML: the test driver holds it without its SNP settings.
            kept = xml if snp else self.domain_xml(name)
            self._save(_Domain(name=name, xml=kept, run_state="defined", snp=snp))
            return uuid

    @staticmethod
    def _read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_IMAGE + 1)
        except OSError:
            raise FailedPrecondition(LaunchReason.IMAGE_UNREADABLE, f"{what} cannot be read") from None
        if len(data) > MAX_IMAGE:
            raise InvalidArgument(LaunchReason.TOO_LARGE, f"{what} is too large")
        return data

    def start_paused(self, name: str, firmware: FirmwareImage) -> None:
        with self._mutex:
            dom = self._load(name)
            if dom is None:
                raise NotFound(LaunchReason.DOMAIN_NOT_FOUND, f"domain {name}")
            vdom = self._lookup(name)
            # Like QEMU, take the launch parameters from the domain's XML as libvirt holds it.
            parsed = parse_domain_xml(vdom.XMLDesc(0))
            if not parsed.sev:
                raise FailedPrecondition(LaunchReason.NOT_SEV, "the domain has no SEV launch security")
            if parsed.loader is None:
                raise FailedPrecondition(LaunchReason.NO_FIRMWARE, "the domain names no firmware")
            if parsed.loader != firmware.path:
                raise FailedPrecondition(
                    LaunchReason.NO_FIRMWARE, "the domain's firmware is not the image the launch checked"
                )
            # The image preflight read (the launch's one read of it), not the file again.
            firmware_image = firmware.data
            kernel = initrd = None
            cmdline: str | None = None
            if parsed.kernel is not None and parsed.kernel_hashes:
                kernel = self._read(parsed.kernel, "kernel")
                initrd = self._read(parsed.initrd, "initrd")
                cmdline = parsed.cmdline or ""
            es = bool(parsed.policy & PolicyFlags.ES)
            try:
                # Like QEMU: the VMSAs of the CPU model the XML pins, else of the configured default.
                vcpu_sig = vcpu_signature(parsed.cpu_model) if parsed.cpu_model else self._vcpu_sig
                updates = launch_updates(
                    firmware_image,
                    mode="sev-es" if es else "sev",
                    vcpus=parsed.vcpus,
                    vcpu_sig=vcpu_sig,
                    layout=self._layout,
                    kernel=kernel,
                    initrd=initrd,
                    cmdline=cmdline,
                )
            except SevError as exc:
                raise FailedPrecondition(exc.reason.value, exc.detail) from None
            # Before LAUNCH_START, what the chip holds: a crash before the handle below is recorded still
            # leaves a way to find this domain's guest and DECOMMISSION it (`_adopt`).
            dom.run_state, dom.handles_before = "starting", tuple(sorted(self._handles_on_chip()))
            self._save(dom)
            try:
                try:
                    handle = self._fw(
                        "LAUNCH_START",
                        self.firmware.launch_start,
                        parsed.dh_cert,
                        parsed.session,
                        parsed.policy,
                    )
                except FirmwareError:
                    dom.run_state, dom.handles_before = "defined", None  # refused: no guest was made
                    self._save(dom)
                    raise
                # Persist the handle at once: from here on a crash must leave a way to DECOMMISSION.
                dom.handle, dom.run_state, dom.handles_before = handle, "paused", None
                self._save(dom)
                for update in updates:
                    if update.kind == "data":
                        assert update.gpa is not None
                        self._fw(
                            "LAUNCH_UPDATE_DATA",
                            self.firmware.launch_update_data,
                            handle,
                            update.gpa,
                            update.data,
                        )
                    else:
                        self._fw("LAUNCH_UPDATE_VMSA", self.firmware.launch_update_vmsa, handle, update.data)
                dom.measurement = self._fw("LAUNCH_MEASURE", self.firmware.launch_measure, handle)
            except FirmwareError as exc:
                raise firmware_error(exc) from None
            self._save(dom)
            try:
                vdom.create()
                vdom.suspend()
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, "start paused") from None

    def start_snp(self, name: str, firmware: FirmwareImage) -> None:
        with self._mutex:
            dom = self._load(name)
            if dom is None:
                raise NotFound(LaunchReason.DOMAIN_NOT_FOUND, f"domain {name}")
            vdom = self._lookup(name)
            parsed = parse_domain_xml(dom.xml)
            if not dom.snp or not parsed.snp:
                raise FailedPrecondition(LaunchReason.NOT_SEV, "the domain has no SEV-SNP launch security")
            if parsed.loader is None or parsed.loader != firmware.path:
                raise FailedPrecondition(
                    LaunchReason.NO_FIRMWARE, "the domain's firmware is not the image the launch checked"
                )
            kernel = initrd = None
            cmdline: str | None = None
            if parsed.kernel is not None and parsed.kernel_hashes:
                kernel = self._read(parsed.kernel, "kernel")
                initrd = self._read(parsed.initrd, "initrd")
                cmdline = parsed.cmdline
            try:
                vcpu_sig = vcpu_signature(parsed.cpu_model) if parsed.cpu_model else self._vcpu_sig
                plan = launch_plan(
                    firmware.data,
                    vcpus=parsed.vcpus,
                    vcpu_sig=vcpu_sig,
                    guest_features=self._snp_features,
                    vmm_type=VmmType.QEMU,
                    kernel=kernel,
                    initrd=initrd,
                    cmdline=cmdline,
                )
            except SevError as exc:
                raise FailedPrecondition(exc.reason.value, exc.detail) from None
            dom.run_state, dom.handles_before = "starting", tuple(sorted(self._handles_on_chip()))
            self._save(dom)
            try:
                try:
                    handle = self._fw("SNP_LAUNCH_START", self.firmware.snp_launch_start, parsed.policy)
                except FirmwareError:
                    dom.run_state, dom.handles_before = "defined", None
                    self._save(dom)
                    raise
                # From here on the guest context exists: a crash or a refusal must leave it findable.
                dom.handle, dom.run_state, dom.handles_before = handle, "paused", None
                self._save(dom)
                for update in plan.updates:
                    self._fw("SNP_LAUNCH_UPDATE", self._snp_update, handle, update)
                self._fw(
                    "SNP_LAUNCH_FINISH",
                    self._snp_finish,
                    handle,
                    parsed.id_block or None,
                    parsed.id_auth or None,
                    parsed.host_data or bytes(32),
                    parsed.author_key,
                )
            except FirmwareError as exc:
                raise snp_firmware_error(exc) from None
            try:
                vdom.create()
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, "start") from None
            dom.run_state = "running"
            self._save(dom)

    def _snp_update(self, handle: int, update: LaunchUpdate) -> None:
        self.firmware.snp_launch_update(
            handle, update.gpa, update.page_type, update.data, length=update.length
        )

    def _snp_finish(
        self, handle: int, id_block: bytes | None, id_auth: bytes | None, host_data: bytes, author_key: bool
    ) -> None:
        self.firmware.snp_launch_finish(
            handle, id_block=id_block, id_auth=id_auth, host_data=host_data, author_key_en=author_key
        )

    def snp_guest(self, name: str) -> SnpGuestChannel:
        """The guest-request channel of a running SNP guest and the init data its domain carries."""
        dom = self._load(name)
        if dom is None or not dom.snp or dom.handle is None or dom.run_state != "running":
            raise FailedPrecondition(LaunchReason.NOT_STARTED, f"{name} is no running SEV-SNP guest")
        return SnpGuestChannel(
            EmulatedSnpGuest(self.firmware, dom.handle), parse_domain_xml(dom.xml).init_data
        )

    def snp_launch_digest(self, name: str) -> bytes:
        """The launch digest the firmware computed for an SNP domain (its reports' MEASUREMENT)."""
        dom = self._load(name)
        if dom is None or not dom.snp or dom.handle is None:
            raise FailedPrecondition(LaunchReason.NOT_STARTED, f"{name} has no SNP guest context")
        return self.firmware.snp_launch_digest(dom.handle)

    def launch_security_info(self, name: str) -> LaunchSecurityInfo:
        with self._mutex:
            dom = self._load(name)
            if dom is None or dom.handle is None or not dom.measurement:
                raise FailedPrecondition(LaunchReason.NOT_MEASURED, "the domain has no launch measurement")
            status = self.firmware.platform_status()
            info = self.firmware.guest_info(dom.handle)
            return LaunchSecurityInfo(
                measurement=dom.measurement,
                api_major=status.api_major,
                api_minor=status.api_minor,
                build_id=status.build,
                policy=int(info["policy"]),
            )

    def inject_secret(self, name: str, header: bytes, payload: bytes, area: SecretArea) -> None:
        with self._mutex:
            dom = self._load(name)
            if dom is None or dom.handle is None:
                raise FailedPrecondition(LaunchReason.NOT_STARTED, "the domain has no firmware guest context")
            # A declared area is where QEMU would find it by itself; preflight found it already.
            try:
                self._fw("LAUNCH_SECRET", self.firmware.launch_secret, dom.handle, header, payload, area.gpa)
            except FirmwareError as exc:
                raise firmware_error(exc) from None

    def resume(self, name: str) -> None:
        with self._mutex:
            dom = self._load(name)
            if dom is None or dom.handle is None:
                raise FailedPrecondition(LaunchReason.NOT_STARTED, "the domain has no firmware guest context")
            try:
                self._fw("LAUNCH_FINISH", self.firmware.launch_finish, dom.handle)
            except FirmwareError as exc:
                raise firmware_error(exc) from None
            super().resume(name)
            dom.run_state = "running"
            self._save(dom)

    def destroy(self, name: str) -> bool:
        with self._mutex:
            dom = self._load(name)
            existed = super().destroy(name)
            if dom is not None:
                if dom.handle is not None:
                    try:
                        if dom.snp:
                            self._fw("SNP_DECOMMISSION", self.firmware.snp_decommission, dom.handle)
                        else:
                            self._fw("DECOMMISSION", self.firmware.decommission, dom.handle)
                    except FirmwareError as exc:
                        # INVALID_GUEST: already gone (e.g. a chip reset); anything else is kept for a retry.
                        if exc.status != StatusCode.INVALID_GUEST:
                            raise firmware_error(exc) from None
                self._path(name).unlink(missing_ok=True)
                existed = True
            return existed

    def guest_handle(self, name: str) -> int | None:
        """The firmware guest context of a domain (tests read the secret area through it)."""
        dom = self._load(name)
        return None if dom is None else dom.handle

    def list_domains(self) -> list[DomainInfo]:
        with self._mutex:
            out = []
            for info in super().list_domains():
                dom = self._load(info.name)
                if dom is not None and dom.snp:
                    # The test driver holds it without its SNP settings; our record has them.
                    info = replace(info, sev=True, sev_es=True, snp=True)
                out.append(info)
            return out
