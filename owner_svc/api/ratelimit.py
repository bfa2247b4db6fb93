"""Token buckets for the owner's guest port: one per peer address and one for the port as a whole.

A guest has no identity before its report verifies, so the port is open to anyone who can reach it; the
buckets bound what one address, and everyone together, can make the owner do (each Attest is a chain
and a signature verification and a database write). Peers are kept in a bounded LRU: an address not seen
for a while starts again with a full bucket, which is what a long-idle bucket would hold anyway.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_PEERS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBucket:
    """`rate` tokens a second, up to `burst`. Not thread-safe by itself (the limiter locks)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self._b = _Bucket(burst, now)

    def take(self, now: float) -> bool:
        b = self._b
        b.tokens = min(self.burst, b.tokens + max(0.0, now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        return False


class GuestRateLimiter:
    def __init__(
        self,
        *,
        per_peer_rate: float,
        per_peer_burst: float,
        global_rate: float,
        global_burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self._clock = clock
        self._peer_rate = per_peer_rate
        self._peer_burst = per_peer_burst
        TokenBucket(per_peer_rate, per_peer_burst, 0.0)  # validates the per-peer parameters now
        self._global = TokenBucket(global_rate, global_burst, clock())
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_peers = max_peers
        self._lock = threading.Lock()

    def allow(self, peer: str) -> str | None:
        """None when the call may proceed; else the scope that refused it ("peer" or "global"). A call
        refused per peer takes no global token, so one noisy address cannot drain the port for others."""
        now = self._clock()
        with self._lock:
            bucket = self._peers.get(peer)
            if bucket is None:
                bucket = TokenBucket(self._peer_rate, self._peer_burst, now)
                self._peers[peer] = bucket
                if len(self._peers) > self._max_peers:
                    self._peers.popitem(last=False)
            else:
                self._peers.move_to_end(peer)
            if not bucket.take(now):
                return "peer"
            if not self._global.take(now):
                return "global"
        return None


def peer_address(peer: str) -> str:
    """The address part of gRPC's peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678"): the port varies
    per connection, so it is not part of what is limited."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, _port = rest.rpartition(":")
        return host if sep else rest
    return peer or "unknown"
