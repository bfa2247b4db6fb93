"""A benchmark world: N emulated SEV hosts (chip + platform_svc + launcher_svc each) and one owner_svc,
as separate processes on localhost with mTLS, plus the same pieces built in-process for the floors.

Process handling and the owner's set-up follow `sevlaunch.demo` (`sevlaunch.demo.services` starts, waits
for and stops the children; children are only ever signalled by their own process group id).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from sevlaunch.cli.devcerts import write_dev_certs
from sevlaunch.demo.services import (
    ServiceProcess,
    signals_deferred,
    start_service,
    wait_serving,
    wait_started,
)
from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.firmware.kds import KDSServer
from sevlaunch.refvalues import (
    DigestConfig,
    KeyType,
    ReferenceDigest,
    generate_private_key,
    make_manifest,
    public_key_pem,
    sign_envelope,
)
from sevlaunch.rpc import secure_channel_sync
from sevlaunch.rpc.v1 import common_pb2, owner_pb2, owner_pb2_grpc
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.policy import PolicyFlags
from sevlaunch.sev.secret import SecretEntry
from sevlaunch.sev.technology import Technology

FIRMWARE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
ROOT_NAME = "emulated"
WORKLOAD_ID = "bench-workload"
POLICY = int(PolicyFlags.NODBG | PolicyFlags.NOKS)
SECRET_GPA = 0x80C000
#: A small SEV "image" for the owner throughput runs: the firmware emulator measures it in a fraction of
#: the time of the 3.5 MB OVMF, and the owner's work does not depend on the image size.
TINY_IMAGE = bytes(range(256)) * 16  # 4 KiB
TINY_GPA = 0xFFFFF000
MAX_GUESTS = 64


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (psutil is not installed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status_kb(pid: int, key: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def proc_tree(pid: int) -> list[int]:
    """`pid` and its descendants (an owner with --workers is a supervisor and its workers)."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += proc_tree(int(child))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(proc_cpu_seconds(p) for p in proc_tree(pid))


def tree_status_kb(pid: int, key: str) -> int:
    """The sum over the process tree: with --workers, the owner's memory is all of its processes'."""
    return sum(proc_status_kb(p, key) for p in proc_tree(pid))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric_sum(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus series whose labels include `labels`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@dataclass
class Host:
    index: int
    chip_dir: Path
    firmware: EmulatedFirmware
    platform: ServiceProcess | None = None
    launcher: ServiceProcess | None = None


class World:
    """`World(hosts=4)`, then `prepare()`, `start_owner()`, `start_hosts()`, `configure_owner()`,
    and `close()` (also a context manager)."""

    def __init__(self, *, hosts: int = 1, firmware: Path = FIRMWARE, workdir: Path | None = None) -> None:
        self.firmware = firmware
        self.workdir = Path(tempfile.mkdtemp(prefix="sevlaunch-bench-")) if workdir is None else workdir
        self.n_hosts = hosts
        self.tls_dir = self.workdir / "tls"
        self.logs = self.workdir / "logs"
        self.hosts: list[Host] = []
        self.kds: KDSServer | None = None
        self.owner: ServiceProcess | None = None
        self.extra: list[ServiceProcess] = []
        self.envelope = b""
        self.publisher_pub = self.workdir / "publisher.pub"
        self.root_file = self.workdir / "ask_ark.cert"
        self.secret = SecretEntry.disk_passphrase(os.urandom(18).hex().encode())
        self._channels: list[grpc.Channel] = []
        self.root: EmulatedRoot | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        write_dev_certs(self.tls_dir)
        # One emulated AMD root for every chip: the owner trusts it once.
        self.root = root = EmulatedRoot.generate()
        config = ChipConfig(generation=ROOT_NAME, max_guests=MAX_GUESTS)
        for i in range(self.n_hosts):
            chip_dir = self.workdir / f"host{i}" / "chip"
            fw = EmulatedFirmware(chip_dir, config=config, root=root)
            fw.pdh_cert_export()  # INIT and key generation now, not inside a timed run
            self.hosts.append(Host(i, chip_dir, fw))
        self.root_file.write_bytes(self.hosts[0].firmware.ask_ark())
        self.kds = KDSServer([h.firmware for h in self.hosts], host="127.0.0.1", port=0).start()
        image = self.firmware.read_bytes()
        key = generate_private_key(KeyType.ECDSA_P256)
        self.publisher_pub.write_bytes(public_key_pem(key.public_key()))
        manifest = make_manifest(
            publisher="sevlaunch-bench",
            firmware_name="OVMF",
            firmware_version="bench",
            digests=[
                ReferenceDigest(bytes(launch_digest(image, mode="sev")), DigestConfig(Technology.SEV)),
                ReferenceDigest(hashlib.sha256(TINY_IMAGE).digest(), DigestConfig(Technology.SEV)),
            ],
            valid_days=1,
        )
        self.envelope = sign_envelope(manifest.to_json(), key).to_json()

    def owner_args(self, db: Path, listen: str = "127.0.0.1:0") -> list[str]:
        return [
            "--tls-dir", str(self.tls_dir),
            "--listen", listen,
            "--metrics-listen", "127.0.0.1:0",
            "--db", str(db),
            "--kek-file", str(self.workdir / "owner" / "kek"),
            "--create-kek",
            "--trust-root", f"{ROOT_NAME}={self.root_file}",
            "--publisher-key", str(self.publisher_pub),
        ]  # fmt: skip

    def _spawn(self, name: str, args: Sequence[str], log_name: str) -> ServiceProcess:
        with signals_deferred():
            proc = start_service(name, args, log_path=self.logs / f"{log_name}.log")
        self.extra.append(proc)
        return proc

    def _wait(self, procs: Sequence[ServiceProcess], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for p in procs:
            wait_started(p, deadline=deadline)
        for p in procs:
            wait_serving(p, tls_dir=self.tls_dir, deadline=deadline)

    def start_owner(self, db_name: str = "owner.db", *, workers: int = 1) -> ServiceProcess:
        """The owner; with `workers` > 1, that many processes on one fixed port (`--workers`)."""
        (self.workdir / "owner").mkdir(exist_ok=True)
        db = self.workdir / "owner" / db_name
        if workers > 1:
            args = [*self.owner_args(db, listen=f"127.0.0.1:{free_port()}"), "--workers", str(workers)]
        else:
            args = self.owner_args(db)
        owner = self._spawn("owner", args, f"owner-{db_name}")
        self._wait([owner])
        self.owner = owner
        return owner

    def spawn_owner(self, db_name: str, *extra: str) -> ServiceProcess:
        """Another owner process (one worker, its own database) next to `self.owner`, started."""
        owner = self._spawn("owner", [*self.owner_args(self.workdir / "owner" / db_name), *extra], db_name)
        self._wait([owner])
        return owner

    def start_platform(self, host: Host, *, cek_cache: bool = True, tag: str = "") -> ServiceProcess:
        assert self.kds is not None
        args = [
            "--tls-dir", str(self.tls_dir),
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--emulator", str(host.chip_dir),
            "--kds-url", self.kds.url,
        ]  # fmt: skip
        if cek_cache:
            args += ["--cek-cache-dir", str(host.chip_dir.parent / "cek-cache")]
        proc = self._spawn("platform", args, f"platform{host.index}{tag}")
        self._wait([proc])
        return proc

    def start_hosts(self) -> None:
        for host in self.hosts:
            host.platform = self.start_platform(host)
        for host in self.hosts:
            assert host.platform is not None
            host.launcher = self._spawn(
                "launcher",
                [
                    "--tls-dir", str(self.tls_dir),
                    "--listen", "127.0.0.1:0",
                    "--metrics-listen", "127.0.0.1:0",
                    "--platform", host.platform.address,
                    "--hypervisor", "emulated",
                    "--emulator", str(host.chip_dir),
                    "--db", str(host.chip_dir.parent / "launcher.db"),
                    "--secret-gpa", hex(SECRET_GPA),
                    "--image-dir", str(self.firmware.resolve().parent),
                ],
                f"launcher{host.index}",
            )  # fmt: skip
        self._wait([h.launcher for h in self.hosts if h.launcher is not None])

    def channel(self, address: str, identity: str) -> grpc.Channel:
        ch = secure_channel_sync(address, self.tls_dir, identity)
        self._channels.append(ch)
        return ch

    def configure_owner(self, address: str) -> None:
        admin = owner_pb2_grpc.OwnerServiceStub(self.channel(address, "owner-admin"))
        admin.ImportReferenceValues(
            owner_pb2.ImportReferenceValuesRequest(envelope=self.envelope), timeout=30
        )
        admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=self.workload_proto()), timeout=30)
        admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id=WORKLOAD_ID,
                entries=[owner_pb2.SecretEntry(guid=str(self.secret.guid), data=self.secret.data)],
            ),
            timeout=30,
        )

    @staticmethod
    def workload_proto() -> owner_pb2.Workload:
        return owner_pb2.Workload(
            workload_id=WORKLOAD_ID,
            allowed_policies=[POLICY],
            generations=[ROOT_NAME],
            selectors=[
                owner_pb2.ReferenceSelector(firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV])
            ],
        )

    def secret_table(self) -> bytes:
        """The secret table the owner releases (its size sets the physical floor's AES-CTR and HMAC)."""
        from sevlaunch.sev.secret import SecretTable

        return SecretTable.of([self.secret]).to_bytes()

    # -- what a client of the owner needs ---------------------------------------------------------

    def chain_proto(self, host: Host) -> common_pb2.CertificateChain:
        """The chain platform_svc would serve for this host: PDH, PEK, OCA, the KDS's ASK-signed CEK,
        and the emulated ASK/ARK."""
        pdh, blob = host.firmware.pdh_cert_export()
        pek, oca = blob[:0x824], blob[0x824:0x1048]
        ask_ark = host.firmware.ask_ark()
        from sevlaunch.sev.amd_cert import parse_ask_ark

        ask, ark = parse_ask_ark(ask_ark)
        return common_pb2.CertificateChain(
            pdh_cert=pdh,
            pek_cert=pek,
            oca_cert=oca,
            cek_cert=host.firmware.kds_cek(),
            ask_cert=ask.to_bytes(),
            ark_cert=ark.to_bytes(),
        )

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        for proc in reversed(self.extra):
            proc.stop()
        if self.kds is not None:
            self.kds.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_with_firmware(fw: EmulatedFirmware, godh: bytes, blob: bytes, policy: int = POLICY) -> bytes:
    """What the host does between OpenSession and ReleaseSecret, on the emulated firmware: LAUNCH_START
    with the owner's GODH and session blob, LAUNCH_UPDATE_DATA of the tiny image, LAUNCH_MEASURE; the
    guest context is decommissioned at once (its ASID is freed)."""
    handle = fw.launch_start(godh, blob, policy)
    try:
        fw.launch_update_data(handle, TINY_GPA, TINY_IMAGE)
        return fw.launch_measure(handle)
    finally:
        fw.decommission(handle)
