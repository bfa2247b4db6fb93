"""A private libvirtd and virtlogd for tests: root, no systemd, nothing shared with a system daemon.

libvirtd run as root (qemu:///system) keeps its sockets, domain state, capability cache, logs and
configuration at fixed paths (/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt,
/etc/libvirt). Both daemons therefore run in a mount namespace of their own (`unshare --mount`) in
which those five directories are bind mounts of folders under one temporary root: a system libvirtd,
if any, never sees them and they never see it. QEMU processes inherit the namespace. The clients stay
outside and reach the daemon through `qemu:///system?socket=ROOT/run/libvirt-sock`, the socket's path
as the host sees it.

The configuration is the one a test host needs (root QEMU, no cgroups, no per-domain /dev namespace,
no security driver, no polkit) and PATH puts an optional directory first: libvirt looks
`qemu-system-x86_64` up on PATH, so a stand-in there becomes every domain's emulator without an
`<emulator>` element in the domain XML.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The binaries a private daemon needs, and the Debian packages that ship them.
REQUIRED_BINARIES = {
    "libvirtd": "libvirt-daemon",
    "virtlogd": "libvirt-daemon",
    "qemu-system-x86_64": "qemu-system-x86",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "mount": "mount",
}
#: The fixed directories of a root libvirtd; each becomes a bind mount of ROOT/<key>.
_MOUNTS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}
_PR_SET_PDEATHSIG = 1
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LIBVIRTD_CONF = """\
# Private test daemon: unix sockets only, no polkit (no polkitd without systemd).
listen_tls = 0
listen_tcp = 0
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'
QEMU_CONF = """\
# A test host, not a production one: QEMU runs as root without a security driver, cgroups or a private
# /dev, so libvirt needs neither systemd nor device nodes (there is no /dev/sev here).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "logd"
"""


def missing_binaries() -> list[str]:
    """`name (Debian package)` for each binary that is not installed."""
    out = []
    for name, package in REQUIRED_BINARIES.items():
        if shutil.which(name, path=_SBIN_PATH) is None:
            out.append(f"{name} ({package})")
    return out


#: Debian's compiled-in QEMU user and group (libvirt-daemon-system's postinst creates them).
_QEMU_ACCOUNT = "libvirt-qemu"
_QEMU_GROUP = "kvm"


def _write_accounts(root: Path) -> None:
    """ROOT/passwd and ROOT/group: the host's, plus libvirt-qemu and kvm when the host lacks them."""
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    if not any(line.split(":", 1)[0] == _QEMU_GROUP for line in group.splitlines()):
        group += f"{_QEMU_GROUP}:x:64054:\n"
    gid = next(line.split(":")[2] for line in group.splitlines() if line.split(":", 1)[0] == _QEMU_GROUP)
    if not any(line.split(":", 1)[0] == _QEMU_ACCOUNT for line in passwd.splitlines()):
        passwd += f"{_QEMU_ACCOUNT}:x:64055:{gid}:libvirt test QEMU:/var/lib/libvirt:/usr/sbin/nologin\n"
    if not any(line.split(":", 1)[0] == _QEMU_ACCOUNT for line in group.splitlines()):
        group += f"{_QEMU_ACCOUNT}:x:64055:\n"
    (root / "passwd").write_text(passwd)
    (root / "group").write_text(group)


def _terminate_with_parent() -> None:
    # A test run that dies (SIGKILL, a crash) must not leave a root libvirtd behind.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class DaemonError(Exception):
    """The private daemon did not start; the message quotes its log."""


# The boot script runs in a mount namespace of its own (its bind mounts stay out of the host's).
_UNSHARE = ("unshare", "--mount", "--propagation", "private")
_BOOT = r"""
set -eu
R="$1"
for pair in run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt \
            etc:/etc/libvirt; do
    mount --bind "$R/${pair%%:*}" "${pair#*:}"
done
# Debian's libvirt resolves its default QEMU user before it reads qemu.conf; libvirt-daemon-system
# would add that user to the host, the namespace gets its own copy of the two files instead.
mount --bind "$R/passwd" /etc/passwd
mount --bind "$R/group" /etc/group
# virtlogd ends with this process (the reaper after the exec below), libvirtd with the test process.
setpriv --pdeathsig TERM virtlogd --pid-file "$R/virtlogd.pid" --config /etc/libvirt/virtlogd.conf &
i=0
while [ ! -S /run/libvirt/virtlogd-sock ]; do
    i=$((i + 1)); [ "$i" -lt 200 ] || { echo "virtlogd did not start" >&2; exit 1; }
    sleep 0.05
done
exec "$2" -c "$3" libvirtd --pid-file "$R/libvirtd.pid" --config /etc/libvirt/libvirtd.conf
"""

# What the boot script becomes once virtlogd runs: libvirtd's parent, a child subreaper. A QEMU (here
# the stand-in) daemonizes, so once it exits only its parent can reap it; without a subreaper that is
# PID 1, and an init that reaps late (this machine's reaps about once a second) keeps libvirt, which
# polls the pid every 200 ms until it is gone, waiting for it in every destroy and failed start.
# Signals reach libvirtd through it; it ends when libvirtd does.
_REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
daemon = os.fork()
if daemon == 0:
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: libvirtd ends with this process
    os.execvp(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda signum, _frame: os.kill(daemon, signum))
while True:
    pid, status = os.wait()
    if pid == daemon:
        code = os.waitstatus_to_exitcode(status)
        sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class PrivateLibvirt:
    """`start()` it, use `uri`, `stop()` it. `emulator_dir` (optional) goes first on the daemon's PATH."""

    root: Path
    emulator_dir: Path | None = None
    qemu_conf_extra: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_dir(self) -> Path:
        """libvirtd.log, virtlogd.log and qemu/<domain>.log (QEMU's stderr through virtlogd)."""
        return self.root / "log"

    def start(self, timeout: float = 30.0) -> PrivateLibvirt:
        missing = missing_binaries()
        if missing:
            raise DaemonError(f"not installed: {', '.join(missing)}")
        for key, mountpoint in _MOUNTS.items():
            (self.root / key).mkdir(parents=True, exist_ok=True, mode=0o700)
            # The mount points themselves; what libvirt-daemon-system would create. Empty on the host.
            Path(mountpoint).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
        (etc / "qemu.conf").write_text(QEMU_CONF + self.qemu_conf_extra)
        _write_accounts(self.root)
        path = _SBIN_PATH if self.emulator_dir is None else f"{self.emulator_dir}:{_SBIN_PATH}"
        env = {"PATH": path, "HOME": str(self.root), "LC_ALL": "C"}
        with open(self.root / "boot.log", "ab") as log:
            self.process = subprocess.Popen(
                [*_UNSHARE, "sh", "-c", _BOOT, "boot", str(self.root), sys.executable, _REAPER],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DaemonError(f"libvirtd did not start: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("boot.log", "log/libvirtd.log", "log/virtlogd.log"):
            try:
                text += "\n".join((self.root / name).read_text(errors="replace").splitlines()[-lines:]) + "\n"
            except OSError:
                continue
        return text.strip()

    def _pids(self) -> list[int]:
        """QEMU processes (the stand-ins libvirt started) by libvirt's pid files, then virtlogd."""
        files = [*sorted((self.root / "run" / "qemu").glob("*.pid")), self.root / "virtlogd.pid"]
        pids = []
        for pid_file in files:
            try:
                pids.append(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def stop(self, timeout: float = 10.0) -> None:
        """Stops libvirtd (its process group), then any QEMU it left running and virtlogd, by their pids."""
        process, self.process = self.process, None
        leftovers = self._pids()
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                continue
        # The mounts die with the namespace (its last process); the folders stay for the caller to read.
