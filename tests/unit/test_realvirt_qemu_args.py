"""The QEMU stand-in's command-line rewrite (sevlaunch.realvirt.qemu_args) on libvirt 9.0's own
command lines, as libvirtd wrote them to the domain log and the probe's in tests/realvirt."""

from __future__ import annotations

import json

import pytest

from sevlaunch.realvirt.qemu_args import (
    MONITOR_FD,
    ArgsError,
    format_opts,
    parse_opts,
    plan,
    split_opts,
    substitute,
)

DOMAIN_ARGV = [
    "-name", "guest=sl-ea7b6918d62b-attested,debug-threads=on",
    "-S",
    "-object",
    '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/d/master-key.aes"}',
    "-machine",
    "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,confidential-guest-support=lsec0",
    "-accel", "kvm",
    "-cpu", "qemu64",
    "-bios", "/usr/share/OVMF/OVMF_CODE.fd",
    "-m", "256",
    "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
    "-overcommit", "mem-lock=off",
    "-smp", "1,sockets=1,cores=1,threads=1",
    "-uuid", "12b62000-735c-4a26-a146-a4f102fb4fd1",
    "-display", "none",
    "-no-user-config",
    "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-rtc", "base=utc",
    "-no-shutdown",
    "-boot", "strict=on",
    "-audiodev", '{"id":"audio1","driver":"none"}',
    "-object", '{"qom-type":"sev-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"policy":3,'
    '"dh-cert-file":"/var/lib/libvirt/qemu/d/dh_cert.base64","session-file":"/var/lib/libvirt/qemu/d/session.base64"}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on",
]  # fmt: skip

PROBE_ARGV = (
    "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg "
    "-qmp unix:/var/lib/libvirt/qemu/qmp-DQ8RZ3/qmp.monitor,server=on,wait=off "
    "-pidfile /var/lib/libvirt/qemu/qmp-DQ8RZ3/qmp.pid -daemonize"
).split()


def test_option_syntax_round_trips_with_escaped_commas() -> None:
    assert split_opts("a,,b,c=d,,e") == ["a,b", "c=d,e"]
    opts = parse_opts("file,id=x,path=/tmp/a,,b", implied="backend")
    assert opts == {"backend": "file", "id": "x", "path": "/tmp/a,b"}
    assert format_opts(opts, implied="backend") == "file,id=x,path=/tmp/a,,b"
    assert parse_opts('{"qom-type":"x","id":"y"}') == {"qom-type": "x", "id": "y"}
    with pytest.raises(ArgsError):
        parse_opts("{not json")


def test_domain_command_line_is_rewritten_for_tcg_without_sev() -> None:
    p = plan(DOMAIN_ARGV)
    assert not p.probe and p.monitor_fd == 29 and p.monitor_path is None and not p.daemonize
    assert p.name == "sl-ea7b6918d62b-attested"
    assert p.firmware == "/usr/share/OVMF/OVMF_CODE.fd"
    assert p.ram_size == 256 << 20 and p.vcpus == 1 and p.cpu_model == "qemu64"
    assert p.sev is not None
    assert (p.sev.object_id, p.sev.policy, p.sev.cbitpos, p.sev.reduced_phys_bits) == ("lsec0", 3, 51, 1)
    assert p.sev.dh_cert_file == "/var/lib/libvirt/qemu/d/dh_cert.base64"
    assert p.sev.session_file == "/var/lib/libvirt/qemu/d/session.base64"
    assert not p.sev.kernel_hashes
    out = p.qemu_argv
    joined = " ".join(out)
    assert "sev-guest" not in joined and "confidential-guest-support" not in joined
    assert out[out.index("-accel") + 1] == "tcg"
    assert "pc-q35-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram" in out
    assert "-overcommit" not in out and "mem-lock" not in joined  # the stand-in never locks guest RAM
    assert f"socket,id=charmonitor,fd={MONITOR_FD},server=off" in out
    ram = [json.loads(a) for a in out if a.startswith('{"qom-type": "memory-backend')]
    assert ram == [
        {"qom-type": "memory-backend-file", "id": "pc.ram", "size": 268435456, "mem-path": "@RAM_PATH@",
         "share": True}
    ]  # fmt: skip
    final = substitute(out, monitor_fd="7", ram_path='/run/x "y".ram', serial_path="/run/a,b.log")
    assert "socket,id=charmonitor,fd=7,server=off" in final
    ram_arg = next(a for a in final if "memory-backend-file" in a)
    assert json.loads(ram_arg)["mem-path"] == '/run/x "y".ram'
    assert "file,id=standin-serial,path=/run/a,,b.log" in final


def test_probe_command_line_takes_over_the_qmp_socket() -> None:
    p = plan(PROBE_ARGV)
    assert p.probe and p.daemonize and p.sev is None
    assert p.monitor_path == "/var/lib/libvirt/qemu/qmp-DQ8RZ3/qmp.monitor"
    assert p.pidfile == "/var/lib/libvirt/qemu/qmp-DQ8RZ3/qmp.pid"
    assert p.qemu_argv == [
        "-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=tcg",
        "-chardev", f"socket,id=standin-qmp,fd={MONITOR_FD},server=off",
        "-mon", "chardev=standin-qmp,mode=control",
    ]  # fmt: skip


def test_a_command_line_without_a_monitor_is_refused() -> None:
    with pytest.raises(ArgsError, match="no QMP monitor"):
        plan(["-S", "-machine", "none"])
    with pytest.raises(ArgsError, match="only unix"):
        plan(["-qmp", "tcp:127.0.0.1:4444,server=on"])


def test_qmp_framing_carries_messages_and_descriptors() -> None:
    import os
    import socket

    from sevlaunch.realvirt.qmp import QmpConnection, error, reply

    a, b = socket.socketpair()
    left, right = QmpConnection(a), QmpConnection(b)
    r, w = os.pipe()
    try:
        left.write({"execute": "getfd", "arguments": {"fdname": "x"}, "id": 1}, [r])
        left.write({"execute": "cont", "id": 2})
        got = right.read()
        assert got is not None
        message, fds = got
        assert message["execute"] == "getfd" and len(fds) == 1
        os.write(w, b"ping")
        assert os.read(fds[0], 4) == b"ping"  # the very pipe, passed with SCM_RIGHTS
        os.close(fds[0])
        second = right.read()
        assert second is not None and second == ({"execute": "cont", "id": 2}, [])
        assert reply({"execute": "x", "id": 7}, {}) == {"return": {}, "id": 7}
        assert error({"execute": "x"}, "no") == {"error": {"class": "GenericError", "desc": "no"}}
        left.close()
        assert right.read() is None
    finally:
        os.close(r)
        os.close(w)
        right.close()


#: libvirt 9.0's firmware options for `<loader type='pflash' readonly='yes' stateless='yes'>` (from the
#: domain log in tests/realvirt): pflash unit 0 only, read-only, and no unit 1 (no NVRAM).
PFLASH_OPTIONS = [
    "-blockdev",
    '{"driver":"file","filename":"/usr/share/OVMF/OVMF_CODE_4M.fd","node-name":"libvirt-pflash0-storage",'
    '"auto-read-only":true,"discard":"unmap"}',
    "-blockdev",
    '{"node-name":"libvirt-pflash0-format","read-only":true,"driver":"raw","file":"libvirt-pflash0-storage"}',
]


def test_a_pflash_loader_names_the_image_the_stand_in_measures() -> None:
    at = DOMAIN_ARGV.index("-bios")
    argv = DOMAIN_ARGV[:at] + PFLASH_OPTIONS + DOMAIN_ARGV[at + 2 :]
    machine = argv.index("-machine") + 1
    argv[machine] += ",pflash0=libvirt-pflash0-format"
    p = plan(argv)
    assert p.firmware == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    # Real QEMU gets the same read-only flash device; only the SEV parts go.
    assert "-bios" not in p.qemu_argv
    assert PFLASH_OPTIONS[1] in p.qemu_argv and PFLASH_OPTIONS[3] in p.qemu_argv
    machine_out = p.qemu_argv[p.qemu_argv.index("-machine") + 1]
    assert "pflash0=libvirt-pflash0-format" in machine_out and "confidential-guest-support" not in machine_out
