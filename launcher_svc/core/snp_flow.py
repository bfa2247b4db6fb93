"""The SEV-SNP launch (issue 16): orchestrated by the launcher, on the shared step machine.

    ACCEPTED -> CHAIN_FETCHED -> AUTHORIZED -> DEFINED -> STARTED -> RUNNING

* CHAIN_FETCHED: platform_svc's SNP status and the VCEK (or VLEK) chain of its reported TCB.
* AUTHORIZED: the owner checks the platform and the launch configuration (vCPUs and their type, guest
  features, VMM, policy, kernel hashes) and answers with an ID block and ID auth signed for exactly the
  launch digest it expects, the policy, and the init data whose SHA-256 is HOST_DATA. The launcher checks
  that the answer is consistent (it parses, the signatures hold, the policy is the one asked for,
  HOST_DATA is the init data's digest) before anything is defined.
* DEFINED: `<launchSecurity type='sev-snp'>` with the authorisation (`domain_xml`).
* STARTED: the domain is started running. SNP_LAUNCH_START/UPDATE/FINISH happen inside the start; the
  firmware compares the launch digest and policy with the ID block there, so a host that swapped the
  image is refused by the firmware (`snp_launch_refused`), not by the launcher. An SNP guest is not
  paused for a secret: it boots, attests itself to the owner, and gets its secret from the owner.
* RUNNING: the owner reports (`snp_attestation`, polled every `attestation_poll` seconds) that the
  guest's report verified and its secret was released. While the guest is booting and attesting, the
  launch waits in STARTED under the RUNNING phase's deadline.

Fail-closed as for SEV: any failure before RUNNING destroys the domain, including a guest whose
attestation the owner refused (its reason, e.g. `tcb_below_minimum`, passes through) and one that did
not attest before the deadline. Once the domain is destroyed, the owner's authorisation of the launch (if
it got one) is revoked, so that it does not stay open until it expires (a firmware refusal at
SNP_LAUNCH_FINISH, an abort, a failed start) before the failure is reported; best effort: the destroy
comes first, and a revocation that fails (within `REVOKE_TIMEOUT`) is logged, the authorisation then
expiring on its own. Transient owner outages while polling are
retried until the deadline; any other owner error fails the launch. After RUNNING the launcher no longer asks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from launcher_svc.core.config import LaunchEvent
from launcher_svc.core.domain_xml import (
    HOST_DATA_SIZE,
    ID_AUTH_SIZE,
    ID_BLOCK_SIZE,
    MAX_INIT_DATA,
    SnpLaunchParams,
    build_domain_xml,
)
from launcher_svc.core.ports import (
    AttestationState,
    AttestationVerdict,
    OwnerPort,
    PlatformPort,
    SnpAuthorization,
    SnpLaunchConfig,
    SnpPlatformEvidence,
)
from launcher_svc.core.preflight import Preflight
from launcher_svc.core.reasons import LaunchReason
from launcher_svc.core.spec import SNP_VMM_TYPE, WORKLOAD_RE, GuestSpec, validate_endpoint, validate_workload
from launcher_svc.core.state import LaunchFlow, LaunchRecord, Phase, PhaseChange
from launcher_svc.core.steps import ABORTED, StepMachine, Stepped, classify, failed_event
from sevlaunch.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.kernel_hashes import KernelHashes
from sevlaunch.snp.idblock import IdAuth, IdBlock

log = logging.getLogger("launcher_svc")

_TRANSIENT = (Unavailable, DeadlineExceeded)
#: Seconds the fail-closed path waits for the owner to revoke the authorisation of a failed launch (before
#: the failure is reported: a caller told FAILED finds the authorisation closed, unless the owner is down).
REVOKE_TIMEOUT = 5.0


def check_authorization(auth: SnpAuthorization, spec: GuestSpec) -> None:
    """Refuses an owner's answer that cannot be the authorisation of this launch (FailedPrecondition
    `bad_authorization`, or `policy_mismatch`). The firmware checks the ID block again at
    SNP_LAUNCH_FINISH; this catches a broken answer before a guest is defined."""

    def bad(why: str) -> FailedPrecondition:
        return FailedPrecondition(LaunchReason.BAD_AUTHORIZATION, f"the owner's authorisation {why}")

    if not WORKLOAD_RE.fullmatch(auth.authorization_id):
        raise bad("has no usable id")
    if len(auth.id_block) != ID_BLOCK_SIZE or len(auth.id_auth) != ID_AUTH_SIZE:
        raise bad(f"needs a {ID_BLOCK_SIZE}-byte ID block and a {ID_AUTH_SIZE}-byte ID auth")
    if len(auth.host_data) != HOST_DATA_SIZE:
        raise bad(f"needs {HOST_DATA_SIZE} bytes of HOST_DATA")
    if not auth.init_data or len(auth.init_data) > MAX_INIT_DATA:
        raise bad(f"needs init data of 1 to {MAX_INIT_DATA} bytes")
    try:
        block = IdBlock.from_bytes(auth.id_block)
        id_auth = IdAuth.from_bytes(auth.id_auth)
        id_auth.verify(block, author_key_enabled=auth.author_key)
    except SevError as exc:
        raise bad(f"does not hold: {exc.detail}") from None
    if auth.author_key and id_auth.author_key is None:
        raise bad("enables an author key its ID auth does not carry")
    if not block.policy == auth.policy == spec.policy:
        raise FailedPrecondition(
            LaunchReason.POLICY_MISMATCH,
            f"the owner authorised policy {block.policy:#x} ({auth.policy:#x}),"
            f" the spec asks {spec.policy:#x}",
        )
    if not hmac.compare_digest(hashlib.sha256(auth.init_data).digest(), auth.host_data):
        raise bad("has HOST_DATA that is not the SHA-256 of its init data")


def launch_config(spec: GuestSpec, pre: Preflight) -> SnpLaunchConfig:
    """What the owner is asked to authorise. Reads (and hashes) the kernel and initrd, once."""
    assert spec.vcpu_type is not None and spec.guest_features is not None  # pinned before
    hashes = None
    if spec.kernel_path is not None:
        with open(spec.kernel_path, "rb") as fh:
            kernel = fh.read()
        initrd = None
        if spec.initrd_path is not None:
            with open(spec.initrd_path, "rb") as fh:
                initrd = fh.read()
        hashes = KernelHashes.compute(kernel, initrd, spec.cmdline)
    return SnpLaunchConfig(
        firmware_sha256=pre.firmware.sha256,
        vcpus=spec.vcpus,
        vcpu_type=spec.vcpu_type,
        guest_features=spec.guest_features,
        vmm_type=SNP_VMM_TYPE,
        policy=spec.policy,
        kernel_hashes=hashes,
    )


class SnpFlow:
    def __init__(self, machine: StepMachine, platform: PlatformPort | None, owners: OwnerPort | None) -> None:
        self.m = machine
        self.platform = platform
        self.owners = owners

    async def launch(
        self, spec: GuestSpec, *, owner_endpoint: str, workload_id: str, requested_by: str
    ) -> tuple[LaunchRecord, AsyncIterator[LaunchEvent]]:
        """Admits and starts an SNP launch; returns its record and the stream of its events."""
        m = self.m
        if self.platform is None or self.owners is None:
            raise FailedPrecondition(LaunchReason.NOT_CONFIGURED, "orchestrated launches need --platform")
        validate_endpoint(owner_endpoint)
        validate_workload(workload_id)
        spec = m.pin_vcpu_type(spec)
        # Before anything else: a host (or a libvirt) that cannot launch SNP guests says so here.
        caps = await m.hv_call("", m.hv.snp_capabilities, timeout=m.config.phase_timeout)
        if spec.guest_features is None:
            spec = replace(spec, guest_features=caps.guest_features)
        elif spec.guest_features != caps.guest_features:
            raise FailedPrecondition(
                LaunchReason.UNSUPPORTED_GUEST_FEATURES,
                f"this host's QEMU launches SNP guests with features {caps.guest_features:#x},"
                f" not {spec.guest_features:#x}",
            )
        pre = await m.preflight(spec)
        rec = m.new_record(
            spec, LaunchFlow.SNP, requested_by, owner_endpoint=owner_endpoint, workload_id=workload_id
        )
        platform, owners = self.platform, self.owners
        events = await m.start_driven(spec, rec, lambda queue: self._drive(rec, pre, platform, owners, queue))
        return rec, events

    async def _drive(
        self,
        rec: LaunchRecord,
        pre: Preflight,
        platform: PlatformPort,
        owners: OwnerPort,
        queue: asyncio.Queue[LaunchEvent],
    ) -> None:
        m = self.m
        emit = m.emitter(queue)

        try:
            fetched = await m.step(rec, Phase.CHAIN_FETCHED, platform.snp_evidence)
            emit(fetched)
            evidence: SnpPlatformEvidence = fetched.result
            spec = rec.spec

            async def authorize() -> SnpAuthorization:
                try:
                    config = await asyncio.to_thread(launch_config, spec, pre)
                except OSError:
                    raise FailedPrecondition(
                        LaunchReason.IMAGE_UNREADABLE, "the kernel or initrd cannot be read"
                    ) from None
                auth = await owners.authorize_snp_launch(
                    rec.owner_endpoint, workload_id=rec.workload_id, platform=evidence, config=config
                )
                try:
                    check_authorization(auth, spec)
                except FailedPrecondition:
                    # Never used, but open at the owner: close it like any other given up.
                    if WORKLOAD_RE.fullmatch(auth.authorization_id):
                        given_up = replace(fetched.record, authorization_id=auth.authorization_id)
                        await self._revoke(owners, given_up)
                    raise
                return auth

            authorized = await m.step(
                fetched.record,
                Phase.AUTHORIZED,
                authorize,
                lambda a: PhaseChange(Phase.AUTHORIZED, authorization_id=a.authorization_id),
            )
            emit(authorized)
            started = await self._define_and_start(authorized.record, authorized.result, pre, emit)
            running = await m.step(
                started.record,
                Phase.RUNNING,
                lambda: self._attested(owners, started.record),
                lambda _v: PhaseChange(Phase.RUNNING, attested=True),
            )
            m.ran(running.record)
            emit(running)
        except asyncio.CancelledError:
            active = m.active.get(rec.launch_id)
            reason, detail = active.cancel_reason if active and active.cancel_reason else ABORTED
            target = m.target(rec)
            failed = await m.shielded(m.fail_closed(rec, target, reason, detail))
            await m.shielded(self._revoke(owners, failed))
            queue.put_nowait(failed_event(failed, target, m.clock.time()))
        except Exception as exc:
            reason, detail = classify(exc)
            if reason == LaunchReason.INTERNAL:
                log.exception(
                    "SNP launch failed with an unexpected error", extra={"launch_id": rec.launch_id}
                )
            target = m.target(rec)
            failed = await m.fail_closed(rec, target, reason, detail)
            await self._revoke(owners, failed)
            queue.put_nowait(failed_event(failed, target, m.clock.time()))

    async def _revoke(self, owners: OwnerPort, rec: LaunchRecord) -> None:
        """Revokes the owner's authorisation of a launch that failed closed, if it got one. Never raises:
        the domain is gone already, and an authorisation left open still expires. One the owner closed
        itself (a refused report) answers FailedPrecondition, which is expected."""
        if not rec.authorization_id or not rec.owner_endpoint:
            return
        extra = {"launch_id": rec.launch_id, "authorization_id": rec.authorization_id}
        try:
            with self.m.scope(rec.launch_id):  # the owner's audit record names the launch
                await asyncio.wait_for(
                    owners.revoke_snp_authorization(
                        rec.owner_endpoint, authorization_id=rec.authorization_id
                    ),
                    timeout=min(self.m.config.phase_timeout, REVOKE_TIMEOUT),
                )
        except FailedPrecondition as exc:
            log.info("SNP authorisation already closed", extra={**extra, "reason": exc.reason})
        except Exception as exc:  # best effort by design (module docstring)
            log.warning(
                "cannot revoke the SNP authorisation of a failed launch; it stays open until it expires",
                extra={**extra, "reason": getattr(exc, "reason", type(exc).__name__)},
            )
        else:
            log.info("SNP authorisation revoked after the launch failed", extra=extra)

    async def _define_and_start(
        self, rec: LaunchRecord, auth: SnpAuthorization, pre: Preflight, emit: Any
    ) -> Stepped[None]:
        m = self.m
        caps = await m.hv_call(rec.launch_id, m.hv.snp_capabilities, timeout=m.config.timeout(Phase.DEFINED))
        xml = build_domain_xml(
            rec.spec,
            launch_id=rec.launch_id,
            domain_name=rec.domain_name,
            loader=pre.loader,
            sev=SnpLaunchParams(
                cbitpos=caps.cbitpos,
                reduced_phys_bits=caps.reduced_phys_bits,
                policy=auth.policy,
                id_block=auth.id_block,
                id_auth=auth.id_auth,
                host_data=auth.host_data,
                author_key=auth.author_key,
                init_data=auth.init_data,
            ),
        )
        return await m.define_then_start(rec, xml, emit, Phase.STARTED, m.hv.start_snp, pre.firmware)

    async def _attested(self, owners: OwnerPort, rec: LaunchRecord) -> AttestationVerdict:
        """Waits for the owner's verdict on the guest's attestation (the step's deadline bounds it)."""
        while True:
            try:
                verdict = await owners.snp_attestation(
                    rec.owner_endpoint, authorization_id=rec.authorization_id
                )
            except _TRANSIENT as exc:
                log.warning(
                    "owner unreachable while the SNP guest attests; asking again",
                    extra={"launch_id": rec.launch_id, "reason": exc.reason},
                )
            else:
                if verdict.state is AttestationState.RELEASED:
                    return verdict
                if verdict.state is AttestationState.REFUSED:
                    raise FailedPrecondition(
                        verdict.reason or LaunchReason.ATTESTATION_REFUSED,
                        verdict.detail or "the owner refused the guest's attestation",
                    )
            await self.m.clock.sleep(self.m.config.attestation_poll)
