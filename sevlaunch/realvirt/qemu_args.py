"""The QEMU stand-in's command-line work, pure: what libvirt asked for, and what real QEMU gets instead.

libvirt starts QEMU in one of two ways the stand-in must tell apart:
* the capability probe: `-machine none,accel=... -qmp unix:PATH,server=on,wait=off -pidfile P -daemonize`;
* a domain: `-chardev socket,id=charmonitor,fd=N,server=on,wait=off -mon chardev=charmonitor,...`
  (libvirt 9.0 hands QEMU an already-listening monitor socket), and for SEV
  `-object {"qom-type":"sev-guest",...,"dh-cert-file":F,"session-file":F,...}` with
  `-machine ...,confidential-guest-support=lsec0`.

The rewrite gives real QEMU a connected socket of the stand-in's own as its monitor, drops the SEV
object and the confidential-guest option (this host has no SEV), runs TCG where KVM was asked for (the
stand-in plays a KVM host; this machine's KVM cannot run guests), backs guest RAM with a shared file
(the stand-in writes LAUNCH_SECRET's plaintext there, as the PSP writes guest memory), drops
`-overcommit mem-lock=on`, and adds a serial port logged to a file (the test reads OVMF's console).
Option values follow QEMU's syntax: `key=value` pairs split on single commas (`,,` is a literal comma),
a leading bare value for the implied key, or a JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

#: Guest RAM below this address is one block at offset 0 of the RAM backend on q35 (its PCI hole
#: starts at 2 GiB at the latest), so a guest physical address there is a file offset.
Q35_LOW_RAM_LIMIT = 0x8000_0000


class ArgsError(ValueError):
    """A command line the stand-in does not understand (it refuses rather than guess)."""


def split_opts(text: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_opts(text: str, implied: str | None = None) -> dict[str, object]:
    """`a,b=c` → {implied: a, b: c}; a JSON object as it is."""
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ArgsError(f"bad JSON option {text[:40]!r}") from None
        if not isinstance(value, dict):
            raise ArgsError("a JSON option must be an object")
        return value
    out: dict[str, object] = {}
    for n, part in enumerate(split_opts(text)):
        key, sep, value = part.partition("=")
        if not sep:
            if n == 0 and implied is not None:
                out[implied] = key
                continue
            out[key] = "on"
            continue
        out[key] = value
    return out


def format_opts(opts: dict[str, object], implied: str | None = None) -> str:
    parts = []
    for key, value in opts.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        text = str(value).replace(",", ",,")
        parts.append(text if key == implied else f"{key}={text}")
    if implied is not None and implied in opts:
        parts.insert(0, parts.pop(list(opts).index(implied)))
    return ",".join(parts)


def _bool(value: object) -> bool:
    return value is True or str(value).lower() in ("on", "yes", "true", "1")


@dataclass
class SevParams:
    """The `sev-guest` object libvirt asked for."""

    object_id: str
    policy: int
    cbitpos: int
    reduced_phys_bits: int
    dh_cert_file: str | None
    session_file: str | None
    kernel_hashes: bool


@dataclass
class Plan:
    """What the stand-in does with one invocation."""

    qemu_argv: list[str]  # real QEMU's arguments, without the binary; MONITOR_FD where our fd goes
    probe: bool
    monitor_fd: int | None = None  # libvirt's listening monitor socket, handed to us
    monitor_path: str | None = None  # or a path we listen on (the probe's -qmp unix:)
    daemonize: bool = False
    pidfile: str | None = None
    name: str = ""
    sev: SevParams | None = None
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    cpu_model: str | None = None
    vcpus: int = 1
    ram_backend: str | None = None  # the memory-backend object's id, rewritten to a shared file
    ram_size: int = 0
    extra: dict[str, str] = field(default_factory=dict)


#: Options without a value (libvirt uses these; anything else starting with "-" takes one).
_FLAGS = frozenset({"-S", "-no-user-config", "-nodefaults", "-nographic", "-no-shutdown", "-no-acpi",
                    "-no-hpet", "-no-reboot", "-snapshot"})  # fmt: skip

MONITOR_FD = "@MONITOR_FD@"
RAM_PATH = "@RAM_PATH@"
SERIAL_PATH = "@SERIAL_PATH@"


def _int(value: object, what: str) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise ArgsError(f"{what} is not a number: {value!r}") from None


def _size(value: object) -> int:
    text = str(value)
    units = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def plan(argv: list[str]) -> Plan:
    """Reads libvirt's QEMU command line (without the binary) and builds real QEMU's."""
    out: list[str] = []
    p = Plan(qemu_argv=out, probe=False)
    monitor_chardevs: set[str] = set()
    # First pass: which chardev is the QMP monitor (-mon chardev=X,mode=control).
    for i, arg in enumerate(argv[:-1]):
        if arg == "-mon":
            mon = parse_opts(argv[i + 1])
            if mon.get("mode") == "control" and "chardev" in mon:
                monitor_chardevs.add(str(mon["chardev"]))
    i = 0
    while i < len(argv):
        opt = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else ""
        i += 1
        if opt == "-daemonize":
            p.daemonize = True
            continue
        if opt == "-enable-kvm":
            out += ["-accel", "tcg"]
            continue
        if not opt.startswith("-") or opt in _FLAGS:
            out.append(opt)
            continue
        i += 1  # every other option takes a value
        if opt == "-pidfile":
            p.pidfile = val
        elif opt == "-qmp":
            kind, _, rest = val.partition(":")
            opts = parse_opts(rest, implied="path")
            if kind != "unix" or "path" not in opts:
                raise ArgsError(f"-qmp {val!r}: only unix: monitors are understood")
            p.probe, p.monitor_path = True, str(opts["path"])
            out += ["-chardev", f"socket,id=standin-qmp,fd={MONITOR_FD},server=off",
                    "-mon", "chardev=standin-qmp,mode=control"]  # fmt: skip
        elif opt == "-chardev":
            opts = parse_opts(val, implied="backend")
            if opts.get("backend") == "socket" and str(opts.get("id")) in monitor_chardevs:
                if "fd" in opts:
                    p.monitor_fd = _int(opts["fd"], "monitor fd")
                elif "path" in opts:
                    p.monitor_path = str(opts["path"])
                else:
                    raise ArgsError("the monitor chardev has neither fd= nor path=")
                out += ["-chardev", f"socket,id={opts['id']},fd={MONITOR_FD},server=off"]
            else:
                out += [opt, val]
        elif opt == "-machine":
            opts = parse_opts(val, implied="type")
            for key in ("confidential-guest-support", "memory-encryption"):
                if key in opts:
                    p.extra["confidential_guest_support"] = str(opts.pop(key))
            if str(opts.get("accel", "")).startswith("kvm"):
                opts["accel"] = "tcg"
            if "memory-backend" in opts:
                p.ram_backend = str(opts["memory-backend"])
            out += [opt, format_opts(opts, implied="type")]
        elif opt == "-accel":
            opts = parse_opts(val, implied="accel")
            if opts.get("accel") == "kvm":
                opts = {"accel": "tcg"}
            out += [opt, format_opts(opts, implied="accel")]
        elif opt == "-object":
            opts = parse_opts(val, implied="qom-type")
            qom = opts.get("qom-type")
            if qom == "sev-guest":
                p.sev = SevParams(
                    object_id=str(opts.get("id", "")),
                    policy=_int(opts.get("policy", 1), "policy"),
                    cbitpos=_int(opts.get("cbitpos", 0), "cbitpos"),
                    reduced_phys_bits=_int(opts.get("reduced-phys-bits", 0), "reduced-phys-bits"),
                    dh_cert_file=None if opts.get("dh-cert-file") is None else str(opts["dh-cert-file"]),
                    session_file=None if opts.get("session-file") is None else str(opts["session-file"]),
                    kernel_hashes=_bool(opts.get("kernel-hashes", False)),
                )
                continue
            if qom == "memory-backend-ram":
                p.extra[f"ram:{opts.get('id')}"] = str(opts.get("size", "0"))
            out += [opt, val]
        elif opt == "-overcommit":
            opts = parse_opts(val)
            opts.pop("mem-lock", None)
            if opts:
                out += [opt, format_opts(opts)]
        elif opt == "-name":
            p.name = str(parse_opts(val, implied="guest").get("guest", ""))
            out += [opt, val]
        elif opt == "-bios":
            p.firmware = val
            out += [opt, val]
        elif opt == "-blockdev":
            opts = parse_opts(val, implied="driver")
            node = str(opts.get("node-name", ""))
            if opts.get("driver") == "file" and node.startswith("libvirt-pflash0"):
                p.firmware = str(opts.get("filename"))
            out += [opt, val]
        elif opt == "-kernel":
            p.kernel = val
            out += [opt, val]
        elif opt == "-initrd":
            p.initrd = val
            out += [opt, val]
        elif opt == "-append":
            p.cmdline = val
            out += [opt, val]
        elif opt == "-cpu":
            p.cpu_model = str(parse_opts(val, implied="model").get("model"))
            out += [opt, val]
        elif opt == "-smp":
            p.vcpus = _int(parse_opts(val, implied="cpus").get("cpus", 1), "-smp")
            out += [opt, val]
        elif opt == "-m":
            size = str(parse_opts(val, implied="size").get("size", "0"))
            # A bare -m number is MiB; libvirt writes `size=262144k`.
            p.ram_size = _size(size) if size[-1:].isalpha() else int(size) << 20
            out += [opt, val]
        else:
            out += [opt, val]
    if p.monitor_fd is None and p.monitor_path is None:
        raise ArgsError("no QMP monitor on the command line")
    if p.ram_backend is not None and f"ram:{p.ram_backend}" in p.extra:
        p.ram_size = _size(p.extra[f"ram:{p.ram_backend}"])
        _rewrite_ram(out, p.ram_backend)
    if not p.probe:
        out += ["-chardev", f"file,id=standin-serial,path={SERIAL_PATH}",
                "-device", "isa-serial,chardev=standin-serial"]  # fmt: skip
    return p


def _rewrite_ram(out: list[str], backend: str) -> None:
    """The guest RAM object becomes a shared file the stand-in can write at a guest physical address."""
    for n in range(len(out) - 1):
        if out[n] != "-object":
            continue
        opts = parse_opts(out[n + 1], implied="qom-type")
        if opts.get("qom-type") == "memory-backend-ram" and opts.get("id") == backend:
            rewritten = {"qom-type": "memory-backend-file", "id": backend, "size": opts["size"],
                         "mem-path": RAM_PATH, "share": True}  # fmt: skip
            out[n + 1] = (
                json.dumps(rewritten)
                if out[n + 1].startswith("{")
                else format_opts(rewritten, implied="qom-type")
            )
            return


def substitute(argv: list[str], **values: str) -> list[str]:
    """Fills the MONITOR_FD / RAM_PATH / SERIAL_PATH placeholders."""
    marks = {MONITOR_FD: values["monitor_fd"], RAM_PATH: values.get("ram_path", ""),
             SERIAL_PATH: values.get("serial_path", "").replace(",", ",,")}  # fmt: skip
    out = []
    for arg in argv:
        for mark, value in marks.items():
            if mark == RAM_PATH and arg.startswith("{"):
                value = json.dumps(value)[1:-1]
            arg = arg.replace(mark, value)
        out.append(arg)
    return out
