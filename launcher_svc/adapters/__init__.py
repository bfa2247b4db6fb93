"""Hypervisor backends (libvirt, emulated) and the gRPC clients of the platform and owner services."""
