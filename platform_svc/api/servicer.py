"""PlatformService servicer: protobuf in, PlatformCore call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from typing import Any

import grpc.aio

from platform_svc.core.chain import PlatformChain
from platform_svc.core.service import PlatformCore
from platform_svc.core.snp import SnpCore, SnpStatus, VekChain
from sevlaunch.firmware.interface import PlatformState
from sevlaunch.rpc import AuthzPolicy, method_rules
from sevlaunch.rpc.v1 import common_pb2, platform_pb2, platform_pb2_grpc
from sevlaunch.snp.certs import CertKind
from sevlaunch.snp.tcb import Product, TcbVersion

SERVICE_NAME = platform_pb2.DESCRIPTOR.services_by_name["PlatformService"].full_name

READERS = ("launcher", "client", "platform-admin")
ADMINS = ("platform-admin",)

AUTHZ = AuthzPolicy(
    method_rules(
        SERVICE_NAME,
        {
            "GetPlatformStatus": READERS,
            "GetIdentifier": READERS,
            "GetCertificateChain": READERS,
            "RotatePDH": ADMINS,
            "GeneratePEK": ADMINS,
            "GetPEKCSR": ADMINS,
            "ImportPEKCertificate": ADMINS,
            "FactoryReset": ADMINS,
            "GetSnpStatus": READERS,
            "GetVekChain": READERS,
            "GetSnpCertTable": READERS,
            "InstallSnpCertTable": ADMINS,
            "CommitSnp": ADMINS,
            "SetSnpConfig": ADMINS,
        },
    )
)

_STATES = {
    PlatformState.UNINIT: platform_pb2.PLATFORM_STATE_UNINIT,
    PlatformState.INIT: platform_pb2.PLATFORM_STATE_INIT,
    PlatformState.WORKING: platform_pb2.PLATFORM_STATE_WORKING,
}

Context = grpc.aio.ServicerContext[Any, Any]

_PRODUCTS = {
    Product.MILAN: platform_pb2.SNP_PRODUCT_MILAN,
    Product.GENOA: platform_pb2.SNP_PRODUCT_GENOA,
    Product.TURIN: platform_pb2.SNP_PRODUCT_TURIN,
}
_VEK_KINDS = {CertKind.VCEK: platform_pb2.VEK_KIND_VCEK, CertKind.VLEK: platform_pb2.VEK_KIND_VLEK}


def tcb_to_proto(tcb: TcbVersion) -> platform_pb2.SnpTcb:
    return platform_pb2.SnpTcb(
        bootloader=tcb.bootloader, tee=tcb.tee, snp=tcb.snp, microcode=tcb.microcode, fmc=tcb.fmc, raw=tcb.raw
    )


def snp_status_to_proto(st: SnpStatus) -> platform_pb2.GetSnpStatusResponse:
    reply = platform_pb2.GetSnpStatusResponse(
        product=_PRODUCTS[st.product],
        api_major=st.status.api_major,
        api_minor=st.status.api_minor,
        build_id=st.status.build_id,
        initialized=st.initialized,
        current_tcb=tcb_to_proto(st.current),
        reported_tcb=tcb_to_proto(st.reported),
        mask_chip_id=st.status.mask_chip_id,
        mask_chip_key=st.status.mask_chip_key,
        vlek_loaded=st.status.vlek_en,
        guest_count=st.status.guest_count,
        hwid=st.hwid,
    )
    if st.committed is not None:
        reply.committed_tcb.CopyFrom(tcb_to_proto(st.committed))
    return reply


def vek_chain_to_proto(chain: VekChain) -> platform_pb2.GetVekChainResponse:
    return platform_pb2.GetVekChainResponse(
        kind=_VEK_KINDS[chain.kind], vek_cert=chain.vek, ask_cert=chain.ask, ark_cert=chain.ark,
        product=_PRODUCTS[chain.product], tcb=tcb_to_proto(chain.tcb), hwid=chain.hwid, source=chain.source,
    )  # fmt: skip


def chain_to_proto(chain: PlatformChain) -> common_pb2.PlatformCertificates:
    return common_pb2.PlatformCertificates(
        chain=common_pb2.CertificateChain(
            pdh_cert=chain.pdh,
            pek_cert=chain.pek,
            oca_cert=chain.oca,
            cek_cert=chain.cek,
            ask_cert=chain.ask,
            ark_cert=chain.ark,
        ),
        generation=chain.generation,
        firmware=common_pb2.FirmwareVersion(
            api_major=chain.api_major, api_minor=chain.api_minor, build_id=chain.build
        ),
        chip_id=chain.chip_id,
    )


class PlatformServicer(platform_pb2_grpc.PlatformServiceServicer):
    def __init__(self, core: PlatformCore, snp: SnpCore) -> None:
        self.core = core
        self.snp = snp

    async def GetPlatformStatus(
        self, request: platform_pb2.GetPlatformStatusRequest, context: Context
    ) -> platform_pb2.GetPlatformStatusResponse:
        st = await self.core.status()
        version = common_pb2.FirmwareVersion(
            api_major=st.api_major, api_minor=st.api_minor, build_id=st.build
        )
        return platform_pb2.GetPlatformStatusResponse(
            firmware=version,
            state=_STATES[st.state],
            owned_externally=st.owned_externally,
            es_supported=st.es_enabled,
            guest_count=st.guest_count,
            flags=st.flags,
        )

    async def GetIdentifier(
        self, request: platform_pb2.GetIdentifierRequest, context: Context
    ) -> platform_pb2.GetIdentifierResponse:
        return platform_pb2.GetIdentifierResponse(chip_id=await self.core.chip_id())

    async def GetCertificateChain(
        self, request: platform_pb2.GetCertificateChainRequest, context: Context
    ) -> platform_pb2.GetCertificateChainResponse:
        chain = await self.core.chain()
        return platform_pb2.GetCertificateChainResponse(
            platform=chain_to_proto(chain), cek_source=chain.cek_source
        )

    async def RotatePDH(
        self, request: platform_pb2.RotatePDHRequest, context: Context
    ) -> platform_pb2.RotatePDHResponse:
        return platform_pb2.RotatePDHResponse(pdh_cert=await self.core.rotate_pdh())

    async def GeneratePEK(
        self, request: platform_pb2.GeneratePEKRequest, context: Context
    ) -> platform_pb2.GeneratePEKResponse:
        await self.core.generate_pek()
        return platform_pb2.GeneratePEKResponse()

    async def GetPEKCSR(
        self, request: platform_pb2.GetPEKCSRRequest, context: Context
    ) -> platform_pb2.GetPEKCSRResponse:
        return platform_pb2.GetPEKCSRResponse(pek_csr=await self.core.pek_csr())

    async def ImportPEKCertificate(
        self, request: platform_pb2.ImportPEKCertificateRequest, context: Context
    ) -> platform_pb2.ImportPEKCertificateResponse:
        await self.core.import_pek_certificate(request.pek_cert, request.oca_cert)
        return platform_pb2.ImportPEKCertificateResponse()

    async def FactoryReset(
        self, request: platform_pb2.FactoryResetRequest, context: Context
    ) -> platform_pb2.FactoryResetResponse:
        await self.core.factory_reset(request.confirm)
        return platform_pb2.FactoryResetResponse()

    # -- SEV-SNP ----------------------------------------------------------------------------------------

    async def GetSnpStatus(
        self, request: platform_pb2.GetSnpStatusRequest, context: Context
    ) -> platform_pb2.GetSnpStatusResponse:
        return snp_status_to_proto(await self.snp.status())

    async def GetVekChain(
        self, request: platform_pb2.GetVekChainRequest, context: Context
    ) -> platform_pb2.GetVekChainResponse:
        vlek = {platform_pb2.VEK_KIND_VCEK: False, platform_pb2.VEK_KIND_VLEK: True}.get(request.kind)
        chain = await self.snp.vek_chain(vlek=vlek, timeout=context.time_remaining())
        return vek_chain_to_proto(chain)

    async def GetSnpCertTable(
        self, request: platform_pb2.GetSnpCertTableRequest, context: Context
    ) -> platform_pb2.GetSnpCertTableResponse:
        table, current = await self.snp.cert_table()
        return platform_pb2.GetSnpCertTableResponse(cert_table=table, matches_reported_tcb=current)

    async def InstallSnpCertTable(
        self, request: platform_pb2.InstallSnpCertTableRequest, context: Context
    ) -> platform_pb2.InstallSnpCertTableResponse:
        table = await self.snp.install_cert_table(request.cert_table, timeout=context.time_remaining())
        return platform_pb2.InstallSnpCertTableResponse(cert_table=table)

    async def CommitSnp(
        self, request: platform_pb2.CommitSnpRequest, context: Context
    ) -> platform_pb2.CommitSnpResponse:
        return platform_pb2.CommitSnpResponse(status=snp_status_to_proto(await self.snp.commit()))

    async def SetSnpConfig(
        self, request: platform_pb2.SetSnpConfigRequest, context: Context
    ) -> platform_pb2.SetSnpConfigResponse:
        status = await self.snp.set_config(request.reported_tcb, request.mask_chip_id, request.mask_chip_key)
        return platform_pb2.SetSnpConfigResponse(status=snp_status_to_proto(status))
