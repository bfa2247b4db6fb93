"""The pure protocol library (`sevlaunch.sev`) against the floor of the raw crypto calls it makes.

    .venv/bin/python bench/bench_sev.py [--json] [--rounds N] [--batch-ms MS] [--profile NAME]

Four operations, each timed beside its floor in the same run, batches interleaved (A B B A ...):

* chain_verify: parse a real Milan chain (tests/vectors/chains/virtee-milan, PDH‖PEK‖OCA‖CEK‖ASK‖ARK)
  and `verify_chain` it against the pinned roots. Floor: the same 3 RSA-4096-PSS and 4 ECDSA-P-384
  verifications with `cryptography` (ARK/ASK keys prebuilt, as the pinned roots are cached; the OCA, CEK
  and PEK keys built from their numbers each time, as a fresh chain needs), DER-encoding the ECDSA
  signatures, plus the SHA-256 fingerprint of the CEK key field.
* session_create: `create_session(pdh, policy)` on that chain's PDH. Floor: P-384 key generation, ECDH,
  the GODH's public numbers, 5 HMAC-SHA256 (master, KEK, KIK, wrap_mac, policy_mac), one AES-128-CTR over
  TEK‖TIK, and the random bytes (TEK‖TIK, nonce, IV) from os.urandom.
* launch_digest: `launch_digest(image, mode="sev")` of a 4 MiB OVMF image: Debian's OVMF_CODE_4M.fd
  (3,653,632 bytes) with 0xFF flash padding prepended up to 4 MiB, so its footer table stays valid.
  Floor: hashlib.sha256 over the same bytes.
* secret_package: `package_secret(keys, measure, table)` of a one-entry secret table (a disk passphrase,
  64 bytes). Floor: os.urandom IV, AES-128-CTR, HMAC-SHA256 over the same message.
* snp_report_verify: `sevlaunch.snp.appraisal.verify_report(raw, vek)` of the real Genoa report
  (tests/vectors/snp/reports/trustee-genoa-e2e) with a warm chain: the VCEK's chain verified once and kept
  (as a verifier caches it per chip and TCB), so per report: parse, SIGNING_KEY, ECDSA P-384 verify,
  product from CPUID, REPORTED_TCB against the VCEK's SPLs, CHIP_ID against its hwID. Floor: SHA-384 of
  bytes 0x000-0x29F and one prehashed ECDSA P-384 verify with `cryptography` (R and S read and
  DER-encoded). Target <= 1.2.

ratio = our time per op / floor time per op (the median of per-round ratios); target <= 1.3 each unless
said otherwise.
Times are this process's CPU time (time.process_time), so waiting for a core on the shared 2-core
machine is not counted; `--wall` uses wall time instead.
`--json` prints {"<name>": {"ops_per_s", "floor_ops_per_s", "ratio"}}. SEVLAUNCH_BENCH_TINY=1 (or
`--tiny`) runs tiny iteration counts: for the smoke test, the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `sevlaunch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bench._timing import PairResult, bench_pair
from sevlaunch.sev.chain import CertificateChain, Generation, pinned_root, verify_chain
from sevlaunch.sev.digest import launch_digest
from sevlaunch.sev.ovmf import FOOTER_GUID, OVMF, SEV_ES_RESET_BLOCK_GUID, FooterEntry, FooterTable
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.secret import SecretEntry, SecretTable, package_secret
from sevlaunch.sev.session import TransportKeys, create_session

REPO = Path(__file__).resolve().parents[1]
MILAN = REPO / "tests" / "vectors" / "chains" / "virtee-milan"
DEBIAN_OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
IMAGE_SIZE = 4 << 20
NAMES = ("chain_verify", "session_create", "launch_digest", "secret_package", "snp_report_verify")
TARGET_RATIO = 1.3
TARGETS = {"snp_report_verify": 1.2}
GENOA_SNP = REPO / "tests" / "vectors" / "snp" / "reports" / "trustee-genoa-e2e"
POLICY = 0x1  # NODBG

_EC_COORD = 72
_SIG_SLOTS = (0x414, 0x61C)  # offsets of the two signature slots in a SEV certificate
_SIG_DATA = 0x200
_PUBKEY = (0x10, 0x414)


# -- inputs -----------------------------------------------------------------------------------------


def milan_chain_bytes() -> bytes:
    names = ("pdh", "pek", "oca", "cek", "ask", "ark")
    return b"".join((MILAN / f"{n}.cert").read_bytes() for n in names)


def four_mib_image() -> tuple[bytes, str]:
    """A 4 MiB OVMF-like image and a description of where it came from."""
    if DEBIAN_OVMF.is_file():
        raw = DEBIAN_OVMF.read_bytes()
        if len(raw) <= IMAGE_SIZE:
            image = b"\xff" * (IMAGE_SIZE - len(raw)) + raw
            source = f"{DEBIAN_OVMF} ({len(raw)} B) with {IMAGE_SIZE - len(raw)} B of 0xFF prepended"
        else:
            image = raw[len(raw) - IMAGE_SIZE :]
            source = f"{DEBIAN_OVMF} ({len(raw)} B) truncated from the front to 4 MiB"
    else:
        # No Debian OVMF: random bytes with a minimal footer (SEV-ES reset block), same size and shape.
        table = FooterTable((FooterEntry(SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", 0xFFFFF000)),)).to_bytes()
        body = os.urandom(IMAGE_SIZE - len(table) - 32)
        image = body + table + b"\x90" * 32
        source = "synthetic 4 MiB image with an OVMF footer (Debian's OVMF_CODE_4M.fd not installed)"
    parsed = OVMF.from_bytes(image)
    assert parsed.table is not None and parsed.size == IMAGE_SIZE, "the padded image lost its footer"
    assert FOOTER_GUID  # the footer GUID is what OVMF.from_bytes looked for
    return image, source


# -- the four pairs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[[], object]
    floor: Callable[[], object]
    note: str


def _xy(data: bytes) -> tuple[int, int]:
    """Two little-endian 72-byte integers: an EC key's (x, y) or an ECDSA signature's (r, s)."""
    first, second = data[:_EC_COORD], data[_EC_COORD : 2 * _EC_COORD]
    return int.from_bytes(first, "little"), int.from_bytes(second, "little")


def _ec_xy(cert_bytes: bytes) -> tuple[int, int]:
    return _xy(cert_bytes[_PUBKEY[0] + 4 : _PUBKEY[1]])


def chain_case() -> Case:
    raw = milan_chain_bytes()
    chain = CertificateChain.from_full_bytes(raw)
    assert verify_chain(chain).root_name == "milan"
    root = pinned_root(Generation.MILAN)
    ark_key, ask_key = root.ark.public_key(), root.ask.public_key()
    pdh_b, pek_b, oca_b, cek_b = (raw[i * 0x824 : (i + 1) * 0x824] for i in range(4))
    body = {n: b[:0x414] for n, b in (("pdh", pdh_b), ("pek", pek_b), ("oca", oca_b), ("cek", cek_b))}
    # RSA-PSS signatures (SHA-384, 4096-bit): ARK self, ARK->ASK, ASK->CEK; bytes reversed as stored.
    ark, ask = chain.ark, chain.ask
    sha384 = hashes.SHA384()
    pss = padding.PSS(mgf=padding.MGF1(sha384), salt_length=sha384.digest_size)
    rsa_checks = (
        (ark_key, ark.signature[::-1], ark.signed_bytes()),
        (ark_key, ask.signature[::-1], ask.signed_bytes()),
        (ask_key, cek_b[_SIG_SLOTS[0] + 8 : _SIG_SLOTS[0] + 8 + 512][::-1], body["cek"]),
    )
    # The ECDSA signatures: OCA self (slot 1), PEK by OCA (slot 1) and by CEK (slot 2), PDH by PEK (slot 1).
    oca_xy, cek_xy, pek_xy = _ec_xy(oca_b), _ec_xy(cek_b), _ec_xy(pek_b)
    curve = ec.SECP384R1()
    sig_oca = oca_b[_SIG_SLOTS[0] + 8 : _SIG_SLOTS[0] + 8 + _SIG_DATA]
    sig_pek_oca = pek_b[_SIG_SLOTS[0] + 8 : _SIG_SLOTS[0] + 8 + _SIG_DATA]
    sig_pek_cek = pek_b[_SIG_SLOTS[1] + 8 : _SIG_SLOTS[1] + 8 + _SIG_DATA]
    sig_pdh = pdh_b[_SIG_SLOTS[0] + 8 : _SIG_SLOTS[0] + 8 + _SIG_DATA]

    rs_oca, rs_pek_oca, rs_pek_cek, rs_pdh = _xy(sig_oca), _xy(sig_pek_oca), _xy(sig_pek_cek), _xy(sig_pdh)
    ecdsa = ec.ECDSA(hashes.SHA256())
    cek_key_field = cek_b[_PUBKEY[0] : _PUBKEY[1]]

    def floor() -> None:
        for key, sig, data in rsa_checks:
            key.verify(sig, data, pss, sha384)
        oca_key = ec.EllipticCurvePublicNumbers(*oca_xy, curve).public_key()
        cek_key = ec.EllipticCurvePublicNumbers(*cek_xy, curve).public_key()
        pek_key = ec.EllipticCurvePublicNumbers(*pek_xy, curve).public_key()
        oca_key.verify(encode_dss_signature(*rs_oca), body["oca"], ecdsa)
        oca_key.verify(encode_dss_signature(*rs_pek_oca), body["pek"], ecdsa)
        cek_key.verify(encode_dss_signature(*rs_pek_cek), body["pek"], ecdsa)
        pek_key.verify(encode_dss_signature(*rs_pdh), body["pdh"], ecdsa)
        hashlib.sha256(cek_key_field).hexdigest()

    floor()  # the floor must verify the very same signatures

    def ours() -> None:
        verify_chain(CertificateChain.from_full_bytes(raw))

    return Case(
        "chain_verify",
        ours,
        floor,
        "parse + verify_chain of virtee-milan vs 3 RSA-4096-PSS + 4 ECDSA-P-384 verifies, 3 EC key builds, "
        "1 SHA-256",
    )


def session_case() -> Case:
    chain = CertificateChain.from_full_bytes(milan_chain_bytes())
    pdh = chain.pdh
    pdh_key = pdh.public_key()  # cached on the certificate, as the owner keeps the verified chain
    policy = GuestPolicy(POLICY)
    curve = ec.SECP384R1()
    sha256 = hashes.SHA256()
    policy_bytes = struct.pack("<I", POLICY)

    def mac(key: bytes, data: bytes) -> bytes:
        h = hmac.HMAC(key, sha256)
        h.update(data)
        return h.finalize()

    def floor() -> None:
        tk = os.urandom(32)
        nonce = os.urandom(16)
        iv = os.urandom(16)
        godh = ec.generate_private_key(curve)
        z = godh.exchange(ec.ECDH(), pdh_key)
        master = mac(z, b"\x01\x00\x00\x00sev-master-secret\x00" + nonce + b"\x80\x00\x00\x00")
        kek = mac(master, b"\x01\x00\x00\x00sev-kek\x00\x80\x00\x00\x00")[:16]
        kik = mac(master, b"\x01\x00\x00\x00sev-kik\x00\x80\x00\x00\x00")[:16]
        enc = Cipher(algorithms.AES(kek), modes.CTR(iv)).encryptor()
        wrapped = enc.update(tk) + enc.finalize()
        mac(kik, wrapped)
        mac(tk[16:], policy_bytes)
        godh.public_key().public_numbers()

    def ours() -> None:
        create_session(pdh, policy)

    return Case(
        "session_create",
        ours,
        floor,
        "create_session on the Milan PDH vs P-384 keygen + ECDH + public numbers + 5 HMAC + AES-CTR "
        "+ urandom",
    )


def digest_case(image: bytes) -> Case:
    def ours() -> None:
        launch_digest(image, mode="sev")

    def floor() -> None:
        hashlib.sha256(image).digest()

    assert launch_digest(image, mode="sev") == hashlib.sha256(image).digest()
    return Case("launch_digest", ours, floor, "launch_digest(mode=sev) of 4 MiB vs hashlib.sha256")


def secret_case() -> Case:
    keys = TransportKeys.generate()
    measure = os.urandom(32)
    plaintext = SecretTable.of([SecretEntry.disk_passphrase(b"correct horse battery staple")]).to_bytes()
    sha256 = hashes.SHA256()
    prefix = b"\x01" + struct.pack("<I", 0)
    lengths = struct.pack("<II", len(plaintext), len(plaintext))

    def floor() -> None:
        iv = os.urandom(16)
        enc = Cipher(algorithms.AES(keys.tek), modes.CTR(iv)).encryptor()
        payload = enc.update(plaintext) + enc.finalize()
        h = hmac.HMAC(keys.tik, sha256)
        h.update(prefix + iv + lengths + payload)
        h.update(measure)
        h.finalize()

    def ours() -> None:
        package_secret(keys, measure, plaintext)

    return Case(
        "secret_package",
        ours,
        floor,
        f"package_secret of a {len(plaintext)} B secret table vs urandom + AES-128-CTR + HMAC-SHA256",
    )


def snp_report_case() -> Case:
    from datetime import UTC, datetime

    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from sevlaunch.snp.appraisal import verify_report
    from sevlaunch.snp.certs import load_certificate, verify_vek_chain
    from sevlaunch.snp.tcb import Product

    raw = (GENOA_SNP / "report.bin").read_bytes()
    vek = verify_vek_chain(
        load_certificate((GENOA_SNP / "vcek.der").read_bytes()),
        Product.GENOA,
        at=datetime(2026, 1, 15, tzinfo=UTC),
    )
    key = vek.public_key
    prehashed = ec.ECDSA(Prehashed(hashes.SHA384()))

    def floor() -> None:
        r = int.from_bytes(raw[0x2A0:0x2E8], "little")
        s = int.from_bytes(raw[0x2E8:0x330], "little")
        key.verify(encode_dss_signature(r, s), hashlib.sha384(raw[:0x2A0]).digest(), prehashed)

    floor()  # the floor must verify the very same signature

    def ours() -> None:
        verify_report(raw, vek)

    return Case(
        "snp_report_verify",
        ours,
        floor,
        "verify_report of the Genoa report, warm chain, vs SHA-384 + 1 prehashed ECDSA-P-384 verify",
    )


def all_cases() -> list[Case]:
    image, _ = four_mib_image()
    return [chain_case(), session_case(), digest_case(image), secret_case(), snp_report_case()]


# -- running ----------------------------------------------------------------------------------------


def tiny() -> bool:
    return os.environ.get("SEVLAUNCH_BENCH_TINY", "") not in ("", "0")


def run(
    rounds: int, batch_s: float, names: tuple[str, ...] = NAMES, *, wall: bool = False
) -> list[PairResult]:
    clock = time.perf_counter if wall else time.process_time
    return [
        bench_pair(case.name, case.ours, case.floor, rounds=rounds, batch_s=batch_s, clock=clock)
        for case in all_cases()
        if case.name in names
    ]


def profile(name: str, seconds: float = 3.0) -> str:
    case = next(c for c in all_cases() if c.name == name)
    from bench._timing import calibrate

    n = calibrate(case.ours, seconds)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        case.ours()
    profiler.disable()
    out = __import__("io").StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return f"{n} calls of {name}\n" + out.getvalue()


def table(results: list[PairResult]) -> str:
    lines = [
        f"{'operation':<17} {'ours ops/s':>12} {'floor ops/s':>12} {'ratio':>7}  target",
    ]
    for r in results:
        target = TARGETS.get(r.name, TARGET_RATIO)
        verdict = f"<= {target} " + ("met" if r.ratio <= target else "NOT met")
        lines.append(
            f"{r.name:<17} {r.ops_per_s:>12.1f} {r.floor_ops_per_s:>12.1f} {r.ratio:>7.3f}  {verdict}"
            f"  ({r.rounds} rounds x {r.batch})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per operation (21)")
    parser.add_argument("--batch-ms", type=float, default=None, help="target time of one batch (100 ms)")
    parser.add_argument("--only", action="append", choices=NAMES, help="run only these operations")
    parser.add_argument("--profile", choices=NAMES, help="cProfile our side of one operation and exit")
    parser.add_argument("--wall", action="store_true", help="wall time instead of process CPU time")
    parser.add_argument("--tiny", action="store_true", help="tiny counts (smoke test; meaningless numbers)")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.profile))
        return 0
    small = args.tiny or tiny()
    rounds = args.rounds or (2 if small else 21)
    batch_s = (args.batch_ms or (1.0 if small else 100.0)) / 1000
    results = run(rounds, batch_s, tuple(args.only or NAMES), wall=args.wall)
    if args.json:
        print(json.dumps({r.name: r.as_json() for r in results}, indent=2))
    else:
        _, source = four_mib_image()
        print(f"image: {source}")
        for case in all_cases():
            print(f"  {case.name}: {case.note}")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
