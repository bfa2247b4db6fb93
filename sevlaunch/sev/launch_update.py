"""One LAUNCH_UPDATE_* command of a launch, as `sevlaunch.sev.digest.launch_updates` lists them.

Its own module so that `sevlaunch.sev.digest` loads `dataclasses` only when updates are listed; import
it from `sevlaunch.sev.digest`, which re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sevlaunch.sev.digest import check_data_update
from sevlaunch.sev.errors import MalformedInput, Reason
from sevlaunch.sev.vcpu import VMSA_SIZE


@dataclass(frozen=True)
class LaunchUpdate:
    """One LAUNCH_UPDATE_DATA (`kind="data"`, at guest physical address `gpa`) or LAUNCH_UPDATE_VMSA
    (`kind="vmsa"`, `gpa` None: the firmware takes the page from the vCPU, not from guest memory)."""

    kind: Literal["data", "vmsa"]
    gpa: int | None
    data: bytes

    def __post_init__(self) -> None:
        if self.kind == "data":
            check_data_update(self.gpa, self.data)
        elif self.kind == "vmsa":
            if self.gpa is not None:
                raise ValueError("a VMSA update has no guest physical address")
            if len(self.data) != VMSA_SIZE:
                raise MalformedInput(Reason.BAD_LENGTH, f"a VMSA is {VMSA_SIZE} bytes, got {len(self.data)}")
        else:
            raise ValueError(f"unknown launch update kind {self.kind!r}")
