"""The SEV protocol, pure: formats, crypto and checks of the AMD SEV API (publication 55766).

Nothing here touches gRPC, libvirt, sockets or the file system (an import-linter contract checks it), so
every service and the firmware emulator share one implementation of every byte.
"""
