"""Attestation reports through configfs-tsm (`/sys/kernel/config/tsm/report/`, Linux 6.7 and later).

The kernel's ABI (Documentation/ABI/testing/configfs-tsm): `mkdir report/<name>` creates an entry whose
attributes appear with it; `provider` names the TSM (`sev_guest` on SEV-SNP); `privlevel` takes the VMPL
(not below `privlevel_floor`); writing `inblob` (the 64-byte REPORT_DATA) invalidates any previous report;
reading `outblob` asks the firmware for the report, `auxblob` then holds the host's certificate table.
`generation` counts writes to the entry: reading it before writing `inblob` and after reading the blobs,
and expecting exactly one increment, shows that no other process wrote the entry in between. `rmdir`
removes the entry.

`TsmTree` is the file-system side (one method per kernel operation); `ConfigfsTsmSource` is the protocol.
"""

from __future__ import annotations

import errno
import os
import secrets
import sys
from pathlib import Path
from typing import Final

from sevlaunch.guest.source import (
    ConcurrentWriter,
    GuestInterfaceUnavailable,
    GuestReport,
    check_report,
    check_request,
)
from sevlaunch.sev.errors import MalformedInput, Reason

DEFAULT_ROOT: Final = Path("/sys/kernel/config/tsm/report")
SEV_PROVIDER: Final = "sev_guest"
# Reads are bounded: an SNP report is 0x4A0 bytes and the kernel caps the certificate blob at a few pages.
_MAX_ATTRIBUTE: Final = 1 << 20


class TsmTree:
    """The configfs-tsm `report` directory: create, write, read and remove entries' attributes.

    Attributes are written with one `open(O_WRONLY)` (never created: in configfs they exist once the
    entry does) and closed, which is when configfs hands a binary attribute to the kernel.
    """

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def available(self) -> bool:
        return self.root.is_dir()

    def create(self, name: str) -> None:
        (self.root / name).mkdir()

    def remove(self, name: str) -> None:
        (self.root / name).rmdir()

    def has(self, name: str, attribute: str) -> bool:
        return (self.root / name / attribute).exists()

    def write(self, name: str, attribute: str, data: bytes) -> None:
        fd = os.open(self.root / name / attribute, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def read(self, name: str, attribute: str) -> bytes:
        with open(self.root / name / attribute, "rb") as handle:
            data = handle.read(_MAX_ATTRIBUTE + 1)
        if len(data) > _MAX_ATTRIBUTE:
            raise MalformedInput(Reason.BAD_LENGTH, f"configfs-tsm attribute {attribute} is too large")
        return data


class ConfigfsTsmSource:
    """A `GuestReportSource` over configfs-tsm. Each request uses its own, randomly named entry and
    removes it afterwards; a request spoiled by a concurrent writer is retried `attempts` times."""

    def __init__(self, root: Path | TsmTree = DEFAULT_ROOT, *, attempts: int = 3) -> None:
        self.tree = root if isinstance(root, TsmTree) else TsmTree(root)
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"ConfigfsTsmSource(root={str(self.tree.root)!r})"

    def get_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        check_request(report_data, vmpl)
        if not self.tree.available():
            raise GuestInterfaceUnavailable(
                f"no configfs-tsm at {self.tree.root} "
                "(needs Linux 6.7+ with TSM_REPORTS, and configfs mounted)"
            )
        name = f"sevlaunch-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.tree.create(name)
        except OSError as exc:
            raise GuestInterfaceUnavailable(f"cannot create a configfs-tsm entry: {exc.strerror}") from exc
        try:
            self._check_provider(name, vmpl)
            self.tree.write(name, "privlevel", f"{vmpl}\n".encode())
            for _ in range(self.attempts):
                result = self._attempt(name, report_data)
                if result is not None:
                    return result
            raise ConcurrentWriter(
                f"configfs-tsm entry {name} was written by another process during {self.attempts} attempts"
            )
        except FileNotFoundError as exc:
            raise GuestInterfaceUnavailable(f"configfs-tsm entry lacks an attribute: {exc.filename}") from exc
        finally:
            self._remove(name, failing=sys.exc_info()[1] is not None)

    def _remove(self, name: str, *, failing: bool) -> None:
        try:
            self.tree.remove(name)
        except OSError as exc:
            # A leftover entry is worth an error of its own, but not at the price of hiding the one that
            # is already on its way out.
            if exc.errno != errno.ENOENT and not failing:
                raise

    def _check_provider(self, name: str, vmpl: int) -> None:
        provider = self.tree.read(name, "provider").decode(errors="replace").strip()
        if provider != SEV_PROVIDER:
            raise GuestInterfaceUnavailable(f"configfs-tsm provider is {provider!r}, not {SEV_PROVIDER!r}")
        if self.tree.has(name, "privlevel_floor"):
            floor = _decimal(self.tree.read(name, "privlevel_floor"), "privlevel_floor")
            if vmpl < floor:
                raise MalformedInput(Reason.BAD_FIELD, f"VMPL {vmpl} is below this guest's floor {floor}")

    def _attempt(self, name: str, report_data: bytes) -> GuestReport | None:
        """One write-and-read; None when `generation` shows another writer in between."""
        before = _decimal(self.tree.read(name, "generation"), "generation")
        self.tree.write(name, "inblob", report_data)
        outblob = self.tree.read(name, "outblob")
        auxblob = self.tree.read(name, "auxblob") if self.tree.has(name, "auxblob") else b""
        after = _decimal(self.tree.read(name, "generation"), "generation")
        if after != before + 1:
            return None
        return GuestReport(check_report(outblob), auxblob or None)


def _decimal(raw: bytes, attribute: str) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdecimal():
        raise MalformedInput(Reason.BAD_FIELD, f"configfs-tsm {attribute} is not a decimal number")
    return int(text)
