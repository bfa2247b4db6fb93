"""The QEMU stand-in: what libvirt runs as `qemu-system-x86_64` on a test host without SEV.

    python -m sevlaunch.realvirt.standin <QEMU arguments>      (config: $SEVLAUNCH_STANDIN_CONFIG)

It runs the real QEMU (TCG) with the command line `qemu_args.plan` rewrites, and sits on the QMP monitor
between libvirt and that QEMU. Everything is forwarded except what needs an SEV host, which the
emulated firmware answers, as KVM and the PSP would under a real QEMU:

* `query-sev-capabilities` (libvirt's probe, `virNodeGetSEVInfo`, domain capabilities): the chip's
  PDH, PEK‖OCA‖CEK and chip id, and the configured cbitpos / reducedPhysBits;
* at start, QEMU's part of the launch: LAUNCH_START with the GODH and session from the `sev-guest`
  object's `dh-cert-file` / `session-file` (the files libvirt wrote from the domain XML), then
  LAUNCH_UPDATE_DATA of the firmware image libvirt named (and the kernel hashes, and the VMSAs for
  SEV-ES; `sevlaunch.sev.digest.launch_updates`, QEMU's order), then LAUNCH_MEASURE;
* `query-sev`, `query-sev-launch-measure`, `query-sev-attestation-report`;
* `sev-inject-launch-secret`: LAUNCH_SECRET, whose plaintext is then written into the guest's real RAM
  at the address (the PSP writes it there on a real host), so the guest can read it;
* `cont` while the launch is in LSECRET: LAUNCH_FINISH first, then QEMU's own `cont`;
* on exit, DECOMMISSION (KVM does it when QEMU closes its VM).

Firmware refusals come back the way QEMU words them (`... fw_error=<status> '<name>'`), so libvirt
reports them as it would on a real host. The stand-in logs command names only, never arguments.
The configuration (JSON) names the real QEMU binary, the emulated chip's state directory, a run
directory (per domain: serial log, RAM file, a status file with the firmware handle) and cbitpos /
reducedPhysBits; libvirt gives QEMU a clean environment, so a wrapper script sets the variable.
"""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevlaunch.firmware import EmulatedFirmware, FirmwareError, StatusCode
from sevlaunch.realvirt.qemu_args import Q35_LOW_RAM_LIMIT, ArgsError, Plan, plan, substitute
from sevlaunch.realvirt.qmp import QmpConnection, error, reply
from sevlaunch.sev.digest import launch_updates
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.ovmf import OVMF
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.vmsa import vcpu_signature

CONFIG_ENV = "SEVLAUNCH_STANDIN_CONFIG"
MAX_IMAGE = 1 << 30
ORPHAN_SECONDS = 15.0
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("sevlaunch.standin")


@dataclass(frozen=True)
class StandinConfig:
    qemu: str
    chip_dir: str
    run_dir: str
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    default_vcpu_type: str = "EPYC-v4"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> StandinConfig:
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def write_wrapper(directory: Path, config_path: Path, python: str = sys.executable) -> Path:
    """`directory/qemu-system-x86_64`: a script that runs the stand-in with this config. The module is
    found through the PYTHONPATH of the calling process, fixed in the script."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "qemu-system-x86_64"
    pythonpath = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    script.write_text(
        "#!/bin/sh\n"
        f"export {CONFIG_ENV}='{config_path}'\n"
        f"export PYTHONPATH='{pythonpath}'\n"
        "export SEVLAUNCH_STANDIN_DEBUG=1\n"
        f"exec '{python}' -m sevlaunch.realvirt.standin \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def _fw_message(what: str, exc: FirmwareError) -> str:
    name = exc.status.name if isinstance(exc.status, StatusCode) else f"0x{int(exc.status):02x}"
    # QEMU's wording (target/i386/sev.c): "... ret=<errno> fw_error=<status> '<text>'".
    return f"SEV: {what} ret=-5 fw_error={int(exc.status)} '{name}'"


class SevLaunch:
    """QEMU's SEV side of one guest, on the emulated firmware."""

    def __init__(self, cfg: StandinConfig, p: Plan) -> None:
        assert p.sev is not None
        self.cfg, self.plan, self.sev = cfg, p, p.sev
        self.fw = EmulatedFirmware(cfg.chip_dir, create=False)
        self.handle: int | None = None
        self.measurement = b""
        self.ram_path: Path | None = None

    @staticmethod
    def _read_b64(path: str | None) -> bytes:
        if path is None:
            return b""
        return base64.b64decode(Path(path).read_text().strip(), validate=True)

    def start(self) -> None:
        """LAUNCH_START, LAUNCH_UPDATE_*, LAUNCH_MEASURE: QEMU does these while it builds the machine.
        Raises SystemExit with QEMU-like text on any refusal (libvirt quotes it from the log)."""
        if self.sev.cbitpos != self.cfg.cbitpos or self.sev.reduced_phys_bits != self.cfg.reduced_phys_bits:
            raise SystemExit(
                f"sev-guest: expected cbitpos {self.cfg.cbitpos} reduced-phys-bits "
                f"{self.cfg.reduced_phys_bits}, got {self.sev.cbitpos} and {self.sev.reduced_phys_bits}"
            )
        if self.plan.firmware is None:
            raise SystemExit("sev-guest: no firmware image on the command line")
        image = Path(self.plan.firmware).read_bytes()[: MAX_IMAGE + 1]
        kernel = initrd = None
        cmdline = None
        if self.plan.kernel is not None and self.sev.kernel_hashes:
            kernel = Path(self.plan.kernel).read_bytes()
            initrd = None if self.plan.initrd is None else Path(self.plan.initrd).read_bytes()
            cmdline = self.plan.cmdline or ""
        es = bool(self.sev.policy & PolicyFlags.ES)
        model = self.plan.cpu_model if self.plan.cpu_model not in (None, "qemu64", "host") else None
        try:
            updates = launch_updates(
                image,
                mode="sev-es" if es else "sev",
                vcpus=self.plan.vcpus,
                vcpu_sig=vcpu_signature(model or self.cfg.default_vcpu_type) if es else None,
                kernel=kernel,
                initrd=initrd,
                cmdline=cmdline,
            )
        except SevError as exc:
            raise SystemExit(f"sev-guest: {exc.detail}") from None
        try:
            godh, session = self._read_b64(self.sev.dh_cert_file), self._read_b64(self.sev.session_file)
            self.handle = self.fw.launch_start(godh, session, self.sev.policy)
        except FirmwareError as exc:
            raise SystemExit(_fw_message("LAUNCH_START", exc)) from None
        try:
            for update in updates:
                if update.kind == "data":
                    assert update.gpa is not None
                    self.fw.launch_update_data(self.handle, update.gpa, update.data)
                else:
                    self.fw.launch_update_vmsa(self.handle, update.data)
            self.measurement = self.fw.launch_measure(self.handle)
        except FirmwareError as exc:
            self.decommission()
            raise SystemExit(_fw_message("LAUNCH_UPDATE", exc)) from None

    def state(self) -> str:
        assert self.handle is not None
        # QEMU's SevState names (qapi/misc-target.json).
        name = str(self.fw.guest_info(self.handle)["state"])
        return {"LSECRET": "launch-secret", "RUNNING": "running", "LUPDATE": "launch-update"}.get(
            name, name.lower()
        )

    def query_sev(self) -> dict[str, Any]:
        assert self.handle is not None
        status = self.fw.platform_status()
        return {
            "enabled": True,
            "api-major": status.api_major,
            "api-minor": status.api_minor,
            "build-id": status.build,
            "policy": self.sev.policy,
            "state": self.state(),
            "handle": self.handle,
        }

    def inject(self, args: dict[str, Any]) -> None:
        """sev-inject-launch-secret; raises ValueError with QEMU-like text."""
        assert self.handle is not None
        header = base64.b64decode(str(args.get("packet-header", "")), validate=True)
        payload = base64.b64decode(str(args.get("secret", "")), validate=True)
        gpa = args.get("gpa")
        if gpa is None:
            area = OVMF.from_bytes(Path(str(self.plan.firmware)).read_bytes()).secret_area
            if area is None:
                raise ValueError("SEV: no secret area found in OVMF, gpa must be specified.")
            gpa = area[0]
        gpa = int(gpa)
        if self.state() != "launch-secret":
            raise ValueError("SEV: Not in correct state")
        try:
            self.fw.launch_secret(self.handle, header, payload, gpa)
        except FirmwareError as exc:
            raise ValueError(_fw_message("failed to inject secret", exc)) from None
        # The PSP writes the decrypted secret into guest memory; so does the stand-in, into QEMU's RAM.
        plaintext = self.fw.read_guest_memory(self.handle, gpa, len(payload))
        if self.ram_path is not None and gpa + len(plaintext) <= min(self.plan.ram_size, Q35_LOW_RAM_LIMIT):
            fd = os.open(self.ram_path, os.O_WRONLY)
            try:
                os.pwrite(fd, plaintext, gpa)
            finally:
                os.close(fd)

    def finish(self) -> None:
        assert self.handle is not None
        try:
            self.fw.launch_finish(self.handle)
        except FirmwareError as exc:
            raise ValueError(_fw_message("LAUNCH_FINISH", exc)) from None

    def decommission(self) -> None:
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        try:
            self.fw.decommission(handle)
        except FirmwareError:
            log.warning("DECOMMISSION of handle %d failed", handle)


def sev_capabilities(cfg: StandinConfig) -> dict[str, Any]:
    fw = EmulatedFirmware(cfg.chip_dir, create=False)
    pdh, chain = fw.pdh_cert_export()
    return {
        "pdh": base64.b64encode(pdh).decode(),
        "cert-chain": base64.b64encode(chain).decode(),
        "cpu0-id": base64.b64encode(bytes(fw.get_id())).decode(),
        "cbitpos": cfg.cbitpos,
        "reduced-phys-bits": cfg.reduced_phys_bits,
    }


def _die_with_parent() -> None:
    # The real QEMU must not outlive the stand-in libvirt holds the pid of (libvirt may SIGKILL it).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Standin:
    def __init__(self, cfg: StandinConfig, p: Plan) -> None:
        self.cfg, self.plan = cfg, p
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sev: SevLaunch | None = None
        self.qemu: subprocess.Popen[bytes] | None = None
        self.upstream: socket.socket | None = None
        self.client: QmpConnection | None = None
        self.greeting: dict[str, Any] | None = None
        self.greeting_ready = threading.Event()
        self.capabilities_done = False
        self.stopping = threading.Event()
        self.base = self.run_dir / (p.name or f"probe-{os.getpid()}")

    # -- start -------------------------------------------------------------------------------------

    def listen(self) -> socket.socket:
        if self.plan.monitor_fd is not None:
            return socket.socket(fileno=self.plan.monitor_fd)
        assert self.plan.monitor_path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.plan.monitor_path)
        except FileNotFoundError:
            pass
        sock.bind(self.plan.monitor_path)
        sock.listen(4)
        return sock

    def spawn_qemu(self) -> QmpConnection:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ram_path = ""
        if self.plan.ram_backend is not None and not self.plan.probe:
            ram = self.base.with_suffix(".ram")
            ram.unlink(missing_ok=True)
            ram_path = str(ram)
            if self.sev is not None:
                self.sev.ram_path = ram
        argv = substitute(
            self.plan.qemu_argv,
            monitor_fd=str(theirs.fileno()),
            ram_path=ram_path,
            serial_path=str(self.base.with_suffix(".serial.log")),
        )
        # A domain's QEMU gets every descriptor libvirt handed over (none but the monitor today); the
        # probe's gets none (ours include the -daemonize pipe, which must close when we are ready).
        inherited = [] if self.plan.probe else [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
        keep = [fd for fd in inherited if fd not in (ours.fileno(), theirs.fileno(), self.plan.monitor_fd)]
        stderr = None
        if self.plan.daemonize:
            stderr = open(self.base.with_suffix(".qemu.log"), "ab")
        self.qemu = subprocess.Popen(
            [self.cfg.qemu, *argv],
            pass_fds=[theirs.fileno(), *(fd for fd in keep if _valid_fd(fd))],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=_die_with_parent,
        )
        theirs.close()
        if stderr is not None:
            stderr.close()
        conn = QmpConnection(ours)
        threading.Thread(target=self._from_qemu, args=(conn,), daemon=True).start()
        threading.Thread(target=self._reap, daemon=True).start()
        return conn

    def _reap(self) -> None:
        assert self.qemu is not None
        self.qemu.wait()
        self.stop()

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.greeting_ready.set()  # wakes a start still waiting for QEMU's monitor
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.terminate()
        for closer in (self.client, self.upstream):
            if closer is None:
                continue
            try:
                if isinstance(closer, socket.socket):
                    closer.shutdown(socket.SHUT_RDWR)
                    closer.close()
                else:
                    closer.close()
            except OSError:
                pass

    # -- the proxy ---------------------------------------------------------------------------------

    def _from_qemu(self, conn: QmpConnection) -> None:
        while True:
            try:
                got = conn.read()
            except ValueError:
                got = None
            if got is None:
                self.stop()
                return
            message, fds = got
            if self.greeting is None and "QMP" in message:
                self.greeting = message
                self.greeting_ready.set()
                continue
            log.debug("<- %s", "return" if "return" in message else message.get("event", "error"))
            client = self.client
            if client is not None:
                try:
                    client.write(message, fds)
                except OSError:
                    pass
            for fd in fds:
                os.close(fd)

    def serve(self, qemu: QmpConnection) -> None:
        """Forwards between libvirt and QEMU. libvirt holds the monitor for the domain's whole life;
        once it has let go, a libvirtd that does not come back within ORPHAN_SECONDS is gone (a test
        run that died), and a stand-in guest spinning under TCG would only slow the next tests down."""
        assert self.upstream is not None
        while not self.stopping.is_set():
            try:
                sock, _ = self.upstream.accept()
            except TimeoutError:
                log.info("no libvirtd for %ss: stopping", ORPHAN_SECONDS)
                return
            except OSError:
                return
            sock.settimeout(None)
            client = QmpConnection(sock)
            self.greeting_ready.wait()
            if self.greeting is None:
                return
            self.client = client
            client.write(self.greeting)
            while True:
                try:
                    got = client.read()
                except ValueError:
                    got = None
                if got is None:
                    break
                request, fds = got
                answer = self.handle(request)
                if answer is not None:
                    client.write(answer)
                    for fd in fds:
                        os.close(fd)
                    continue
                qemu.write(request, fds)
                for fd in fds:
                    os.close(fd)
            self.client = None
            if self.stopping.is_set():
                return  # QEMU ended (or a signal): nothing more to serve, and nothing to say on stderr
            try:
                self.upstream.settimeout(ORPHAN_SECONDS)
            except OSError:
                return

    def handle(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The answer to a command the stand-in takes itself, or None to forward it to QEMU."""
        command = str(request.get("execute", ""))
        args = request.get("arguments") or {}
        log.debug("-> %s", command)
        if command == "qmp_capabilities":
            if self.capabilities_done:
                return reply(request, {})  # a reconnecting client; QEMU's monitor negotiated once
            self.capabilities_done = True
            return None
        if command == "query-kvm":
            # The stand-in plays a KVM host whatever this machine's KVM can do (the guest runs on TCG).
            return reply(request, {"enabled": True, "present": True})
        if command == "query-sev-capabilities":
            log.info("query-sev-capabilities")
            return reply(request, sev_capabilities(self.cfg))
        if command.startswith(("query-sev", "sev-")) and self.sev is None:
            return error(request, "SEV feature is not available")
        if self.sev is None:
            return None
        sev = self.sev
        log.info("%s", command)
        try:
            if command == "query-sev":
                return reply(request, sev.query_sev())
            if command == "query-sev-launch-measure":
                if sev.state() != "launch-secret":
                    return error(request, "SEV launch measurement is not available")
                return reply(request, {"data": base64.b64encode(sev.measurement).decode()})
            if command == "query-sev-attestation-report":
                assert sev.handle is not None
                mnonce = base64.b64decode(str(args.get("mnonce", "")), validate=True)
                report = sev.fw.attestation(sev.handle, mnonce)
                return reply(request, {"data": base64.b64encode(report).decode()})
            if command == "sev-inject-launch-secret":
                sev.inject(args)
                return reply(request, {})
            if command == "cont" and sev.handle is not None and sev.state() == "launch-secret":
                sev.finish()
                return None
        except FirmwareError as exc:
            return error(request, _fw_message(command, exc))
        except (ValueError, TypeError) as exc:
            return error(request, str(exc))
        return None

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self, ready_w: int | None = None) -> int:
        """Serves until QEMU exits or a signal stops it; `ready_w` (with -daemonize) is told "ok" once
        the monitor is up."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            if self.plan.sev is not None:
                self.sev = SevLaunch(self.cfg, self.plan)
                self.sev.start()
                self._status()
            self.upstream = self.listen()
            qemu = self.spawn_qemu()
            if not self.greeting_ready.wait(60) or self.greeting is None:
                # QEMU exited first (e.g. it could not load the firmware; its stderr says why).
                raise SystemExit("the real QEMU ended before it opened its monitor")
            if ready_w is not None:
                if self.plan.pidfile:
                    Path(self.plan.pidfile).write_text(f"{os.getpid()}\n")
                os.write(ready_w, b"ok")
                os.close(ready_w)
                _detach_stdio()
            self.serve(qemu)
        finally:
            # Whatever ended it: QEMU goes, and with it the guest context (KVM decommissions on close).
            self.stop()
            if self.qemu is not None:
                try:
                    self.qemu.wait(10)
                except subprocess.TimeoutExpired:
                    self.qemu.kill()
                    self.qemu.wait()
            if self.sev is not None:
                self.sev.decommission()
            self.base.with_suffix(".ram").unlink(missing_ok=True)
        return 0 if self.qemu is None or self.qemu.returncode in (0, -signal.SIGTERM) else 1

    def _status(self) -> None:
        """<run_dir>/<name>.json: the firmware handle of this domain's launch (for tests)."""
        assert self.sev is not None
        data = {"pid": os.getpid(), "handle": self.sev.handle, "firmware": self.plan.firmware}
        self.base.with_suffix(".json").write_text(json.dumps(data))


def _valid_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _daemonize() -> int:
    """QEMU's -daemonize: the caller's process returns once the child is ready (the child writes to
    the returned pipe), with the child's error output if it failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        if data != b"ok":
            os.write(2, data)
            os._exit(1)
        os._exit(0)
    os.close(r)
    os.setsid()
    # Nothing of the caller's may stay open in the daemon (libvirt reads its pipes until EOF).
    os.closerange(3, w)
    os.closerange(w + 1, 65536)
    # Until ready, errors go to the parent, which is still the process libvirt waits for.
    os.dup2(w, 2)
    return w


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config_path = os.environ.get(CONFIG_ENV)
    if not config_path:
        print(f"qemu stand-in: {CONFIG_ENV} is not set", file=sys.stderr)
        return 1
    cfg = StandinConfig.load(config_path)
    if not args or args[0] in ("-version", "--version", "-help", "--help"):
        return subprocess.run([cfg.qemu, *args], check=False).returncode
    try:
        p = plan(args)
    except ArgsError as exc:
        print(f"qemu stand-in: {exc}", file=sys.stderr)
        return 1
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)  # guest RAM files live here
    ready_w = _daemonize() if p.daemonize else None
    logging.basicConfig(
        filename=str(Path(cfg.run_dir) / "standin.log"),
        level=logging.DEBUG if os.environ.get("SEVLAUNCH_STANDIN_DEBUG") else logging.INFO,
        format=f"%(asctime)s {p.name or 'probe'} %(process)d %(message)s",
    )
    log.info("start (%s)", "probe" if p.probe else "domain")
    try:
        return Standin(cfg, p).run(ready_w)
    except Exception:
        # stderr is the domain's log, whose last lines libvirt quotes in its error: keep QEMU's there.
        log.exception("stand-in failed")
        return 1
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"qemu-system-x86_64: {exc.code}", file=sys.stderr)
            log.info("refused: %s", exc.code)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
