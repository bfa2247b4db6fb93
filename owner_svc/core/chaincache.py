"""Verified SEV certificate chains, remembered: every launch on a host presents the same six certificates
until its PDH rotates, and verifying them (four ECDSA P-384 and three RSA-4096 signatures) is most of an
OpenSession's cryptography.

What is remembered is the outcome of `sevlaunch.sev.chain.verify_chain` for one chain's exact bytes
under one trust configuration, nothing more:
* The key is SHA-256 over the trust configuration's digest and the six certificates' exact bytes (each
  length-prefixed). A chain differing in one bit is another key: it is parsed and verified in full, and
  refused if it does not verify. A chain never verified is never in the cache; refusals are not cached.
* The trust configuration (`TrustConfig`) is the pinned AMD roots, the extra roots and the generation
  rules, with a digest over all of them. When the owner's configuration changes (an extra root added,
  removed or revoked), it installs a new `TrustConfig` and clears the cache; since the digest is part of
  every key, an entry made under another configuration could not be found even before the clear, and an
  entry verified under an old configuration while the change lands is not stored.
* Only what the chain's bytes decide is cached (the parsed chain, the root it verified to, its
  generation, the CEK fingerprint). What depends on the call is still checked on every call by the
  caller: the workload's generations and firmware minimum, the policy.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from sevlaunch.sev.chain import CertificateChain, Generation, TrustedRoot, pinned_roots

#: Bumped whenever the rules for what a verified chain counts as change (e.g. the naming rule for
#: generations below), so that no entry made under older rules can be found.
RULES_VERSION = b"sevlaunch-owner/chain-cache/1"
DEFAULT_CAPACITY = 1024


def _framed(parts: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


@dataclass(frozen=True)
class TrustConfig:
    """The roots a chain is verified against, and a digest that names exactly this configuration."""

    extra_roots: tuple[TrustedRoot, ...]
    digest: bytes

    @classmethod
    def of(cls, extra_roots: Iterable[TrustedRoot], generation_names: Iterable[str]) -> TrustConfig:
        roots = tuple(extra_roots)
        h = hashlib.sha256(RULES_VERSION)
        h.update(_framed(name.encode() for name in sorted(generation_names)))
        for kind, group in ((b"pinned", pinned_roots()), (b"extra", roots)):
            for root in group:
                generation = root.generation.value if root.generation is not None else ""
                h.update(
                    _framed((kind, root.name.encode(), generation.encode(), root.ark.to_bytes(),
                             root.ask.to_bytes()))
                )  # fmt: skip
        return cls(roots, h.digest())


@dataclass(frozen=True)
class CachedChain:
    """A chain that verified to `root_name` under the trust configuration its key names."""

    chain: CertificateChain
    root_name: str
    generation: Generation | None
    cek_fingerprint: str


def chain_key(trust_digest: bytes, parts: Iterable[bytes]) -> bytes:
    """The cache key of a chain given as its six certificates' bytes (PDH, PEK, OCA, CEK, ASK, ARK)."""
    return hashlib.sha256(trust_digest + _framed(bytes(p) for p in parts)).digest()


class VerifiedChainCache:
    """A bounded LRU map from `chain_key` to `CachedChain`, safe for concurrent callers."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 0:
            raise ValueError("the chain cache capacity cannot be negative")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, CachedChain] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> CachedChain | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: CachedChain) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
