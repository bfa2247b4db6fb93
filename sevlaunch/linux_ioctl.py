"""Linux ioctl request numbers, and the call signature the ioctl backends accept so tests can stand in
for the kernel.

Shared by `sevlaunch.firmware.devsev_snp` (`/dev/sev`) and `sevlaunch.guest.devsevguest`
(`/dev/sev-guest`). The encoding is x86-64's (include/uapi/asm-generic/ioctl.h): direction in bits
30-31, argument size in bits 16-29, type character in bits 8-15, command number in bits 0-7.
"""

from __future__ import annotations

import ctypes
import fcntl
from typing import Final, Protocol

IOC_WRITE: Final = 1
IOC_READ: Final = 2
_SIZE_BITS: Final = 14


def iowr(ioc_type: str, number: int, size: int) -> int:
    """`_IOWR(type, nr, size)`: a request whose argument the kernel both reads and writes back."""
    if len(ioc_type) != 1 or not 0 <= number <= 0xFF or not 0 <= size < (1 << _SIZE_BITS):
        raise ValueError("ioctl type must be one character, number a byte, size below 16 KiB")
    return ((IOC_READ | IOC_WRITE) << 30) | (size << 16) | (ord(ioc_type) << 8) | number


class IoctlFn(Protocol):
    """`fcntl.ioctl(fd, request, arg, mutate_flag)` as the backends call it: `arg` is the ctypes structure
    the kernel reads and writes in place. Tests pass a fake kernel with this signature."""

    def __call__(self, fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int: ...


def system_ioctl(fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
    """The real `ioctl(2)`."""
    result: int = fcntl.ioctl(fd, request, arg, mutate_flag)
    return result
