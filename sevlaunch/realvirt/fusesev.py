"""`/dev/sev` as a FUSE file, answered by the emulated firmware: DevSev's ioctls go through the kernel.

    python -m sevlaunch.realvirt.fusesev --chip STATE_DIR --mountpoint FILE [--read-only-node]

There is no CUSE here (/dev/cuse is absent), so the device is a FUSE filesystem whose root is a regular
file, mounted over FILE (root, mount(2) on /dev/fuse, no libfuse: the FUSE protocol is small, and no
Python binding of libfuse lets an ioctl answer carry data together with an error, which SEV_ISSUE_CMD
needs). The server runs in its own mount namespace, so the mount dies with it; clients reach it as
`/proc/<server pid>/root<FILE>` (`FuseSevDevice.path`).

What the kernel carries and what it cannot:
* A FUSE regular file gets only "restricted" ioctls: the kernel copies `_IOC_SIZE(cmd)` bytes of the
  argument in and out, which for SEV_ISSUE_CMD (`_IOWR('S', 0, struct sev_issue_cmd)`) is the 16-byte
  `struct sev_issue_cmd` itself, `error` included. Its `data` pointer to the command's own structure
  (and that structure's pointers to certificate buffers) are the caller's addresses, which the kernel
  does not follow for FUSE. The server does what sev-dev.c does with `copy_from_user` /
  `copy_to_user`: it reads and writes the caller's memory, with process_vm_readv / process_vm_writev
  on the pid of the FUSE request (the server is root).
* The reply is FUSE_IOCTL's (result, data): a failed firmware command answers result -EIO *and* the
  updated `sev_issue_cmd` whose `error` holds the firmware status, as sev_ioctl copies `input` back
  before returning -EIO, so the caller sees errno EIO and the status.

sev-dev.c's rules kept here: a command other than SEV_ISSUE_CMD is EINVAL, an unknown SEV command
EINVAL; PEK_GEN, PDH_GEN, PEK_CSR, PEK_CERT_IMPORT and FACTORY_RESET need a descriptor opened for
writing (EPERM otherwise), as does PDH_CERT_EXPORT when the platform still needs INIT; PEK_CSR,
PDH_CERT_EXPORT and GET_ID2 given too little room answer INVALID_LENGTH with the lengths they need
written back. `--read-only-node` refuses opens for writing (EACCES), like a 0444 device node for an
unprivileged user, so a client falls back to a read-only descriptor.
Layouts follow include/uapi/linux/psp-sev.h and include/uapi/linux/fuse.h, written here with `struct`
independently of DevSev's ctypes structures, which is what the tests compare.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sevlaunch.firmware import EmulatedFirmware, FirmwareError, PlatformState, StatusCode

# -- FUSE protocol (include/uapi/linux/fuse.h) --------------------------------------------------------
FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR = 1, 2, 3
FUSE_OPEN, FUSE_RELEASE, FUSE_FLUSH, FUSE_INIT = 14, 18, 25, 26
FUSE_ACCESS, FUSE_DESTROY, FUSE_INTERRUPT, FUSE_IOCTL, FUSE_BATCH_FORGET = 34, 38, 36, 39, 42
_NO_REPLY = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT})
_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ..., max_pages, map_alignment, flags2, max_stack_depth
_ATTR_OUT = struct.Struct("<QII" + "QQQQQQIIIIIIIIII")  # attr_valid(+nsec,dummy) + struct fuse_attr
_OPEN_IN = struct.Struct("<II")
_OPEN_OUT = struct.Struct("<QII")
_IOCTL_IN = struct.Struct("<QIIQII")  # fh, flags, cmd, arg, in_size, out_size
_IOCTL_OUT = struct.Struct("<iIII")  # result, flags, in_iovs, out_iovs
FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR = 7, 31
_READ_BUFFER = 1 << 20 | 4096

# -- /dev/sev (include/uapi/linux/psp-sev.h) ----------------------------------------------------------
ISSUE_CMD = struct.Struct("<IQI")  # struct sev_issue_cmd: cmd, data, error (packed, 16 bytes)
SEV_ISSUE_CMD = (3 << 30) | (ISSUE_CMD.size << 16) | (ord("S") << 8) | 0
_ADDR_LEN = struct.Struct("<QI")  # sev_user_data_pek_csr / sev_user_data_get_id2
_TWO_ADDR_LEN = struct.Struct("<QIQI")  # sev_user_data_pek_cert_import / pdh_cert_export
GET_ID_SIZE = 128  # sev_user_data_get_id: socket1[64], socket2[64]
SEV_FW_BLOB_MAX_SIZE = 0x4000
(SEV_FACTORY_RESET, SEV_PLATFORM_STATUS, SEV_PEK_GEN, SEV_PEK_CSR, SEV_PDH_GEN, SEV_PDH_CERT_EXPORT,
 SEV_PEK_CERT_IMPORT, SEV_GET_ID, SEV_GET_ID2) = range(9)  # fmt: skip

_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_CLONE_NEWNS = 0x00020000
_MNT_DETACH = 2
_S_IFREG = 0o100000


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class CallerMemory:
    """The calling process's memory, as copy_from_user / copy_to_user see it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self, address: int, length: int) -> bytes:
        if length == 0:
            return b""
        buf = ctypes.create_string_buffer(length)
        local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), length)
        remote = _Iovec(address, length)
        got = _libc.process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != length:
            raise OSError(errno.EFAULT, "bad address")
        return buf.raw

    def write(self, address: int, data: bytes) -> None:
        if not data:
            return
        buf = ctypes.create_string_buffer(data, len(data))
        local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
        remote = _Iovec(address, len(data))
        put = _libc.process_vm_writev(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if put != len(data):
            raise OSError(errno.EFAULT, "bad address")


class _Refusal(Exception):
    """An ioctl answered with -errno (and, for EIO, the firmware status in `error`)."""

    def __init__(self, err: int, status: int = 0) -> None:
        super().__init__(err)
        self.err, self.status = err, status


@dataclass
class SevDevice:
    """sev_ioctl's command handling on the emulated firmware; `issue` returns (result, sev_issue_cmd)."""

    fw: EmulatedFirmware
    log: list[str] = field(default_factory=list)

    def issue(self, raw: bytes, memory: CallerMemory, writable: bool) -> tuple[int, bytes]:
        cmd, data, _ = ISSUE_CMD.unpack(raw)
        self.log.append(f"cmd={cmd}")
        try:
            self._dispatch(cmd, data, memory, writable)
        except _Refusal as refusal:
            return -refusal.err, ISSUE_CMD.pack(cmd, data, refusal.status)
        except FirmwareError as exc:
            return -errno.EIO, ISSUE_CMD.pack(cmd, data, int(exc.status))
        except OSError as exc:
            return -(exc.errno or errno.EFAULT), ISSUE_CMD.pack(cmd, data, 0)
        return 0, ISSUE_CMD.pack(cmd, data, 0)

    @staticmethod
    def _need_writable(writable: bool) -> None:
        if not writable:
            raise _Refusal(errno.EPERM)

    def _dispatch(self, cmd: int, data: int, mem: CallerMemory, writable: bool) -> None:
        fw = self.fw
        if cmd == SEV_PLATFORM_STATUS:
            mem.write(data, fw.platform_status().to_bytes())
        elif cmd in (SEV_PEK_GEN, SEV_PDH_GEN, SEV_FACTORY_RESET):
            self._need_writable(writable)
            {SEV_PEK_GEN: fw.pek_gen, SEV_PDH_GEN: fw.pdh_gen, SEV_FACTORY_RESET: fw.factory_reset}[cmd]()
        elif cmd == SEV_PEK_CSR:
            self._need_writable(writable)
            address, length = _ADDR_LEN.unpack(mem.read(data, _ADDR_LEN.size))
            csr = fw.pek_csr()
            if not address or length < len(csr):
                mem.write(data, _ADDR_LEN.pack(address, len(csr)))
                raise _Refusal(errno.EIO, StatusCode.INVALID_LENGTH)
            mem.write(address, csr)
            mem.write(data, _ADDR_LEN.pack(address, len(csr)))
        elif cmd == SEV_PDH_CERT_EXPORT:
            if fw.platform_status().state is PlatformState.UNINIT:
                self._need_writable(writable)
            pdh_addr, pdh_len, chain_addr, chain_len = _TWO_ADDR_LEN.unpack(
                mem.read(data, _TWO_ADDR_LEN.size)
            )
            pdh, chain = fw.pdh_cert_export()
            if not pdh_addr or not chain_addr or pdh_len < len(pdh) or chain_len < len(chain):
                mem.write(data, _TWO_ADDR_LEN.pack(pdh_addr, len(pdh), chain_addr, len(chain)))
                raise _Refusal(errno.EIO, StatusCode.INVALID_LENGTH)
            mem.write(pdh_addr, pdh)
            mem.write(chain_addr, chain)
            mem.write(data, _TWO_ADDR_LEN.pack(pdh_addr, len(pdh), chain_addr, len(chain)))
        elif cmd == SEV_PEK_CERT_IMPORT:
            self._need_writable(writable)
            pek_addr, pek_len, oca_addr, oca_len = _TWO_ADDR_LEN.unpack(mem.read(data, _TWO_ADDR_LEN.size))
            if not pek_len or not oca_len or max(pek_len, oca_len) > SEV_FW_BLOB_MAX_SIZE:
                raise _Refusal(errno.EINVAL)
            fw.pek_cert_import(mem.read(pek_addr, pek_len), mem.read(oca_addr, oca_len))
        elif cmd == SEV_GET_ID2:
            address, length = _ADDR_LEN.unpack(mem.read(data, _ADDR_LEN.size))
            chip_id = bytes(fw.get_id())
            if not address or length < len(chip_id):
                mem.write(data, _ADDR_LEN.pack(address, len(chip_id)))
                raise _Refusal(errno.EIO, StatusCode.INVALID_LENGTH)
            mem.write(address, chip_id)
            mem.write(data, _ADDR_LEN.pack(address, len(chip_id)))
        elif cmd == SEV_GET_ID:
            chip_id = bytes(fw.get_id())
            mem.write(data, chip_id[:64].ljust(GET_ID_SIZE, b"\0"))
        else:
            raise _Refusal(errno.EINVAL)


class FuseServer:
    """One FUSE connection whose root node is the device file."""

    def __init__(self, device: SevDevice, *, read_only_node: bool = False) -> None:
        self.device = device
        self.read_only_node = read_only_node
        self.fd = -1
        self._handles: dict[int, bool] = {}  # fh -> opened for writing
        self._next_fh = 1

    def mount(self, mountpoint: str) -> None:
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode={_S_IFREG:o},user_id=0,group_id=0,allow_other".encode()
        _check(
            _libc.mount(b"sevlaunch-sev", mountpoint.encode(), b"fuse", _MS_NOSUID | _MS_NODEV, options),
            f"mount fuse on {mountpoint}",
        )

    def serve(self) -> None:
        while True:
            try:
                request = os.read(self.fd, _READ_BUFFER)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return
                raise
            reply = self.handle(request)
            if reply is not None:
                try:
                    os.write(self.fd, reply)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
                        raise

    def handle(self, request: bytes) -> bytes | None:
        length, opcode, unique, _node, _uid, _gid, pid, _ext, _pad = _IN_HEADER.unpack_from(request)
        body = request[_IN_HEADER.size : length]
        if opcode in _NO_REPLY:
            return None
        error, payload = self._dispatch(opcode, body, pid)
        return _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), error, unique) + payload

    def _dispatch(self, opcode: int, body: bytes, pid: int) -> tuple[int, bytes]:
        if opcode == FUSE_INIT:
            major, _minor, readahead, _flags = _INIT_IN.unpack_from(body)
            if major != FUSE_KERNEL_VERSION:
                return -errno.EPROTO, b""
            return 0, _INIT_OUT.pack(
                FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR, readahead, 0, 1, 1, 4096, 1, 1, 0, 0, 0
            )
        if opcode == FUSE_GETATTR:
            mode = _S_IFREG | (0o444 if self.read_only_node else 0o600)
            now = int(time.time())
            attr = _ATTR_OUT.pack(1, 0, 0, 1, 0, 0, now, now, now, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)
            return 0, attr
        if opcode == FUSE_OPEN:
            flags, _ = _OPEN_IN.unpack_from(body)
            writing = (flags & os.O_ACCMODE) != os.O_RDONLY
            if writing and self.read_only_node:
                return -errno.EACCES, b""
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            self._handles[fh] = writing
            return 0, _OPEN_OUT.pack(fh, 0, 0)
        if opcode == FUSE_RELEASE:
            (fh,) = struct.unpack_from("<Q", body)
            self._handles.pop(fh, None)
            return 0, b""
        if opcode in (FUSE_FLUSH, FUSE_ACCESS):
            return 0, b""
        if opcode == FUSE_IOCTL:
            fh, _flags, cmd, _arg, in_size, out_size = _IOCTL_IN.unpack_from(body)
            if cmd != SEV_ISSUE_CMD or in_size != ISSUE_CMD.size or out_size != ISSUE_CMD.size:
                return 0, _IOCTL_OUT.pack(-errno.EINVAL, 0, 0, 0)
            raw = body[_IOCTL_IN.size : _IOCTL_IN.size + in_size]
            result, out = self.device.issue(raw, CallerMemory(pid), self._handles.get(fh, False))
            return 0, _IOCTL_OUT.pack(result, 0, 0, 0) + out
        if opcode == FUSE_DESTROY:
            return 0, b""
        return -errno.ENOSYS, b""


class FuseSevDevice:
    """Starts the server process (its own mount namespace) and gives the path to open; a context manager."""

    def __init__(self, chip_dir: Path, workdir: Path, *, read_only_node: bool = False) -> None:
        self.chip_dir, self.workdir, self.read_only_node = Path(chip_dir), Path(workdir), read_only_node
        self.mountpoint = self.workdir / "sev"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> str:
        assert self.process is not None
        return f"/proc/{self.process.pid}/root{self.mountpoint}"

    def start(self, timeout: float = 10.0) -> FuseSevDevice:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.touch()
        argv = [sys.executable, "-m", "sevlaunch.realvirt.fusesev", "--chip", str(self.chip_dir),
                "--mountpoint", str(self.mountpoint)]  # fmt: skip
        if self.read_only_node:
            argv.append("--read-only-node")
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the FUSE /dev/sev server did not start: {line!r}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> FuseSevDevice:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sevlaunch.realvirt.fusesev", description=__doc__.split("\n")[0]
    )
    p.add_argument("--chip", required=True, help="the emulated chip's state directory")
    p.add_argument("--mountpoint", required=True, help="an existing regular file to mount the device on")
    p.add_argument("--read-only-node", action="store_true", help="refuse opens for writing (EACCES)")
    args = p.parse_args(argv)
    # A mount namespace of our own: the mount goes when this process does, however it ends.
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "make / private")  # MS_PRIVATE|MS_REC
    server = FuseServer(
        SevDevice(EmulatedFirmware(args.chip, create=False)), read_only_node=args.read_only_node
    )
    server.mount(args.mountpoint)
    signal.signal(signal.SIGTERM, lambda *_: _libc.umount2(args.mountpoint.encode(), _MNT_DETACH))
    print("ready", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
