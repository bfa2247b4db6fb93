"""The physical floor of the owner: the raw cryptography of one OpenSession + ReleaseSecret pair, written
with `cryptography`, `hmac` and `hashlib` directly (not with sevlaunch's own code), single-threaded.

    python -m bench.floor_bench [--seconds 2]

Per pair, what the protocol itself requires of the owner (PROTOCOL.md §4-§6):
open:    a fresh P-384 key pair (the GODH) and one ECDH with the PDH; the SEV KDF (master secret, KEK,
         KIK: one HMAC-SHA256 each); TEK, TIK, nonce and IV from the OS; TEK‖TIK wrapped with AES-128-CTR
         and its HMAC; the policy MAC; TEK‖TIK sealed at rest with AES-256-GCM.
release: TEK‖TIK unsealed (AES-256-GCM); the expected-measurement HMAC, compared in constant time; the
         secret table encrypted with AES-128-CTR and its HMAC.
What is not in it: parsing or verifying the certificate chain (the same chain on every launch of a host),
the database, the audit log, gRPC: that is the owner's own cost, which the ratio measures.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The secret table's size in the standalone runs (`python -m bench.floor_bench`, `python -m
#: bench.grpc_floor --crypto`); `python -m bench` uses the size of its world's own table.
DEFAULT_TABLE = 96

_P384 = ec.SECP384R1()
_ECDH = ec.ECDH()


def _kdf(key: bytes, label: bytes, context: bytes = b"") -> bytes:
    # SP 800-108 counter mode, one HMAC-SHA256 block (16 bytes are needed), little-endian fields as
    # AMD's firmware encodes them.
    msg = struct.pack("<I", 1) + label + b"\x00" + context + struct.pack("<I", 128)
    return hmac.digest(key, msg, "sha256")[:16]


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


class PairWork:
    """One pair's work, as its two halves: `open()` is OpenSession's share, `release()` ReleaseSecret's.
    The platform's PDH key (the peer of the ECDH) and the owner's KEK exist before; a launch digest stands
    for the reference values. `release()` opens the keys the latest `open()` sealed."""

    def __init__(self, secret_table_size: int, policy: int = 0x3) -> None:
        self._pdh_public = ec.generate_private_key(_P384).public_key()
        self._kek_at_rest = AESGCM(os.urandom(32))
        self._launch_digest = hashlib.sha256(b"image").digest()
        self._table = os.urandom(secret_table_size)
        self._policy = policy
        self._api = (1, 55, 21)
        # What the host reports (its MNONCE and MEASURE): given, not computed by the owner.
        self._mnonce, self._reported = os.urandom(16), os.urandom(32)
        self._sealed = (b"", b"")
        self.open()

    def open(self) -> None:
        godh = ec.generate_private_key(_P384)
        z = godh.exchange(_ECDH, self._pdh_public)
        godh.public_key().public_numbers()  # the GODH certificate's x and y
        nonce, wrap_iv, tek, tik = os.urandom(16), os.urandom(16), os.urandom(16), os.urandom(16)
        master = _kdf(z, b"sev-master-secret", nonce)
        kek, kik = _kdf(master, b"sev-kek"), _kdf(master, b"sev-kik")
        wrap_tk = _ctr(kek, wrap_iv, tek + tik)
        hmac.digest(kik, wrap_tk, "sha256")
        hmac.digest(tik, struct.pack("<I", self._policy), "sha256")
        seal_nonce = os.urandom(12)
        self._sealed = (seal_nonce, self._kek_at_rest.encrypt(seal_nonce, tek + tik, b"session-keys"))

    def release(self) -> None:
        keys = self._kek_at_rest.decrypt(*self._sealed, b"session-keys")
        tek, tik = keys[:16], keys[16:]
        api_major, api_minor, build = self._api
        measured = (
            struct.pack("<BBBBI", 0x04, api_major, api_minor, build, self._policy)
            + self._launch_digest
            + self._mnonce
        )
        measure = hmac.digest(tik, measured, "sha256")
        hmac.compare_digest(measure, self._reported)
        iv = os.urandom(16)
        payload = _ctr(tek, iv, self._table)
        header = struct.pack("<BI", 0x01, 0) + iv + struct.pack("<II", len(self._table), len(self._table))
        hmac.digest(tik, header + payload + measure, "sha256")


def make_pair(secret_table_size: int, policy: int = 0x3) -> Callable[[], None]:
    """One pair's work (both halves of `PairWork`) as a closure."""
    work = PairWork(secret_table_size, policy)

    def pair() -> None:
        work.open()
        work.release()

    return pair


def physical_floor(secret_table_size: int, *, seconds: float = 2.0, rounds: int = 5) -> float:
    """Pairs per second of `make_pair`, single-threaded: the median of `rounds` timed batches."""
    pair = make_pair(secret_table_size)
    for _ in range(50):
        pair()
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds / rounds / 2:
        pair()
        n += 1
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            pair()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--table", type=int, default=DEFAULT_TABLE, help="secret table size in bytes")
    args = p.parse_args()
    rate = physical_floor(args.table, seconds=args.seconds)
    print(f"physical floor: {rate:.0f} pairs/s ({1000 / rate:.3f} ms per pair), single-threaded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
