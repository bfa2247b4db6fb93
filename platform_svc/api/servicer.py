"""PlatformService servicer: protobuf in, PlatformCore call, protobuf out. Nothing else lives here."""

from __future__ import annotations

from typing import Any

import grpc.aio

from platform_svc.core.chain import PlatformChain
from platform_svc.core.service import PlatformCore
from sevlaunch.firmware.interface import PlatformState
from sevlaunch.rpc import AuthzPolicy, method_rules
from sevlaunch.rpc.v1 import common_pb2, platform_pb2, platform_pb2_grpc

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
        },
    )
)

_STATES = {
    PlatformState.UNINIT: platform_pb2.PLATFORM_STATE_UNINIT,
    PlatformState.INIT: platform_pb2.PLATFORM_STATE_INIT,
    PlatformState.WORKING: platform_pb2.PLATFORM_STATE_WORKING,
}

Context = grpc.aio.ServicerContext[Any, Any]


def chain_to_proto(chain: PlatformChain) -> common_pb2.PlatformCertificates:
    return common_pb2.PlatformCertificates(
        chain=common_pb2.CertificateChain(
            pdh_cert=chain.pdh, pek_cert=chain.pek, oca_cert=chain.oca, cek_cert=chain.cek,
            ask_cert=chain.ask, ark_cert=chain.ark,
        ),
        generation=chain.generation,
        firmware=common_pb2.FirmwareVersion(
            api_major=chain.api_major, api_minor=chain.api_minor, build_id=chain.build
        ),
        chip_id=chain.chip_id,
    )


class PlatformServicer(platform_pb2_grpc.PlatformServiceServicer):
    def __init__(self, core: PlatformCore) -> None:
        self.core = core

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
