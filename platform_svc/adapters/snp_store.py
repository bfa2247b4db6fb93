"""Where platform_svc keeps SEV-SNP certificates on disk: the VCEK cache (per chip and TCB, written
atomically so a crash never leaves half a certificate to serve), a provisioned directory for hosts without
egress, and the host's certificate table for guests' extended reports."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from platform_svc.core.snp import ProvisionedVeks
from sevlaunch.firmware.state import atomic_write
from sevlaunch.snp.tcb import Product

_HWID_RE = re.compile(r"^[0-9a-f]{16}$|^[0-9a-f]{128}$")
#: The largest certificate file read from a provisioned directory.
_MAX_CERT_FILE = 64 * 1024


class VekDiskCache:
    """`DIR/<Product>/<hwid>/<TCB as 16 hex digits>.der` and `DIR/<Product>/cert_chain.pem`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _vcek_path(self, product: Product, hwid: str, tcb_raw: int) -> Path:
        if not _HWID_RE.match(hwid):
            raise ValueError("hwid must be 8 or 64 bytes of lower hex")
        return self.directory / product.kds_name / hwid / f"{tcb_raw:016x}.der"

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode=0o644)

    def load_vcek(self, product: Product, hwid: str, tcb_raw: int) -> bytes | None:
        return self._read(self._vcek_path(product, hwid, tcb_raw))

    def store_vcek(self, product: Product, hwid: str, tcb_raw: int, der: bytes) -> None:
        self._write(self._vcek_path(product, hwid, tcb_raw), der)

    def discard_vcek(self, product: Product, hwid: str, tcb_raw: int) -> None:
        self._vcek_path(product, hwid, tcb_raw).unlink(missing_ok=True)

    def load_chain(self, product: Product) -> bytes | None:
        return self._read(self.directory / product.kds_name / "cert_chain.pem")

    def store_chain(self, product: Product, pem: bytes) -> None:
        self._write(self.directory / product.kds_name / "cert_chain.pem", pem)


def load_provisioned(directory: Path | None = None, *, vcek_file: Path | None = None) -> ProvisionedVeks:
    """snpguest's `fetch` layout: `vcek.{der,pem}`, `vlek.{der,pem}`, `ask.pem`, `asvk.pem`, `ark.pem`
    (either encoding for each); `vcek_file` names the VCEK directly. Missing files are None; the core
    verifies whatever is there before serving it."""

    def pick(name: str) -> bytes | None:
        if directory is None:
            return None
        for suffix in (".der", ".pem", ".crt", ".cert"):
            path = directory / f"{name}{suffix}"
            if path.is_file():
                with path.open("rb") as handle:
                    return handle.read(_MAX_CERT_FILE)
        return None

    vcek = vcek_file.read_bytes()[:_MAX_CERT_FILE] if vcek_file is not None else pick("vcek")
    return ProvisionedVeks(vcek=vcek, vlek=pick("vlek"), ask=pick("ask"), asvk=pick("asvk"), ark=pick("ark"))


class FileCertTable:
    """The certificate table in a file (what QEMU/libvirt hand guests on hosts whose kernel no longer
    keeps it, Linux 6.11+)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> bytes | None:
        try:
            return await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return None

    async def store(self, table: bytes) -> None:
        await asyncio.to_thread(self._write, table)

    def _write(self, table: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, table, mode=0o644)
