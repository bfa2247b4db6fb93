"""SEV-SNP: attestations per second through the owner's guest port, and the end-to-end SNP launch, each
against a floor measured in the same run. `python -m bench.snp_bench [--quick] [--json]` runs it alone;
`python -m bench` includes it.

The world is the SNP demo's (`sevlaunch.demo.snp`): owner (with its guest port), platform and launcher as
processes on one emulated Genoa chip, Debian's 2 MiB OVMF, with the guest port's rate limits lifted (they
would otherwise be what is measured: every call comes from 127.0.0.1).

1. Attestations. Each one is a real authorised guest on the emulated chip: AuthorizeSnpLaunch (the
   `client` identity), SNP_LAUNCH_START/UPDATE/FINISH of the OVMF with the owner's ID block and HOST_DATA
   in this process, GetChallenge on the guest port and the firmware's report (untimed: the guest's side).
   Timed: Attest over server-authenticated TLS from `clients` concurrent guests, each on a fresh channel as
   a booting guest would be, and the opening of the sealed secret. The floor is the raw cryptography of
   one attestation, single-threaded: the report's ECDSA P-384 verification (SHA-384 of the signed part
   included), the REPORT_DATA SHA-512, and one HPKE seal (DHKEM P-384) of the secret table.
2. Launch. SNP launches through the three services (the client's Launch call to RUNNING: authorisation,
   definition, the firmware's launch, the guest agent's attestation, the launcher's poll), against the same
   work in this process with no gRPC and no processes: the firmware launch of the same image with an ID
   block signed here, plus the attestation floor above.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.demo.snp import SNP_FIRMWARE, SNP_POLICY, SNP_VCPU_TYPE, SnpDemoEnvironment
from sevlaunch.firmware.emulator import EmulatedFirmware
from sevlaunch.guest.owner_client import GrpcOwnerClient
from sevlaunch.sev.secret import SecretEntry, SecretTable
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.challenge import report_data
from sevlaunch.snp.gctx import LaunchPlan
from sevlaunch.snp.idblock import IdBlock, sign_id_block
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.launch_digest import launch_plan
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.secret_wrap import GuestKeyPair, seal

#: Lifts the guest port's limits for the run (127.0.0.1 is one peer to the rate limiter).
OWNER_ARGS = (
    "--guest-peer-rate", "100000", "--guest-peer-burst", "100000",
    "--guest-global-rate", "100000", "--guest-global-burst", "100000",
)  # fmt: skip


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


@dataclass
class Prepared:
    """One guest ready to Attest: its init data, challenge, key pair and report (the guest's side)."""

    init: InitData
    challenge: bytes
    keys: GuestKeyPair
    report: bytes
    handle: int


@dataclass
class AttestResult:
    n: int
    clients: int
    seconds: float
    per_s: float
    floor_per_s: float
    ratio: float
    latencies: list[float] = field(default_factory=list)


@dataclass
class SnpLaunchResult:
    n: int
    grpc: list[float]
    floor: list[float]
    phases: dict[str, list[float]]

    @property
    def ratio(self) -> float:
        return pct(self.grpc, 0.5) / pct(self.floor, 0.5)

    @property
    def overhead_ms(self) -> float:
        return (pct(self.grpc, 0.5) - pct(self.floor, 0.5)) * 1000


class SnpBench:
    def __init__(self, env: SnpDemoEnvironment) -> None:
        self.env = env
        self.fw = EmulatedFirmware(env.chip_dir, create=False)
        image = env.firmware.read_bytes()
        self.plan: LaunchPlan = launch_plan(image, vcpus=1, vcpu_sig=vcpu_signature(SNP_VCPU_TYPE))
        self.table = SecretTable.of([SecretEntry.disk_passphrase(os.urandom(24).hex().encode())]).to_bytes()

    # -- the guest's side (untimed) --------------------------------------------------------------------

    def _launch(self, policy: int, id_block: bytes, id_auth: bytes, host_data: bytes, author: bool) -> int:
        fw = self.fw
        handle = fw.snp_launch_start(policy)
        for u in self.plan.updates:
            fw.snp_launch_update(handle, u.gpa, u.page_type, u.data, length=u.length)
        fw.snp_launch_finish(
            handle, id_block=id_block, id_auth=id_auth, host_data=host_data, author_key_en=author
        )
        return handle

    def prepare(self) -> Prepared:
        auth = self.env.fresh_authorization()
        handle = self._launch(auth.policy, auth.id_block, auth.id_auth, auth.host_data, auth.author_key)
        init = InitData.parse(auth.init_data)
        keys = GuestKeyPair.generate()
        with GrpcOwnerClient(init) as owner:
            challenge = owner.get_challenge(init.authorization_id)
        report = self.fw.snp_guest_report(handle, report_data(challenge, keys.public_bytes))
        return Prepared(init, challenge, keys, report, handle)

    # -- timed -----------------------------------------------------------------------------------------

    @staticmethod
    def _attest(p: Prepared) -> float:
        t = time.perf_counter()
        with GrpcOwnerClient(p.init) as owner:
            wrapped = owner.attest(
                authorization_id=p.init.authorization_id,
                challenge=p.challenge,
                report=p.report,
                cert_table=None,
                guest_public_key=p.keys.public_bytes,
            )
        p.keys.open(wrapped, authorization_id=p.init.authorization_id, challenge=p.challenge)
        return time.perf_counter() - t

    def attestations(self, n: int, clients: int, batch: int) -> AttestResult:
        latencies: list[float] = []
        timed = 0.0
        done = 0
        while done < n:
            size = min(batch, n - done)
            prepared = [self.prepare() for _ in range(size)]
            t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies += list(pool.map(self._attest, prepared))
            timed += time.perf_counter() - t
            for p in prepared:
                self.fw.snp_decommission(p.handle)
            done += size
        floor = self.crypto_floor(max(20, n))
        per_s = n / timed
        return AttestResult(n, clients, timed, per_s, floor, per_s / floor, latencies)

    def crypto_floor(self, rounds: int) -> float:
        """Raw attestations/s of one thread: report verify (P-384 ECDSA, SHA-384), SHA-512, HPKE seal."""
        vcek = ec.generate_private_key(ec.SECP384R1())
        keys = GuestKeyPair.generate()
        challenge = os.urandom(32)
        report = AttestationReport(
            version=3, policy=SNP_POLICY, report_data=report_data(challenge, keys.public_bytes)
        ).signed(vcek)
        raw = report.to_bytes()
        public = vcek.public_key()
        t = time.perf_counter()
        for _ in range(rounds):
            parsed = AttestationReport.from_bytes(raw)
            parsed.verify_signature(public)
            hashlib.sha512(challenge + keys.public_bytes).digest()
            seal(self.table, keys.public_bytes, authorization_id="snp-bench", challenge=challenge)
        return rounds / (time.perf_counter() - t)

    # -- launches --------------------------------------------------------------------------------------

    def launch_grpc(self, name: str) -> tuple[float, dict[str, float]]:
        env = self.env
        t = time.perf_counter()
        r = env.launch_snp(name, env.firmware)
        total = time.perf_counter() - t
        if r.outcome != "running":
            raise RuntimeError(f"SNP launch failed: {r.phase} {r.reason} {r.detail}")
        env.destroy(r.launch_id)
        return total, {k: v / 1000 for k, v in r.durations_ms.items()}

    def launch_floor(self, id_key: ec.EllipticCurvePrivateKey, author: ec.EllipticCurvePrivateKey) -> float:
        """The same launch's own work in this process: the plan, the firmware's launch with an ID block
        signed here, the guest's report, and one attestation's cryptography."""
        image = self.env.firmware.read_bytes()
        t = time.perf_counter()
        plan = launch_plan(image, vcpus=1, vcpu_sig=vcpu_signature(SNP_VCPU_TYPE))
        block = IdBlock(launch_digest=bytes(plan.digest()), policy=SNP_POLICY)
        auth = sign_id_block(block, id_key, author)
        host_data = hashlib.sha256(b"bench init data").digest()
        self.plan = plan
        handle = self._launch(SNP_POLICY, block.to_bytes(), auth.to_bytes(), host_data, True)
        keys = GuestKeyPair.generate()
        challenge = os.urandom(32)
        self.fw.snp_guest_report(handle, report_data(challenge, keys.public_bytes))
        elapsed = time.perf_counter() - t + 1 / self.crypto_floor(5)
        self.fw.snp_decommission(handle)
        return elapsed

    def launches(self, n: int) -> SnpLaunchResult:
        grpc_times: list[float] = []
        phases: dict[str, list[float]] = {}
        floors: list[float] = []
        id_key, author = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
        for i in range(n):
            total, ph = self.launch_grpc(f"bench-snp-{i}")
            grpc_times.append(total)
            for k, v in ph.items():
                phases.setdefault(k, []).append(v)
            floors.append(self.launch_floor(id_key, author))
        return SnpLaunchResult(n, grpc_times, floors, phases)


def snp_counts(quick: bool, tiny: bool) -> dict[str, int]:
    if tiny:
        return dict(attests=4, clients=2, batch=4, launches=1)
    if quick:
        return dict(attests=24, clients=8, batch=12, launches=5)
    return dict(attests=96, clients=8, batch=12, launches=15)


def run_snp(quick: bool, tiny: bool, log: Any, workdir: Path | None = None) -> dict[str, Any]:
    """Both SNP benchmarks in a world of their own; the `snp` section of `python -m bench`'s results."""
    c = snp_counts(quick, tiny)
    env = SnpDemoEnvironment(
        workdir=workdir, boot_seconds=0.0, attestation_poll=0.02, snp_guest_slots=32, owner_args=OWNER_ARGS
    )
    with env:
        t = time.perf_counter()
        env.prepare()
        env.start()
        env.configure_owner()
        log(f"snp set-up in {time.perf_counter() - t:.1f} s")
        bench = SnpBench(env)
        t = time.perf_counter()
        a = bench.attestations(c["attests"], c["clients"], c["batch"])
        log(f"snp attestations in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        lo = bench.launches(c["launches"])
        log(f"snp launches in {time.perf_counter() - t:.1f} s")
    return {
        "counts": c,
        "attest": {
            "n": a.n,
            "clients": a.clients,
            "per_s": a.per_s,
            "floor_per_s": a.floor_per_s,
            "ratio": a.ratio,
            "p50_ms": pct(a.latencies, 0.5) * 1000,
            "p99_ms": pct(a.latencies, 0.99) * 1000,
        },
        "launch": {
            "n": lo.n,
            "grpc_p50_ms": pct(lo.grpc, 0.5) * 1000,
            "grpc_p99_ms": pct(lo.grpc, 0.99) * 1000,
            "floor_p50_ms": pct(lo.floor, 0.5) * 1000,
            "ratio": lo.ratio,
            "overhead_ms": lo.overhead_ms,
            "phases_p50_ms": {k: pct(v, 0.5) * 1000 for k, v in lo.phases.items()},
        },
    }


def snp_summary(r: dict[str, Any]) -> dict[str, float]:
    return {
        "snp_attest_per_s": round(r["attest"]["per_s"], 1),
        "snp_attest_ratio": round(r["attest"]["ratio"], 3),
        "snp_launch_p50_ms": round(r["launch"]["grpc_p50_ms"], 1),
        "snp_launch_overhead_ratio": round(r["launch"]["ratio"], 3),
    }


def snp_report_lines(r: dict[str, Any]) -> list[str]:
    a, la = r["attest"], r["launch"]
    phases = ", ".join(f"{k} {v:.1f}" for k, v in la["phases_p50_ms"].items())
    return [
        "## SEV-SNP",
        "",
        f"- Attestations through the owner's guest port: **{a['per_s']:.1f}/s** with {a['clients']} "
        f"concurrent guests ({a['n']} attestations; p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms), "
        f"floor {a['floor_per_s']:.1f}/s (one thread: report ECDSA P-384 verify, SHA-512, HPKE seal): "
        f"ratio {a['ratio']:.2f}.",
        f"- End-to-end SNP launch (Launch call to RUNNING, {la['n']} launches): "
        f"p50 {la['grpc_p50_ms']:.1f} ms, p99 {la['grpc_p99_ms']:.1f} ms; "
        f"in-process floor p50 {la['floor_p50_ms']:.1f} ms; ratio "
        f"{la['ratio']:.2f}, overhead {la['overhead_ms']:.1f} ms. Phases p50 (ms): {phases}.",
        "",
    ]


def snp_section(report: str, r: dict[str, Any]) -> str:
    """`python -m bench`'s report with the SNP section before its JSON summary."""
    marker = "## JSON summary"
    lines = "\n".join(snp_report_lines(r)) + "\n"
    if marker not in report:
        return report + "\n" + lines
    head, tail = report.split(marker, 1)
    return head + lines + marker + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snp_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tiny = os.environ.get("SEVLAUNCH_BENCH_TINY") == "1"
    if not SNP_FIRMWARE.is_file():
        print(f"{SNP_FIRMWARE} is missing (Debian's ovmf)", file=sys.stderr)
        return 2
    r = run_snp(args.quick, tiny, lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(snp_summary(r)))
    else:
        print("\n".join(snp_report_lines(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
