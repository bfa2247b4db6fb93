"""Two SEV hosts and one owner, on a network of their own (Linux network namespaces).

    ns "br":  bridge br0 10.231.7.254/24 (also the emulated AMD KDS, :8080)
    ns "own": eth0 10.231.7.1/24   owner_svc :50053
    ns "h1":  eth0 10.231.7.11/24  platform_svc 127.0.0.1:50051, launcher_svc 127.0.0.1:50052 (chip 1)
    ns "h2":  eth0 10.231.7.12/24  the same, with chip 2 (same emulated AMD root as chip 1)

Everything is started the way an operator would: the `sevlaunch-*` services and the `sevlaunch` CLI
(`emulator init/kds`, `keygen`, `refvalues make/sign`, `owner ...`, `launch`), each inside its namespace
with `ip netns exec`. The addresses exist only inside these namespaces; the namespaces are removed at the
end whatever happens. Needs root and iproute2; skipped otherwise, saying why.

The fail-closed check is made deterministic without timing games: the test holds chip 2's firmware lock
(the emulator serialises commands with a file lock, like the real PSP) while the launch opens its session,
so the launch waits at LAUNCH_START; it cuts the owner's link right then, and lets go of the lock. The
launch then measures and cannot reach the owner to release the secret: it must fail closed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sevlaunch.demo.services import ServiceProcess, start_service, wait_started
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.firmware.state import LOCK_NAME

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
SUBNET = "10.231.7"
OWNER_IP = f"{SUBNET}.1"
KDS_IP = f"{SUBNET}.254"
HOST_IPS = {"h1": f"{SUBNET}.11", "h2": f"{SUBNET}.12"}
OWNER_ADDR = f"{OWNER_IP}:50053"
WORKLOAD = "multihost-web"
#: Short, so that a cut link fails the launch quickly; every other phase keeps the default 30 s.
RELEASE_TIMEOUT = 2.0


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (this test creates and removes its own)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"slprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


_NO_NETNS = _why_no_namespaces()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_NO_NETNS is not None, reason=_NO_NETNS or ""),
    pytest.mark.skipif(not OVMF.is_file(), reason="Debian's OVMF (package ovmf) is not installed"),
]


def sh(*argv: str, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEVLAUNCH_")}


@dataclass
class Net:
    """The namespaces (logical name → real name) and everything started in them."""

    ns: dict[str, str]
    work: Path
    services: list[ServiceProcess] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name]]

    def cli(self, name: str, *args: str, timeout: float = 60) -> str:
        """`sevlaunch ARGS` inside namespace `name`."""
        return sh(*self.exec_prefix(name), sys.executable, "-m", "sevlaunch", *args, timeout=timeout)

    def python_in(self, name: str, code: str) -> str:
        return sh(*self.exec_prefix(name), sys.executable, "-c", code)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    ns = {name: f"sl{name}-{tag}" for name in ("br", "own", "h1", "h2")}
    made: list[str] = []
    n = Net(ns=ns, work=tmp_path_factory.mktemp("multihost"))
    try:
        for real in ns.values():
            sh("ip", "netns", "add", real)
            made.append(real)
            sh("ip", "-n", real, "link", "set", "lo", "up")
        br = ns["br"]
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "addr", "add", f"{KDS_IP}/24", "dev", "br0")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        for name, ip in (("own", OWNER_IP), *HOST_IPS.items()):
            port = f"p-{name}"
            # Each namespace's end is simply eth0: names are per namespace, nothing touches the host's.
            sh("ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns[name])
            sh("ip", "-n", br, "link", "set", port, "master", "br0")
            sh("ip", "-n", br, "link", "set", port, "up")
            sh("ip", "-n", ns[name], "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns[name], "link", "set", "eth0", "up")
        yield n
    finally:
        # Services first (so nothing is left running in a namespace being removed), then the namespaces;
        # their veth pairs and the bridge go with them.
        for service in reversed(n.services):
            service.stop(timeout=10)
        for proc in n.others:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        for real in made:
            subprocess.run(["ip", "netns", "del", real], capture_output=True, check=False)


@dataclass
class World:
    net: Net
    tls: Path
    chips: dict[str, Path]
    owner_db: Path
    owner_kek: Path


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen in {path} in time")


@pytest.fixture(scope="module")
def world(net: Net) -> World:
    w = net.work
    tls = w / "tls"
    sans = [a for ip in (OWNER_IP, KDS_IP, *HOST_IPS.values()) for a in ("--san", ip)]
    sh(sys.executable, "-m", "sevlaunch", "dev-certs", "--out", str(tls), *sans)

    # Two chips under one emulated AMD root, as two EPYC hosts share AMD's real one.
    chips = {"h1": w / "h1" / "chip", "h2": w / "h2" / "chip"}
    sh(sys.executable, "-m", "sevlaunch", "emulator", "init", "--state", str(chips["h1"]))
    sh(
        sys.executable,
        "-m",
        "sevlaunch",
        "emulator",
        "init",
        "--state",
        str(chips["h2"]),
        "--root",
        str(chips["h1"]),
    )

    kds_log = w / "kds.log"
    with open(kds_log, "wb") as log:
        kds = subprocess.Popen(
            [
                *net.exec_prefix("br"),
                sys.executable,
                "-m",
                "sevlaunch",
                "emulator",
                "kds",
                "--state",
                str(chips["h1"]),
                "--state",
                str(chips["h2"]),
                "--listen",
                f"{KDS_IP}:8080",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=clean_env(),
        )
    net.others.append(kds)
    _wait_for_text(kds_log, "emulated KDS on", kds)

    # The firmware publisher's side: a key, a manifest of the OVMF's SEV launch digest, signed.
    pub = w / "publisher"
    pub.mkdir()
    sh(sys.executable, "-m", "sevlaunch", "keygen", "--out", str(pub / "distro.key"))
    sh(
        sys.executable,
        "-m",
        "sevlaunch",
        "refvalues",
        "make",
        "--firmware",
        str(OVMF),
        "--name",
        "OVMF",
        "--version",
        "2022.11",
        "--publisher",
        "test-distro",
        "--out",
        str(pub / "ovmf.json"),
    )
    sh(
        sys.executable,
        "-m",
        "sevlaunch",
        "refvalues",
        "sign",
        "--key",
        str(pub / "distro.key"),
        str(pub / "ovmf.json"),
        "--out",
        str(pub / "ovmf.dsse"),
    )

    owner_dir = w / "owner"
    owner_dir.mkdir()
    owner = start_service(
        "owner",
        [
            "--listen",
            OWNER_ADDR,
            "--metrics-listen",
            "127.0.0.1:9103",
            "--tls-dir",
            str(tls),
            "--db",
            str(owner_dir / "owner.db"),
            "--kek-file",
            str(owner_dir / "kek"),
            "--create-kek",
            "--trust-root",
            f"emulated={chips['h1'] / 'ask_ark.cert'}",
            "--publisher-key",
            str(pub / "distro.key.pub"),
        ],
        log_path=w / "owner.log",
        dial_host=OWNER_IP,
        prefix=net.exec_prefix("own"),
        env=clean_env(),
    )
    net.services.append(owner)
    for host, chip in chips.items():
        platform = start_service(
            "platform",
            [
                "--listen",
                "127.0.0.1:50051",
                "--metrics-listen",
                "127.0.0.1:9101",
                "--tls-dir",
                str(tls),
                "--emulator",
                str(chip),
                "--kds-url",
                f"http://{KDS_IP}:8080",
            ],
            log_path=w / host / "platform.log",
            prefix=net.exec_prefix(host),
            env=clean_env(),
        )
        net.services.append(platform)
        launcher = start_service(
            "launcher",
            [
                "--listen",
                "127.0.0.1:50052",
                "--metrics-listen",
                "127.0.0.1:9102",
                "--tls-dir",
                str(tls),
                "--platform",
                "127.0.0.1:50051",
                "--hypervisor",
                "emulated",
                "--emulator",
                str(chip),
                "--db",
                str(w / host / "launcher.db"),
                "--secret-gpa",
                "0x80c000",
                "--phase-timeout",
                f"30,SECRET_RELEASED={RELEASE_TIMEOUT}",
                "--image-dir",
                str(OVMF.parent),
            ],
            log_path=w / host / "launcher.log",
            prefix=net.exec_prefix(host),
            env=clean_env(),
        )
        net.services.append(launcher)
    deadline = time.monotonic() + 60
    for service in net.services:
        wait_started(service, deadline=deadline)

    # The tenant's admin, from the owner's namespace, with the owner CLI.
    (owner_dir / "workload.json").write_text(
        json.dumps(
            {
                "workload_id": WORKLOAD,
                "allowed_policies": [3],
                "generations": ["emulated"],
                "selectors": [{"firmware_name": "OVMF", "modes": ["REFERENCE_MODE_SEV"]}],
            }
        )
    )
    passphrase = owner_dir / "luks.txt"
    fd = os.open(passphrase, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, uuid.uuid4().hex.encode())
    os.close(fd)
    admin = ["--endpoint", OWNER_ADDR, "--tls-dir", str(tls)]
    net.cli("own", "owner", "refvalues", "import", str(pub / "ovmf.dsse"), *admin)
    net.cli("own", "owner", "workload", "put", "--file", str(owner_dir / "workload.json"), *admin)
    net.cli(
        "own",
        "owner",
        "secret",
        "put",
        "--workload-id",
        WORKLOAD,
        "--passphrase-file",
        str(passphrase),
        *admin,
    )
    return World(net, tls, chips, owner_dir / "owner.db", owner_dir / "kek")


def launch_argv(world: World, host: str, name: str) -> list[str]:
    return [
        *world.net.exec_prefix(host),
        sys.executable,
        "-m",
        "sevlaunch",
        "launch",
        "--launcher",
        "127.0.0.1:50052",
        "--owner",
        OWNER_ADDR,
        "--workload",
        WORKLOAD,
        "--firmware",
        str(OVMF),
        "--tls-dir",
        str(world.tls),
        "--name",
        name,
        "--memory",
        "256",
    ]


def guest_count(chip: Path) -> int:
    return EmulatedFirmware(chip, create=False).platform_status().guest_count


def metrics_in(net: Net, ns: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(net.python_in(ns, code)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def owner_sessions(world: World) -> list[dict[str, object]]:
    out = world.net.cli(
        "own",
        "owner",
        "sessions",
        "--workload-id",
        WORKLOAD,
        "--endpoint",
        OWNER_ADDR,
        "--tls-dir",
        str(world.tls),
        "--json",
    )
    sessions: list[dict[str, object]] = json.loads(out)["sessions"]
    return sessions


def test_hosts_cannot_see_each_other_but_reach_the_owner(world: World) -> None:
    # The private addresses exist only inside the namespaces; each host has its own loopback services.
    code = "import socket; s=socket.create_connection(('{}', {}), timeout=3); print('ok')"
    assert world.net.python_in("h1", code.format(OWNER_IP, 50053)).strip() == "ok"
    assert world.net.python_in("h2", code.format(OWNER_IP, 50053)).strip() == "ok"
    with pytest.raises(AssertionError):
        world.net.python_in("h1", code.format(HOST_IPS["h2"], 50052))  # h2's launcher is on its loopback
    routes = sh("ip", "-4", "addr", "show")
    assert f"{SUBNET}." not in routes  # nothing leaked into the test's own namespace


def test_attested_launch_on_both_hosts(world: World) -> None:
    before = {h: guest_count(c) for h, c in world.chips.items()}
    procs = {
        host: subprocess.Popen(
            launch_argv(world, host, f"web-{host}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        for host in world.chips
    }
    outputs = {host: p.communicate(timeout=120)[0] for host, p in procs.items()}
    for host, proc in procs.items():
        assert proc.returncode == 0, outputs[host]
        lines = [line.split()[0] for line in outputs[host].splitlines() if line.strip()]
        assert lines == [
            "CHAIN_FETCHED",
            "SESSION_OPENED",
            "DEFINED",
            "STARTED_PAUSED",
            "MEASURED",
            "SECRET_RELEASED",
            "SECRET_INJECTED",
            "RUNNING",
        ], outputs[host]
        assert guest_count(world.chips[host]) == before[host] + 1

    sessions = owner_sessions(world)
    released = [s for s in sessions if s.get("state") == "RELEASED"]
    assert len(released) >= 2
    # Two different chips (CEKs) asked, one session each, under the same emulated AMD root.
    assert len({s["cek_fingerprint"] for s in released}) == 2


def test_owner_link_cut_mid_launch_fails_closed(world: World) -> None:
    net, chip = world.net, world.chips["h2"]
    # The chain export needs the chip too (PDH_CERT_EXPORT): have the platform cache it first, so that
    # only the launch's own firmware commands wait for the lock below.
    net.cli("h2", "platform", "chain", "--endpoint", "127.0.0.1:50051", "--tls-dir", str(world.tls),
            "--out", str(net.work / "h2-chain.bin"))  # fmt: skip
    running_before = guest_count(chip)
    released_key = ("sevlaunch_owner_secrets_released_total", ())
    released_before = metrics_in(net, "own", 9103).get(released_key, 0.0)
    sessions_before = {str(s["session_id"]) for s in owner_sessions(world)}
    lock_fd = os.open(chip / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    proc: subprocess.Popen[str] | None = None
    link_down = False
    seen: list[str] = []
    try:
        # Hold the chip: the launch gets its chain (cached) and its owner session, then waits at
        # LAUNCH_START, with a defined domain, until the test lets go.
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            launch_argv(world, "h2", "web-cut"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("DEFINED"):
                break
        assert [line.split()[0] for line in seen] == ["CHAIN_FETCHED", "SESSION_OPENED", "DEFINED"], seen

        sh("ip", "-n", net.ns["own"], "link", "set", "eth0", "down")
        link_down = True
        fcntl.flock(lock_fd, fcntl.LOCK_UN)

        for line in proc.stdout:
            seen.append(line)
            if line.startswith("MEASURED"):
                # Started paused and measured: a guest context exists on the chip right now.
                assert guest_count(chip) == running_before + 1
        proc.wait(timeout=60)
    finally:
        os.close(lock_fd)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if link_down:
            sh("ip", "-n", net.ns["own"], "link", "set", "eth0", "up")

    output = "".join(seen)
    assert proc.returncode == 1, output
    phases = [line.split()[0] for line in seen]
    assert phases == ["CHAIN_FETCHED", "SESSION_OPENED", "DEFINED", "STARTED_PAUSED", "MEASURED", "FAILED"], (
        output
    )
    assert "FAILED in SECRET_RELEASED" in output
    assert "deadline" in output or "unavailable" in output, output

    # Fail closed: the paused guest is gone from the chip, nothing resumed, the launcher counted it.
    assert guest_count(chip) == running_before
    launcher = metrics_in(net, "h2", 9102)
    key = (
        "sevlaunch_launcher_launches_total",
        (("failed_phase", "SECRET_RELEASED"), ("mode", "orchestrated"), ("outcome", "failed")),
    )
    assert launcher.get(key) == 1
    assert launcher.get(("sevlaunch_launcher_domains_destroyed_total", (("path", "fail_closed"),))) == 1
    assert launcher.get(("sevlaunch_launcher_launches_in_flight", ())) == 0

    # The owner (reachable again) opened the session and never released it.
    new = [s for s in owner_sessions(world) if str(s["session_id"]) not in sessions_before]
    assert len(new) == 1
    assert new[0]["state"] == "OPEN"
    assert not new[0].get("matched_digest")
    assert metrics_in(net, "own", 9103).get(released_key, 0.0) == released_before

    # And its audit log, read straight from the database with the KEK, is intact.
    out = sh(
        sys.executable,
        "-m",
        "sevlaunch",
        "owner",
        "audit",
        "verify",
        "--db",
        str(world.owner_db),
        "--kek-file",
        str(world.owner_kek),
    )
    assert "intact" in out
