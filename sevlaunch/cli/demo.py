"""`sevlaunch demo`: a full attested launch on the embedded defaults, then a tampered launch refused.

    sevlaunch demo [--firmware /usr/share/OVMF/OVMF_CODE_4M.fd] [--json] [--keep]
    sevlaunch demo --snp [--firmware /usr/share/OVMF/OVMF_CODE.fd] [--json] [--keep]   (`demo_snp`)

In a temporary folder: dev certificates, an emulated SEV chip with its own AMD root and a local KDS, a
publisher key and a signed reference-value manifest for the OVMF image, the owner's SQLite store. Then
the three services start as separate processes on localhost with mTLS; the tenant's admin imports the
manifest and stores a workload with a LUKS passphrase; a client asks the launcher for an orchestrated
attested launch (each phase printed as it is reached, with its duration); then for a launch of a copy of
the OVMF with one byte flipped, which the owner refuses and the launcher destroys. The owner's audit log
is shown and its hash chain checked. Everything is stopped and removed at the end, on Ctrl-C too, unless
`--keep` asks to leave the services running (the demo then prints how to call them).

`--json` prints one JSON object at the end (progress goes to stderr):
`{"launches": [{"name", "outcome", "phase", "reason", "measurement", "matched_digest", "durations_ms",
...}], "audit_ok": bool, ...}`. Exit status 0 when the good launch ran, the tampered one was refused
on its measurement, and the audit chain verified; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc

from sevlaunch.cli import CommandError
from sevlaunch.demo.env import DEFAULT_FIRMWARE, WORKLOAD_ID, DemoEnvironment, DemoError, LaunchOutcome
from sevlaunch.demo.services import ServiceStartError
from sevlaunch.rpc import error_info
from sevlaunch.rpc.v1 import launcher_pb2

GOOD_GUEST = "demo-guest"
TAMPERED_GUEST = "demo-tampered"



def kept_services_json(env: DemoEnvironment, workload: str) -> dict[str, Any]:
    """What `--keep --json` adds: the running services and where their material is."""
    return {
        "services": {
            s.name: {
                "address": s.address,
                "pid": s.pid,
                "metrics_url": s.metrics_url,
                "log": str(s.log_path),
            }
            for s in env.services.values()
        },
        "tls_dir": str(env.tls_dir),
        "workdir": str(env.workdir),
        "workload": workload,
    }

def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "demo",
        help="attested launch on the embedded defaults, then a tampered launch refused",
        description="Runs the three services on localhost (emulated SEV firmware, libvirt test driver, "
        "SQLite), launches a guest with attestation, then one with a tampered firmware image.",
    )
    p.add_argument(
        "--firmware",
        default=None,
        help=f"OVMF image the reference values are made for (default {DEFAULT_FIRMWARE}; with --snp"
        " /usr/share/OVMF/OVMF_CODE.fd, whose SEV metadata an SNP launch needs)",
    )
    p.add_argument(
        "--snp",
        action="store_true",
        help="the SEV-SNP demo: authorised launch, attestation from inside the guest, secret released to"
        " it; a tampered image, a TCB below the minimum and replayed reports refused",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object at the end (progress on stderr)"
    )
    p.add_argument(
        "--keep", action="store_true", help="leave the services running and print how to call them"
    )
    p.set_defaults(func=run_demo)


class _Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind through the clean-up like Ctrl-C does."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    # SIGINT already raises KeyboardInterrupt; SIGTERM and SIGHUP would kill the demo on the spot and
    # leave the services (in their own process groups) running, so they unwind the same way.
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C stops the demo even where SIGINT was inherited as ignored (a background job of a script).
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    # Clean-up must not itself be cut short by a second Ctrl-C: it is bounded (each service gets a
    # SIGTERM, then a SIGKILL after 10 s), and leaving orphaned services behind is worse than waiting.
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, name: str, seconds: float) -> None:
        self.line(f"  {_ms(seconds * 1000):>9}  {name}")

    def event(self, guest: str, event: launcher_pb2.LaunchEvent) -> None:
        took = event.duration.ToTimedelta().total_seconds() * 1000
        if event.phase == launcher_pb2.PHASE_FAILED:
            failed = launcher_pb2.Phase.Name(event.failed_phase).removeprefix("PHASE_")
            self.line(f"  {_ms(took):>9}  FAILED at {failed}: {event.reason}")
            if event.detail:
                self.line(f"  {'':>9}    {event.detail}")
            return
        phase = launcher_pb2.Phase.Name(event.phase).removeprefix("PHASE_")
        self.line(f"  {_ms(took):>9}  {phase:<16} {_PHASE_NOTES.get(phase, '')}")


_PHASE_NOTES = {
    "ACCEPTED": "launch recorded",
    "CHAIN_FETCHED": "platform: PDH, PEK, OCA, CEK (ASK-signed, from the KDS), ASK, ARK",
    "SESSION_OPENED": "owner: chain verified to a trusted AMD root; GODH + TEK/TIK session blob",
    "DEFINED": "libvirt: domain with <launchSecurity type='sev'>",
    "STARTED_PAUSED": "firmware: LAUNCH_START, LAUNCH_UPDATE_DATA (OVMF)",
    "MEASURED": "firmware: LAUNCH_MEASURE",
    "SECRET_RELEASED": "owner: measurement matched a signed reference digest; secret packaged",
    "SECRET_INJECTED": "firmware: LAUNCH_SECRET",
    "RUNNING": "firmware: LAUNCH_FINISH; guest resumed",
}


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _short(hex_value: str | None, n: int = 16) -> str:
    return "-" if not hex_value else f"{hex_value[:n]}…"


def _describe(p: _Printer, result: LaunchOutcome) -> None:
    if result.outcome == "running":
        p.line(
            f"  => RUNNING ({result.domain_name}): measurement {_short(result.measurement)}, owner matched "
            f"launch digest {_short(result.matched_digest)} of manifest {_short(result.manifest_id)}"
        )
    else:
        gone = "the domain was destroyed" if result.guests_after == result.guests_before else "DOMAIN LEFT"
        p.line(
            f"  => REFUSED at {result.phase} ({result.reason}); launcher record {result.launcher_state}, "
            f"{gone} (chip guests {result.guests_before} -> {result.guests_after})"
        )


def _print_audit(p: _Printer, env: DemoEnvironment) -> bool:
    audit = env.audit()
    p.line(f"audit log of the owner ({len(audit.records)} records, hash-chained)")
    for rec in audit.records:
        when = datetime.fromtimestamp(rec.time_unix, UTC).strftime("%H:%M:%S.%f")[:-3]
        extra = " ".join(
            f"{k}={v}"
            for k, v in (
                ("reason", rec.reason),
                ("digest", _short(rec.digest) if rec.digest else ""),
                ("session", rec.session_id[:8]),
            )
            if v
        )
        p.line(f"  #{rec.seq:<3} {when} {rec.actor:<12} {rec.action:<24} {rec.outcome:<8} {extra}".rstrip())
    if audit.ok:
        p.line(
            f"  hash chain verified over gRPC: {len(audit.records)} records, "
            f"head {_short(audit.records[-1].hash)}"
        )
        p.line(
            f"  {env.owner_db.name} checked offline with the owner's KEK: {audit.db_records} records, MACs ok"
        )
    else:
        p.line(f"  audit log does NOT verify: {audit.problem}")
    return audit.ok


def _keep_instructions(p: _Printer, env: DemoEnvironment) -> None:
    s = env.services
    tls = shlex.quote(str(env.tls_dir))
    p.line("services left running (--keep):")
    for svc in s.values():
        p.line(
            f"  {svc.name:<9} {svc.address:<16} pid {svc.pid:<8} "
            f"metrics {svc.metrics_url}  log {svc.log_path}"
        )
    p.line(f"  tls dir   {env.tls_dir} (identities client, owner-admin, platform-admin, ...)")
    p.line(f"  workload  {WORKLOAD_ID}")
    p.line("try:")
    p.line(
        f"  sevlaunch launch --launcher {s['launcher'].address} --owner {s['owner'].address} "
        f"--workload {WORKLOAD_ID} --firmware {shlex.quote(str(env.firmware))} --tls-dir {tls}"
    )
    p.line(f"  sevlaunch owner audit show --endpoint {s['owner'].address} --tls-dir {tls}")
    p.line(f"  sevlaunch owner sessions --endpoint {s['owner'].address} --tls-dir {tls}")
    p.line(
        f"  sevlaunch owner audit verify --db {shlex.quote(str(env.owner_db))} "
        f"--kek-file {shlex.quote(str(env.owner_kek))}"
    )
    p.line(f"  curl -s {s['launcher'].metrics_url} | grep sevlaunch_launcher_launches")
    pids = " ".join(str(svc.pid) for svc in s.values())
    p.line("stop and clean up:")
    p.line(f"  kill {pids}; rm -rf {shlex.quote(str(env.workdir))}")


def _checks(results: list[LaunchOutcome], audit_ok: bool) -> bool:
    by_name = {r.name: r for r in results}
    good, bad = by_name.get(GOOD_GUEST), by_name.get(TAMPERED_GUEST)
    return (
        good is not None
        and good.outcome == "running"
        and bad is not None
        and bad.outcome == "refused"
        and bad.reason == "measurement_mismatch"
        and bad.guests_after == bad.guests_before
        and audit_ok
    )


def run_demo(args: argparse.Namespace) -> int:
    if args.snp:
        from sevlaunch.cli.demo_snp import run_snp_demo

        return run_snp_demo(args)
    started = time.monotonic()
    p = _Printer(sys.stderr if args.json else sys.stdout)
    firmware = Path(args.firmware or DEFAULT_FIRMWARE)
    if not firmware.is_file():
        raise CommandError(f"no firmware image at {firmware} (install Debian's `ovmf`, or pass --firmware)")
    env = DemoEnvironment(firmware=firmware, on_step=p.step)
    results: list[LaunchOutcome] = []
    audit_ok = False

    def body() -> None:
        nonlocal audit_ok
        p.line(f"sevlaunch demo: attested SEV launches on emulated hardware, in {env.workdir}")
        p.line("set-up")
        env.prepare()
        env.start()
        env.configure_owner()
        runs: list[tuple[str, Path, str]] = [
            (GOOD_GUEST, firmware, f"{firmware.name}, the image the signed reference values list"),
            (TAMPERED_GUEST, env.tampered_firmware, f"{env.tampered_firmware.name}, one byte flipped"),
        ]
        for name, image, why in runs:
            p.line(f"launch {name!r}: {why}")
            result = env.launch(name, image, on_event=p.event)
            _describe(p, result)
            results.append(result)
        audit_ok = _print_audit(p, env)
        if args.keep:
            env.keep = True
            _keep_instructions(p, env)

    ending = run_body(p, env, results, body)
    return finish(
        p,
        args,
        env,
        ending,
        prog="sevlaunch demo",
        started=started,
        checks_ok=_checks(results, audit_ok),
        audit_ok=audit_ok,
        workload_id=WORKLOAD_ID,
        doc={"launches": [r.to_json() for r in results]},
    )


@dataclass
class Ending:
    """How a demo's body ended: normally (both None), interrupted (SIGINT or SIGTERM), or with an error."""

    interrupted: str | None = None
    error: str | None = None


def run_body(
    p: _Printer, env: DemoEnvironment, launched: Sequence[LaunchOutcome], body: Callable[[], None]
) -> Ending:
    """Runs a demo's `body` with SIGTERM taken as an interrupt. However it ends, the guests in `launched`
    (read at the end, so the body appends to it) are destroyed and the services stopped and removed,
    with signals deferred meanwhile."""
    ending = Ending()
    with _terminate_as_interrupt():
        try:
            body()
        except KeyboardInterrupt:
            ending.interrupted = "SIGINT"
        except _Interrupted as exc:
            ending.interrupted = str(exc)
        except (DemoError, ServiceStartError) as exc:
            ending.error = str(exc)
        except grpc.RpcError as exc:
            info = error_info(exc)
            ending.error = f"gRPC call failed: {info.code.name} {info.reason} {info.message}".strip()
        finally:
            with _signals_deferred():
                _cleanup(p, env, launched)
    return ending


def finish(
    p: _Printer,
    args: argparse.Namespace,
    env: DemoEnvironment,
    ending: Ending,
    *,
    prog: str,
    started: float,
    checks_ok: bool,
    audit_ok: bool,
    workload_id: str,
    doc: dict[str, Any],
) -> int:
    """The demo's last lines and exit status: 130 when interrupted, 0 when every check held, else 1;
    with --json, `doc` (what the demo launched) and the fields every demo reports."""
    total = time.monotonic() - started
    if ending.interrupted:
        p.line(f"interrupted ({ending.interrupted}); everything stopped and removed")
        return 130
    if ending.error:
        p.line(f"{prog}: error: {ending.error}")
    ok = ending.error is None and checks_ok
    p.line(f"demo {'complete' if ok else 'FAILED'} in {total:.1f} s")
    if args.json:
        doc = {
            **doc,
            "audit_ok": audit_ok,
            "ok": ok,
            "wall_seconds": round(total, 3),
            "reference_digest": env.reference_digest.hex(),
            "manifest_id": env.manifest_id,
        }
        if ending.error:
            doc["error"] = ending.error
        if args.keep and env.keep:
            doc |= kept_services_json(env, workload_id)
        json.dump(doc, sys.stdout, indent=2)
        print()
    return 0 if ok else 1


def _cleanup(p: _Printer, env: DemoEnvironment, results: Sequence[LaunchOutcome]) -> None:
    if env.keep:
        env.close()
        return
    steps: list[str] = []
    for result in results:
        if result.outcome == "running" and result.launch_id:
            try:
                env.destroy(result.launch_id)
                steps.append(f"destroyed {result.name}")
            except grpc.RpcError:
                # Best effort: stopping the launcher and removing the chip ends the guest anyway.
                steps.append(f"could not destroy {result.name} (stopped with its launcher)")
    stopped = [name for name in ("launcher", "platform", "owner") if name in env.services]
    env.close()
    if stopped:
        steps.append("stopped " + ", ".join(stopped))
    steps.append(f"removed {env.workdir}")
    p.line("clean-up: " + "; ".join(steps))
