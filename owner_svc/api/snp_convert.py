"""SEV-SNP protobuf <-> domain objects for the owner's servicers (no decisions here)."""

from __future__ import annotations

from owner_svc.core.reasons import Reason
from owner_svc.core.snp import SnpAuthorized, SnpLaunchConfig, SnpPlatformInput
from owner_svc.core.snp_keys import SnpKeyInfo
from owner_svc.core.snp_model import (
    AuthorizationState,
    SnpAuthorization,
    SnpKeyKind,
    SnpRules,
    SnpTcbFloor,
)
from sevlaunch.errors import InvalidArgument
from sevlaunch.refvalues import KernelHashes
from sevlaunch.rpc.v1 import owner_pb2
from sevlaunch.sev.errors import SevError
from sevlaunch.snp.tcb import Product, TcbVersion

KIND_FROM_PROTO = {owner_pb2.SNP_KEY_KIND_ID: SnpKeyKind.ID, owner_pb2.SNP_KEY_KIND_AUTHOR: SnpKeyKind.AUTHOR}
KIND_TO_PROTO = {v: k for k, v in KIND_FROM_PROTO.items()}
_STATE_TO_PROTO = {
    AuthorizationState.AUTHORIZED: owner_pb2.SNP_AUTHORIZATION_STATE_AUTHORIZED,
    AuthorizationState.RELEASED: owner_pb2.SNP_AUTHORIZATION_STATE_RELEASED,
    AuthorizationState.REVOKED: owner_pb2.SNP_AUTHORIZATION_STATE_REVOKED,
    AuthorizationState.REFUSED: owner_pb2.SNP_AUTHORIZATION_STATE_REFUSED,
}


def _bad(detail: str) -> InvalidArgument:
    return InvalidArgument(Reason.BAD_WORKLOAD, f"snp.{detail}")


def _product(name: str) -> Product:
    try:
        return Product.parse(name)
    except SevError as exc:
        raise _bad(exc.detail) from None


def _floor(msg: owner_pb2.SnpTcbMinimum) -> SnpTcbFloor:
    product = _product(msg.product)
    tcbs: dict[str, TcbVersion] = {}
    for kind in ("reported", "committed", "launch"):
        if msg.HasField(kind):
            try:
                tcbs[kind] = TcbVersion.from_raw(getattr(msg, kind), product, field=f"min_tcb.{kind}")
            except SevError as exc:
                raise _bad(exc.detail) from None
    return SnpTcbFloor(product, **tcbs)


def _id(value: bytes, name: str) -> bytes | None:
    if not value:
        return None
    if len(value) != 16:
        raise _bad(f"{name}: 16 bytes or empty")
    return bytes(value)


def snp_rules_from_proto(msg: owner_pb2.SnpRules) -> SnpRules:
    return SnpRules(
        products=tuple(_product(p) for p in msg.products),
        policies=tuple(msg.policies),
        vcpu_counts=tuple(msg.vcpu_counts),
        guest_features=tuple(msg.guest_features),
        vmm_types=tuple(msg.vmm_types) or ("QEMU",),
        vcpu_types=tuple(msg.vcpu_types),
        min_tcb=tuple(_floor(f) for f in msg.min_tcb),
        allow_provisional_firmware=msg.allow_provisional_firmware,
        allow_debug=msg.allow_debug,
        allow_migration_agent=msg.allow_migration_agent,
        allow_vlek=msg.allow_vlek,
        family_id=_id(msg.family_id, "family_id"),
        image_id=_id(msg.image_id, "image_id"),
        min_guest_svn=msg.min_guest_svn,
        use_author_key=not msg.no_author_key,
    )


def snp_rules_to_proto(rules: SnpRules) -> owner_pb2.SnpRules:
    floors = []
    for f in rules.min_tcb:
        m = owner_pb2.SnpTcbMinimum(product=f.product.value)
        for kind in ("reported", "committed", "launch"):
            tcb = getattr(f, kind)
            if tcb is not None:
                setattr(m, kind, tcb.raw)
        floors.append(m)
    return owner_pb2.SnpRules(
        products=[p.value for p in rules.products],
        policies=list(rules.policies),
        vcpu_counts=list(rules.vcpu_counts),
        guest_features=list(rules.guest_features),
        vmm_types=list(rules.vmm_types),
        vcpu_types=list(rules.vcpu_types),
        min_tcb=floors,
        allow_provisional_firmware=rules.allow_provisional_firmware,
        allow_debug=rules.allow_debug,
        allow_migration_agent=rules.allow_migration_agent,
        allow_vlek=rules.allow_vlek,
        family_id=rules.family_id or b"",
        image_id=rules.image_id or b"",
        min_guest_svn=rules.min_guest_svn,
        no_author_key=not rules.use_author_key,
    )


def platform_from_proto(msg: owner_pb2.SnpPlatform) -> SnpPlatformInput:
    return SnpPlatformInput(
        vek=bytes(msg.vek_cert),
        chain=tuple(bytes(c) for c in msg.chain),
        committed_tcb=msg.committed_tcb if msg.HasField("committed_tcb") else None,
        current_tcb=msg.current_tcb if msg.HasField("current_tcb") else None,
    )


def config_from_proto(msg: owner_pb2.SnpLaunchConfig) -> SnpLaunchConfig:
    kh = None
    if msg.HasField("kernel_hashes"):
        k = msg.kernel_hashes
        kh = KernelHashes(k.kernel, k.initrd, k.cmdline)
    return SnpLaunchConfig(
        vcpus=msg.vcpus,
        vcpu_type=msg.vcpu_type,
        guest_features=msg.guest_features,
        vmm_type=msg.vmm_type,
        kernel_hashes=kh,
        policy=msg.policy,
        firmware_sha256=msg.firmware_sha256,
    )


def authorized_to_proto(a: SnpAuthorized) -> owner_pb2.AuthorizeSnpLaunchResponse:
    return owner_pb2.AuthorizeSnpLaunchResponse(
        authorization_id=a.authorization_id,
        id_block=a.id_block,
        id_auth=a.id_auth,
        policy=a.policy,
        host_data=a.host_data,
        init_data=a.init_data,
        author_key=a.author_key,
        launch_digest=a.launch_digest,
        manifest_id=a.manifest_id,
        product=a.product,
        expires_at_unix=int(a.expires_at),
    )


def key_info_to_proto(k: SnpKeyInfo) -> owner_pb2.SnpKeyInfo:
    return owner_pb2.SnpKeyInfo(
        kind=KIND_TO_PROTO[k.kind],
        version=k.version,
        public_digest=k.public_digest,
        created_at_unix=int(k.created_at),
        retired_at_unix=int(k.retired_at or 0),
        source=k.source,
    )


def authorization_to_proto(a: SnpAuthorization, now: float) -> owner_pb2.SnpAuthorizationInfo:
    state = _STATE_TO_PROTO[a.state]
    if a.state is AuthorizationState.AUTHORIZED and now >= a.expires_at:
        state = owner_pb2.SNP_AUTHORIZATION_STATE_EXPIRED
    return owner_pb2.SnpAuthorizationInfo(
        authorization_id=a.authorization_id,
        workload_id=a.workload_id,
        caller=a.caller,
        product=a.product,
        policy=a.policy,
        vcpus=a.vcpus,
        launch_digest=a.launch_digest,
        manifest_id=a.manifest_id,
        host_data=a.host_data,
        id_key_digest=a.id_key_digest,
        state=state,
        created_at_unix=int(a.created_at),
        expires_at_unix=int(a.expires_at),
        reason=a.reason,
    )
