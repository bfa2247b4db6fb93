"""Numeric limits shared by the services and the command line, so both refuse the same values.

The services check requests against these; the CLI checks its options against them before doing any
work (`sevlaunch.cli.bounds`). Field widths come from the formats (AMD publication 55766): the firmware
API version and build id are one byte each, a guest policy four bytes.
"""

from __future__ import annotations

from typing import Final

U8_MAX: Final = 0xFF
U32_MAX: Final = 0xFFFF_FFFF

#: vCPUs of one guest (each SEV-ES vCPU is one VMSA in the launch digest).
MAX_VCPUS: Final = 64
#: Guest memory, MiB.
MIN_MEMORY_MIB: Final = 64
MAX_MEMORY_MIB: Final = 1 << 20  # 1 TiB
#: The largest secret area a workload may declare (a secret table must fit in it).
MAX_SECRET_AREA_SIZE: Final = 1 << 20

#: CPUID(1).EAX fields of a vCPU signature (AMD publication 25481): family 0..0xF plus an extended
#: family of one byte, an 8-bit model (with its extended nibble), a 4-bit stepping.
MAX_VCPU_FAMILY: Final = 0xF + 0xFF
MAX_VCPU_MODEL: Final = 0xFF
MAX_VCPU_STEPPING: Final = 0xF
U64_MAX: Final = (1 << 64) - 1
#: A call's deadline or a wait on the command line, seconds.
MAX_TIMEOUT_SECONDS: Final = 3600.0
#: ASIDs an emulated chip may declare (real parts have a few hundred to about a thousand).
MAX_EMULATED_ASIDS: Final = 4096
