"""The production path under test: a real libvirtd driving real QEMU (TCG), with SEV played by the
emulated firmware, and `/dev/sev` through a real ioctl on a FUSE file.

* `daemon`: a private libvirtd and virtlogd (root, no systemd) in their own mount namespace, so they
  never touch a system libvirtd's sockets, state or configuration.
* `qemu_args` and `qmp`: the pure parts of the QEMU stand-in (its command-line rewriting, QMP framing).
* `standin`: the QEMU stand-in libvirt runs as `qemu-system-x86_64`: real QEMU under TCG underneath,
  the SEV commands answered from the emulated firmware.
* `fusesev`: a FUSE file that answers the `/dev/sev` ioctl from the emulated firmware.

Test infrastructure: nothing in the services imports it.
"""
