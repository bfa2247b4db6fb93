"""The reference values in force: verified manifests, minus revoked and out-of-window ones.

Thread-safe: the gRPC handlers and the HTTP poller read and admit concurrently. Validity windows are
checked at every use, not only at import, so a manifest stops counting the moment it expires. The set is
a cache of the store's manifests (`OwnerCore.sync_reference_values` reloads it when another replica
changed them); `load` re-verifies every envelope it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from owner_svc.core.model import KernelHashesRule, RefSelector, Workload
from sevlaunch.refvalues import (
    DigestConfig,
    PublisherKey,
    VerifiedManifest,
    verify_manifest,
    version_in_range,
)
from sevlaunch.sev.errors import SevError
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.technology import Technology


@dataclass(frozen=True)
class AcceptedDigest:
    launch_digest: bytes
    manifest_id: str
    config: DigestConfig


class ReferenceValueSet:
    def __init__(self, publishers: Sequence[PublisherKey]) -> None:
        self.publishers = tuple(publishers)
        self._manifests: dict[str, VerifiedManifest] = {}
        self._revoked: set[str] = set()
        self._lock = threading.Lock()

    def load(self, stored: Iterable[tuple[str, bytes]], revoked: Iterable[str]) -> list[tuple[str, SevError]]:
        """Replaces the set with the stored envelopes, each re-verified against the publisher keys
        configured now (a key removed from the configuration takes its manifests out of force): a row is
        never trusted for being in the store. Revoked: the stored revocations plus every `revokes` list
        of a manifest that verifies, plus everything this set held revoked before (never forgotten).
        Returns the (id, error) of the envelopes that fail (not the revoked).

        The verification runs outside the lock; readers see the old set until the new one replaces it.
        """
        failures: list[tuple[str, SevError]] = []
        verified: list[VerifiedManifest] = []
        for mid, envelope in stored:
            try:
                verified.append(verify_manifest(envelope, self.publishers, now=None))
            except SevError as exc:
                failures.append((mid, exc))
        revoked_now = set(revoked)
        for vm in verified:
            revoked_now.update(vm.manifest.revokes)
        with self._lock:
            # Revocations only ever grow in a process: rows gone from the store (deleted by someone
            # with write access to it) do not put a revoked manifest back in force.
            revoked_now |= self._revoked
            self._revoked = revoked_now
            self._manifests = {vm.id: vm for vm in verified if vm.id not in revoked_now}
        return failures

    def ids(self) -> frozenset[str]:
        """The ids of the verified, unrevoked manifests held (validity windows not applied)."""
        with self._lock:
            return frozenset(self._manifests)

    def verify(self, envelope: bytes, now: datetime) -> VerifiedManifest:
        """Verifies an envelope for import (signature, schema, window, revocation); changes nothing."""
        with self._lock:
            revoked = set(self._revoked)
        return verify_manifest(envelope, self.publishers, now=now, revoked=revoked)

    def contains(self, manifest_id: str) -> bool:
        with self._lock:
            return manifest_id in self._manifests

    def admit(self, vm: VerifiedManifest) -> None:
        with self._lock:
            self._revoked.update(vm.manifest.revokes)
            for rid in vm.manifest.revokes:
                self._manifests.pop(rid, None)
            if vm.id not in self._revoked:
                self._manifests[vm.id] = vm

    def in_force(self, now: datetime) -> list[VerifiedManifest]:
        with self._lock:
            manifests = list(self._manifests.values())
        return [vm for vm in manifests if vm.manifest.not_before <= now < vm.manifest.not_after]

    def accepted(self, workload: Workload, policy: GuestPolicy, now: datetime) -> list[AcceptedDigest]:
        """Every launch digest the workload accepts now for a launch under `policy` (deduplicated)."""
        mode = Technology.SEV_ES if policy.requires_es else Technology.SEV
        out: dict[bytes, AcceptedDigest] = {}
        for vm in sorted(self.in_force(now), key=lambda v: v.id):
            for selector in workload.selectors:
                if not _manifest_selected(vm, selector, mode):
                    continue
                for ref in vm.manifest.digests:
                    cfg = ref.config
                    if cfg.mode is not mode or not _config_selected(cfg, selector):
                        continue
                    out.setdefault(ref.launch_digest, AcceptedDigest(ref.launch_digest, vm.id, cfg))
        return list(out.values())

    def snp_manifests(self, workload: Workload, now: datetime) -> list[VerifiedManifest]:
        """The manifests in force whose SEV-SNP digests the workload accepts, each cut down to exactly
        those digests (a selector naming the SEV-SNP mode, its firmware and versions, its kernel hashes
        rule): what the SNP lookups (`sevlaunch.snp.refmatch`) are given, so they never see a digest the
        workload's selectors leave out."""
        out = []
        for vm in sorted(self.in_force(now), key=lambda v: v.id):
            selectors = [s for s in workload.selectors if _manifest_selected(vm, s, Technology.SEV_SNP)]
            digests = tuple(
                d
                for d in vm.manifest.digests
                if d.config.mode is Technology.SEV_SNP
                and any(_config_selected(d.config, s) for s in selectors)
            )
            if digests:
                out.append(replace(vm, manifest=replace(vm.manifest, digests=digests)))
        return out


def _manifest_selected(vm: VerifiedManifest, selector: RefSelector, mode: Technology) -> bool:
    m = vm.manifest
    return (
        mode in selector.modes
        and m.firmware_name.casefold() == selector.firmware_name.casefold()
        and version_in_range(m.firmware_version, selector.version_min or None, selector.version_max or None)
    )


def _config_selected(cfg: DigestConfig, selector: RefSelector) -> bool:
    """The selector's per-digest rules: kernel hashes; for SEV-ES the vCPU count and the pins."""
    has_kernel = cfg.kernel_hashes is not None
    if selector.kernel_hashes is KernelHashesRule.FORBIDDEN and has_kernel:
        return False
    if selector.kernel_hashes is KernelHashesRule.REQUIRED and not has_kernel:
        return False
    if cfg.mode is Technology.SEV_ES:
        if cfg.vcpus not in selector.sev_es_vcpus:
            return False
        if selector.vcpu_type and cfg.vcpu_type != selector.vcpu_type:
            return False
        if selector.vmsa_layout and cfg.vmsa_layout != selector.vmsa_layout:
            return False
    return True
