"""The launcher's peers, faked: a platform that hands out a chain and an owner that opens sessions with
a usable GODH and answers ReleaseSecret with a fixed reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from launcher_svc.core.ports import OwnerSession, PlatformChain, ReleasedSecret
from sevlaunch.sev.cert import Algorithm, SEVCertificate, Usage

# A GODH that passes the launcher's checks (the fake hypervisor never unwraps the session).
GODH = SEVCertificate.for_ec_key(
    usage=Usage.PDH,
    algorithm=Algorithm.ECDH_SHA256,
    public_key=ec.generate_private_key(ec.SECP384R1()).public_key(),
    api_major=0,
    api_minor=24,
).to_bytes()
SESSION = b"\x02" * 128
CHAIN = PlatformChain(b"pdh", b"pek", b"oca", b"cek", b"ask", b"ark")


class FakePlatform:
    async def certificate_chain(self) -> PlatformChain:
        return CHAIN


@dataclass
class FakeOwner:
    secret: ReleasedSecret

    async def open_session(
        self, endpoint: str, *, workload_id: str, chain: PlatformChain, policy: int
    ) -> OwnerSession:
        return OwnerSession("s-1", GODH, SESSION, policy)

    async def release_secret(self, endpoint: str, **kwargs: Any) -> ReleasedSecret:
        return self.secret

    async def close(self) -> None:
        pass
