"""The platform service's SEV-SNP logic: status, the VCEK/VLEK chain of the reported TCB, the host's
certificate table, and the SNP admin commands. Pure: ports for the firmware, the KDS, the caches and the
clock; no gRPC, no files, no HTTP.

The VCEK chain is keyed by (chip, reported TCB): a firmware commit or SET_CONFIG changes the reported TCB,
so the next call fetches the new VCEK once. Sources, in order: a provisioned chain (offline hosts), the
on-disk cache, the KDS. Whatever the source, the chain is verified before it is cached or served: the
VCEK must chain to a trusted root (AMD's pinned one, or a root configured explicitly, e.g. the emulator's)
and carry this chip's hwID and the reported TCB; a bad cached or provisioned chain is passed over, a bad
KDS answer is an error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from platform_svc.core.metrics import PlatformMetrics
from platform_svc.core.reasons import PlatformReason
from platform_svc.core.singleflight import SingleFlightCache
from sevlaunch.errors import FailedPrecondition, InvalidArgument, Unavailable
from sevlaunch.firmware.devsev_snp import SnpConfig, SnpPlatformState, SnpPlatformStatus
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.types import ChipId
from sevlaunch.snp.certs import (
    CertKind,
    TrustedRoot,
    VerifiedVek,
    amd_root,
    load_certificate,
    load_certificates,
)
from sevlaunch.snp.certs import verify_vek_chain as _verify_chain
from sevlaunch.snp.certtable import ARK_GUID, ASK_GUID, VCEK_GUID, VLEK_GUID, CertTable
from sevlaunch.snp.kds import hwid_hex
from sevlaunch.snp.tcb import Product, TcbVersion

log = logging.getLogger("platform_svc.snp")


class SnpFirmwarePort(Protocol):
    async def snp_platform_status(self) -> SnpPlatformStatus: ...
    async def snp_committed_tcb(self) -> int | None: ...
    async def snp_product(self) -> Product: ...
    async def get_id(self) -> ChipId: ...
    async def snp_commit(self) -> None: ...
    async def snp_set_config(self, config: SnpConfig) -> None: ...


class VekFetcher(Protocol):
    """The KDS. Each call raises a typed error (Unavailable, FailedPrecondition) on failure and never
    takes longer than `timeout` seconds."""

    async def fetch_vcek(self, product: Product, hwid: bytes, tcb: TcbVersion, timeout: float) -> bytes: ...
    async def fetch_cert_chain(self, product: Product, timeout: float) -> bytes: ...


class VekCache(Protocol):
    """Verified VCEKs per (product, hwid, TCB) and cert chains per product, kept across restarts."""

    def load_vcek(self, product: Product, hwid: str, tcb_raw: int) -> bytes | None: ...
    def store_vcek(self, product: Product, hwid: str, tcb_raw: int, der: bytes) -> None: ...
    def discard_vcek(self, product: Product, hwid: str, tcb_raw: int) -> None: ...
    def load_chain(self, product: Product) -> bytes | None: ...
    def store_chain(self, product: Product, pem: bytes) -> None: ...


@dataclass(frozen=True)
class ProvisionedVeks:
    """Certificates provisioned on a host without egress (snpguest's `fetch` layout): VCEK and/or VLEK,
    ASK, ASVK, ARK, each DER or PEM, any of them None."""

    vcek: bytes | None = None
    vlek: bytes | None = None
    ask: bytes | None = None
    asvk: bytes | None = None
    ark: bytes | None = None


class CertTableStore(Protocol):
    """Where the host keeps the certificate table guests get with extended reports."""

    async def load(self) -> bytes | None: ...
    async def store(self, table: bytes) -> None: ...


@dataclass(frozen=True, kw_only=True)
class SnpStatus:
    product: Product
    status: SnpPlatformStatus
    current: TcbVersion
    reported: TcbVersion
    committed: TcbVersion | None
    hwid: str

    @property
    def initialized(self) -> bool:
        return self.status.state is SnpPlatformState.INIT


@dataclass(frozen=True, kw_only=True)
class VekChain:
    kind: CertKind  # VCEK or VLEK
    vek: bytes  # DER
    ask: bytes  # DER: ASK or ASVK
    ark: bytes  # DER
    product: Product
    tcb: TcbVersion
    hwid: str
    source: str

    def cert_table(self) -> bytes:
        """The GUID table guests receive: VCEK (or VLEK), ASK, ARK, DER."""
        guid = VCEK_GUID if self.kind is CertKind.VCEK else VLEK_GUID
        return CertTable.of([(guid, self.vek), (ASK_GUID, self.ask), (ARK_GUID, self.ark)]).to_bytes()


@dataclass(frozen=True)
class VekSources:
    fetcher: VekFetcher | None = None
    cache: VekCache | None = None
    provisioned: ProvisionedVeks | None = None
    kds_timeout: float = 10.0
    fetch_name: str = "kds"  # the `source` of a fetched chain: "kds", or "emulator" for the chip itself


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _one(data: bytes, what: str) -> x509.Certificate:
    return load_certificate(data, what=what)


class SnpCore:
    def __init__(
        self,
        firmware: SnpFirmwarePort,
        roots: Sequence[TrustedRoot] | Callable[[], Sequence[TrustedRoot]],
        sources: VekSources,
        metrics: PlatformMetrics,
        *,
        cert_tables: CertTableStore | None = None,
        clock: Callable[[], datetime],
    ) -> None:
        self._fw = firmware
        # Extra roots given as a function are made on first need, in a thread: the emulator's root is
        # three RSA-4096 keys, which a platform that never serves SNP should not wait for at start.
        self._roots: tuple[TrustedRoot, ...] | None = None if callable(roots) else tuple(roots)
        self._make_roots = roots if callable(roots) else None
        self._roots_lock = asyncio.Lock()
        self._sources = sources
        self._metrics = metrics
        self._tables = cert_tables
        self._clock = clock
        self._flights: dict[tuple[str, int, str], SingleFlightCache[VekChain]] = {}
        self._product: Product | None = None
        self._hwid: bytes | None = None

    async def _load_roots(self) -> None:
        if self._roots is None:
            async with self._roots_lock:
                if self._roots is None and self._make_roots is not None:
                    self._roots = tuple(await asyncio.to_thread(self._make_roots))

    @property
    def _extra_roots(self) -> tuple[TrustedRoot, ...]:
        assert self._roots is not None, "_load_roots() first"
        return self._roots

    # -- status -------------------------------------------------------------------------------------

    async def _identity(self) -> tuple[Product, bytes]:
        if self._product is None or self._hwid is None:
            product = await self._fw.snp_product()
            chip_id = bytes(await self._fw.get_id())
            self._hwid = bytes.fromhex(hwid_hex(chip_id, product))
            self._product = product
        return self._product, self._hwid

    async def status(self, *, committed_tcb: bool = True) -> SnpStatus:
        product, hwid = await self._identity()
        st = await self._fw.snp_platform_status()
        committed = await self._fw.snp_committed_tcb() if committed_tcb else None
        return SnpStatus(
            product=product,
            status=st,
            current=TcbVersion.from_raw(st.current_tcb, product, field="current_tcb"),
            reported=TcbVersion.from_raw(st.reported_tcb, product, field="reported_tcb"),
            committed=None
            if committed is None
            else TcbVersion.from_raw(committed, product, field="committed"),
            hwid=hwid.hex(),
        )

    # -- the VEK chain --------------------------------------------------------------------------------

    async def vek_chain(self, *, vlek: bool | None = None, timeout: float | None = None) -> VekChain:
        """The chain of the reported TCB. `vlek` None: the VLEK when one is loaded and provisioned.
        `timeout`: the caller's remaining deadline; the chain is computed once for all concurrent
        callers, and a caller whose deadline passes leaves the computation running for the others."""
        await self._load_roots()
        status = await self.status(committed_tcb=False)
        provisioned = self._sources.provisioned
        has_vlek = status.status.vlek_en and provisioned is not None and provisioned.vlek is not None
        if vlek is True and not has_vlek:
            raise FailedPrecondition(
                PlatformReason.NO_VLEK, "no VLEK is loaded, or none is provisioned for it"
            )
        kind = CertKind.VLEK if (vlek is True or (vlek is None and has_vlek)) else CertKind.VCEK
        key = (status.hwid, status.reported.raw, kind.value)
        flight = self._flights.setdefault(key, SingleFlightCache())
        # The shared fetch has the service's own KDS budget, not its first caller's deadline: a caller
        # with little time left gives up alone and the fetch goes on for the others (and the cache).
        deadline = asyncio.get_running_loop().time() + self._sources.kds_timeout

        async def compute() -> VekChain:
            return await self._compute(status, kind, deadline)

        try:
            chain, fetched = await asyncio.wait_for(
                asyncio.shield(flight.get(compute)), None if timeout is None else max(timeout, 0.0)
            )
        except TimeoutError:
            raise Unavailable(
                PlatformReason.KDS_UNAVAILABLE,
                f"no {kind.value.upper()} chain within the call's deadline, none cached",
                metadata={"kds_outcome": "timeout"},
            ) from None
        self._metrics.vek_chain_served(source=chain.source, fetched=fetched)
        return chain

    def _verify(self, vek: bytes, chain: Sequence[x509.Certificate], status: SnpStatus) -> VerifiedVek:
        verified = _verify_chain(
            _one(vek, "vek"), status.product, at=self._clock(), chain=chain, extra_roots=self._extra_roots
        )
        if verified.tcb != status.reported:
            raise ValueError(f"issued for TCB {verified.tcb}, the reported TCB is {status.reported}")
        hwid = verified.extensions.hwid
        if verified.kind is CertKind.VCEK and (
            hwid is None or not hmac.compare_digest(hwid, bytes.fromhex(status.hwid))
        ):
            raise ValueError("the VCEK's hwID is not this chip's")
        return verified

    def _chain_of(self, verified: VerifiedVek, chain: Sequence[x509.Certificate], status: SnpStatus,
                  source: str) -> VekChain:  # fmt: skip
        ark = next(c for c in chain if c.subject == c.issuer) if chain else None
        issuer = next((c for c in chain if c.subject == verified.certificate.issuer), None)
        if ark is None or issuer is None:
            root = next(r for r in self._roots_for(status.product) if r.name == verified.root)
            ark = root.ark
            issuer = next(c for c in root.intermediates if c.subject == verified.certificate.issuer)
        return VekChain(
            kind=verified.kind, vek=_der(verified.certificate), ask=_der(issuer), ark=_der(ark),
            product=status.product, tcb=status.reported, hwid=status.hwid, source=source,
        )  # fmt: skip

    def _roots_for(self, product: Product) -> list[TrustedRoot]:
        return [amd_root(product), *(r for r in self._extra_roots if r.product is product)]

    async def _compute(self, status: SnpStatus, kind: CertKind, deadline: float) -> VekChain:
        found = self._from_provisioned(status, kind)
        if found is not None:
            return found
        if kind is CertKind.VLEK:  # pragma: no cover - vek_chain only asks for a VLEK that is provisioned
            raise FailedPrecondition(PlatformReason.NO_VLEK, "the provisioned VLEK is not usable")
        found = self._from_cache(status)
        if found is not None:
            return found
        return await self._from_kds(status, deadline)

    def _from_provisioned(self, status: SnpStatus, kind: CertKind) -> VekChain | None:
        prov = self._sources.provisioned
        if prov is None:
            return None
        vek = prov.vlek if kind is CertKind.VLEK else prov.vcek
        middle = prov.asvk if kind is CertKind.VLEK else prov.ask
        if vek is None:
            return None
        try:
            chain = [_one(c, "provisioned chain") for c in (middle, prov.ark) if c is not None]
            return self._chain_of(self._verify(vek, chain, status), chain, status, "file")
        except (SevError, ValueError) as exc:
            log.warning("provisioned %s not usable: %s", kind.value, exc)
            return None

    def _from_cache(self, status: SnpStatus) -> VekChain | None:
        cache = self._sources.cache
        if cache is None:
            return None
        der = cache.load_vcek(status.product, status.hwid, status.reported.raw)
        if der is None:
            return None
        pem = cache.load_chain(status.product)
        try:
            chain = load_certificates(pem, what="cached chain") if pem is not None else []
            return self._chain_of(self._verify(der, chain, status), chain, status, "kds-cache")
        except (SevError, ValueError) as exc:
            log.warning("cached VCEK not usable, discarded: %s", exc)
            cache.discard_vcek(status.product, status.hwid, status.reported.raw)
            return None

    async def _from_kds(self, status: SnpStatus, deadline: float) -> VekChain:
        fetcher = self._sources.fetcher
        if fetcher is None:
            raise FailedPrecondition(
                PlatformReason.NO_VEK_SOURCE,
                f"no provisioned or cached VCEK for TCB {status.reported}, and no KDS is configured",
            )
        loop = asyncio.get_running_loop()
        cache = self._sources.cache
        pem = cache.load_chain(status.product) if cache is not None else None
        if pem is None:
            pem = await fetcher.fetch_cert_chain(status.product, max(deadline - loop.time(), 0.0))
        der = await fetcher.fetch_vcek(
            status.product, bytes.fromhex(status.hwid), status.reported, max(deadline - loop.time(), 0.0)
        )
        try:
            chain = load_certificates(pem, what="KDS cert_chain")
            verified = self._verify(der, chain, status)
        except (SevError, ValueError) as exc:
            raise Unavailable(
                PlatformReason.KDS_BAD_RESPONSE, f"the KDS's VCEK or chain does not verify: {exc}"
            ) from None
        if cache is not None:
            cache.store_chain(status.product, pem)
            cache.store_vcek(status.product, status.hwid, status.reported.raw, _der(verified.certificate))
        return self._chain_of(verified, chain, status, self._sources.fetch_name)

    # -- the certificate table --------------------------------------------------------------------------

    def _tables_or_refuse(self) -> CertTableStore:
        if self._tables is None:
            raise FailedPrecondition(
                PlatformReason.SNP_UNSUPPORTED, "no certificate table store is configured"
            )
        return self._tables

    async def cert_table(self) -> tuple[bytes, bool]:
        """(the installed table, whether its VEK is this chip's at the reported TCB)."""
        table = await self._tables_or_refuse().load()
        if table is None:
            raise FailedPrecondition(PlatformReason.NO_CERT_TABLE, "no certificate table is installed")
        await self._load_roots()
        try:
            self._check_table(CertTable.from_bytes(table), await self.status())
            return table, True
        except (SevError, ValueError):
            return table, False

    def _check_table(self, table: CertTable, status: SnpStatus) -> None:
        vek = table.vlek or table.vcek
        if vek is None:
            raise ValueError("the table holds neither a VCEK nor a VLEK")
        chain = [_one(c, "table chain") for c in (table.ask, table.ark) if c is not None]
        self._verify(vek, chain, status)

    async def install_cert_table(self, table: bytes, *, timeout: float | None = None) -> bytes:
        store = self._tables_or_refuse()
        if not table:
            table = (await self.vek_chain(timeout=timeout)).cert_table()
        try:
            parsed = CertTable.from_bytes(table)
        except SevError as exc:
            raise InvalidArgument(PlatformReason.BAD_CERT_TABLE, f"not a certificate table: {exc}") from None
        if parsed.vcek is None and parsed.vlek is None:
            raise InvalidArgument(PlatformReason.BAD_CERT_TABLE, "the table holds neither a VCEK nor a VLEK")
        await self._load_roots()
        try:
            self._check_table(parsed, await self.status())
        except (SevError, ValueError) as exc:
            raise FailedPrecondition(
                PlatformReason.CERT_TABLE_MISMATCH, f"the table's VEK is not this chip's at its TCB: {exc}"
            ) from None
        await store.store(table)
        return table

    # -- admin ---------------------------------------------------------------------------------------

    async def commit(self) -> SnpStatus:
        await self._fw.snp_commit()
        return await self.status()

    async def set_config(self, reported_tcb: int, mask_chip_id: bool, mask_chip_key: bool) -> SnpStatus:
        status = await self.status()
        raw = reported_tcb or status.reported.raw
        try:
            TcbVersion.from_raw(raw, status.product, field="reported_tcb")
        except SevError as exc:
            raise InvalidArgument(PlatformReason.BAD_TCB, str(exc)) from None
        await self._fw.snp_set_config(SnpConfig(raw, mask_chip_id, mask_chip_key))
        return await self.status()
