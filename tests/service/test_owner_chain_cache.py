"""The verified-chain cache of OpenSession: a hit is as strict as a miss.

A chain is verified in full once per trust configuration and remembered by its exact bytes; changing the
trust configuration (an extra root removed, revoked and replaced, added) drops what was remembered; one
changed bit is another chain, verified in full and refused; what depends on the call (the workload's
rules, the policy) is checked on every call, hit or miss.
"""

from __future__ import annotations

import concurrent.futures
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from owner_support import SEV_POLICY, Publisher, emulator_chain, provision, rpc_error, workload_msg

import owner_svc.core.service as service_module
from owner_svc.core.chaincache import CachedChain, VerifiedChainCache, chain_key
from owner_svc.core.service import ChainInput, OwnerCore
from sevlaunch.errors import PermissionDenied
from sevlaunch.firmware.emulator import EmulatedRoot
from sevlaunch.rpc.v1 import common_pb2, owner_pb2
from sevlaunch.sev.chain import load_roots_file
from sevlaunch.sev.errors import VerificationFailed

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]

PARTS = ("pdh", "pek", "oca", "cek", "ask", "ark")


def chain_input(chain: common_pb2.CertificateChain) -> ChainInput:
    return ChainInput(*(getattr(chain, f"{p}_cert") for p in PARTS))


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts full verifications (the cache's misses), by the name of the root each reached."""
    seen: list[str] = []
    real = service_module.verify_chain

    def counting(chain: Any, **kwargs: Any) -> Any:
        seen.append("?")
        verified = real(chain, **kwargs)
        seen[-1] = verified.root_name
        return verified

    monkeypatch.setattr(service_module, "verify_chain", counting)
    return seen


def opened(core: OwnerCore, chain: common_pb2.CertificateChain, workload: str = "web") -> str:
    return core.open_session("launcher", workload, chain_input(chain), SEV_POLICY).session_id


def refused(core: OwnerCore, chain: common_pb2.CertificateChain, workload: str = "web") -> str:
    with pytest.raises((VerificationFailed, PermissionDenied)) as info:
        core.open_session("launcher", workload, chain_input(chain), SEV_POLICY)
    reason = info.value.reason
    return str(reason.value if hasattr(reason, "value") else reason)


def test_a_chain_is_verified_once_then_served_from_the_cache(
    make_owner: Any, publisher: Publisher, emu: Any, verifications: list[str]
) -> None:
    h = make_owner()
    provision(h, publisher)
    chain = emulator_chain(emu)
    for _ in range(3):
        h.stub().OpenSession(owner_pb2.OpenSessionRequest(workload_id="web", chain=chain, policy=SEV_POLICY))
    assert verifications == ["emulated"]
    metrics = urllib.request.urlopen(h.running.metrics_url, timeout=5).read()
    assert b'sevlaunch_owner_chain_cache_lookups_total{result="hit"} 2.0' in metrics
    assert b'sevlaunch_owner_chain_cache_lookups_total{result="miss"} 1.0' in metrics


def test_removed_extra_root_refuses_the_cached_chain(
    make_owner: Any, publisher: Publisher, emu: Any, emu_root_file: Path, verifications: list[str]
) -> None:
    h = make_owner()
    provision(h, publisher)
    core: OwnerCore = h.app.core
    chain = emulator_chain(emu)
    opened(core, chain)
    opened(core, chain)
    assert verifications == ["emulated"]

    core.set_extra_roots([])  # the operator stops trusting the emulated root
    assert refused(core, chain) == "untrusted_root"
    assert refused(core, chain) == "untrusted_root"  # refusals are never cached as successes
    err = rpc_error(
        lambda: h.stub().OpenSession(owner_pb2.OpenSessionRequest(workload_id="web", chain=chain, policy=3))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "untrusted_root")

    core.set_extra_roots([load_roots_file(emu_root_file.read_bytes(), "emulated")])  # added back
    opened(core, chain)
    opened(core, chain)
    assert verifications == ["emulated", "?", "?", "?", "emulated"]


def test_revoked_root_replaced_under_the_same_name_refuses_the_cached_chain(
    make_owner: Any, publisher: Publisher, emu: Any, verifications: list[str]
) -> None:
    """A root revoked and replaced by another ARK with the same name and generation rules: the cached
    verification was made under the old ARK and counts for nothing under the new one."""
    h = make_owner()
    provision(h, publisher)
    core: OwnerCore = h.app.core
    chain = emulator_chain(emu)
    opened(core, chain)
    replacement = EmulatedRoot.generate()
    core.set_extra_roots([load_roots_file(replacement.ask_ark(), "emulated")])
    assert [r.name for r in core.extra_roots] == ["emulated"]
    assert refused(core, chain) == "untrusted_root"
    assert verifications == ["emulated", "?"]


def flipped(chain: common_pb2.CertificateChain, part: str, offset: int) -> common_pb2.CertificateChain:
    raw = bytearray(getattr(chain, f"{part}_cert"))
    raw[offset] ^= 0x01
    out = common_pb2.CertificateChain()
    out.CopyFrom(chain)
    setattr(out, f"{part}_cert", bytes(raw))
    return out


#: A byte of each certificate's first signature: the SEV certificates' ECDSA/RSA `r` (sig1 at 0x414,
#: after its usage and algorithm), the AMD certificates' RSA signature (their last bytes).
SIGNED = {"pdh": 0x420, "pek": 0x420, "oca": 0x420, "cek": 0x420, "ask": -10, "ark": -10}


def test_one_changed_bit_is_another_chain_verified_in_full_and_refused(
    make_owner: Any, publisher: Publisher, emu: Any, verifications: list[str]
) -> None:
    h = make_owner()
    provision(h, publisher)
    core: OwnerCore = h.app.core
    good = emulator_chain(emu)
    opened(core, good)
    assert verifications == ["emulated"]
    for part, offset in SIGNED.items():
        bad = flipped(good, part, offset)
        for _ in range(2):  # twice: a refused chain is not remembered either
            before = len(verifications)
            assert refused(core, bad) in ("bad_signature", "bad_field", "untrusted_root"), part
            assert verifications[before:] == ["?"], part  # a miss, verified in full, refused
    # A bit no signature covers (the PDH's empty second signature slot) still makes another key: the
    # chain is verified in full, and verifies, exactly as it would without a cache.
    unsigned = flipped(good, "pdh", 0x61C + 8 + 100)
    opened(core, unsigned)
    assert verifications[-1] == "emulated"
    opened(core, good)  # the verified chain is still a hit
    assert verifications.count("emulated") == 2
    assert len(verifications) == 2 + 2 * len(SIGNED)


def test_per_call_rules_are_checked_on_a_hit(
    make_owner: Any, publisher: Publisher, emu: Any, verifications: list[str]
) -> None:
    h = make_owner()
    provision(h, publisher)
    core: OwnerCore = h.app.core
    chain = emulator_chain(emu)
    opened(core, chain)
    # The workload stops allowing the emulated generation: the cached chain is refused for it.
    h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(generations=["milan"])))
    assert refused(core, chain) == "generation_not_allowed"
    # A firmware minimum above the PDH's API version.
    h.admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=workload_msg(firmware_minimum=common_pb2.FirmwareVersion(api_major=9, api_minor=0))
        )
    )
    assert refused(core, chain) == "firmware_too_old"
    # A policy the workload does not allow.
    h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(allowed_policies=[0x7])))
    assert refused(core, chain) == "policy_not_allowed"
    h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg()))
    opened(core, chain)
    assert verifications == ["emulated"]


def test_concurrent_opens_and_a_trust_change(
    make_owner: Any, publisher: Publisher, emu: Any, emu_root_file: Path, verifications: list[str]
) -> None:
    """Many threads open sessions with the same chain, good and one-bit-bad, at once: every good one is
    opened, every bad one refused; once the root is removed, no open succeeds with the cached chain."""
    h = make_owner()
    provision(h, publisher)
    core: OwnerCore = h.app.core
    good = emulator_chain(emu)
    bad = flipped(good, "pdh", SIGNED["pdh"])
    start = threading.Barrier(32)

    def attempt(i: int) -> str:
        start.wait()
        chain = bad if i % 4 == 3 else good
        try:
            opened(core, chain)
            return "opened"
        except (VerificationFailed, PermissionDenied) as exc:
            return str(exc.reason.value if hasattr(exc.reason, "value") else exc.reason)

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(attempt, range(32)))
    assert results.count("opened") == 24
    assert all(r == "bad_signature" for i, r in enumerate(results) if i % 4 == 3)
    # At least one full verification of the good chain; never one that let the bad chain through.
    assert 1 <= verifications.count("emulated") <= 24

    core.set_extra_roots([])
    start = threading.Barrier(32)
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(attempt, range(32)))
    assert set(results) == {"untrusted_root", "bad_signature"}
    assert results.count("untrusted_root") >= 24


def test_the_cache_is_bounded_and_keyed_by_trust() -> None:
    cache = VerifiedChainCache(capacity=2)
    entry: CachedChain = object()  # type: ignore[assignment]
    keys = [chain_key(b"trust-a", [bytes([i])] * 6) for i in range(3)]
    for k in keys:
        cache.put(k, entry)
    assert len(cache) == 2 and cache.get(keys[0]) is None and cache.get(keys[2]) is entry
    # The same bytes under another trust configuration, and framing: no collision.
    assert chain_key(b"trust-a", [b"x"] * 6) != chain_key(b"trust-b", [b"x"] * 6)
    empty = [b""] * 4
    assert chain_key(b"t", [b"ab", b"", *empty]) != chain_key(b"t", [b"a", b"b", *empty])
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        VerifiedChainCache(capacity=-1)
