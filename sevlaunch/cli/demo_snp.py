"""`sevlaunch demo --snp`: the attested SEV-SNP launch end to end on emulated hardware.

    sevlaunch demo --snp [--firmware /usr/share/OVMF/OVMF_CODE.fd] [--json] [--keep]

Set-up as for SEV (`sevlaunch.cli.demo`), with an emulated Genoa chip whose emulated AMD SNP root the owner
trusts because the demo names it (`--snp-trust-root`), the owner's guest port, and SNP reference values
for Debian's 2 MiB OVMF. Then:

1. `demo-snp-guest`: authorised by the owner (ID block, ID auth, HOST_DATA), launched, and once it has
   booted its agent attests to the owner's guest port and receives the workload's secret; the launcher
   sees the owner's verdict and reports RUNNING.
2. `demo-snp-tampered`: a copy of the image with one byte flipped. The owner authorises the launch digest
   of the genuine image; the firmware computes another one and refuses SNP_LAUNCH_FINISH; the launcher
   destroys the domain (`snp_launch_refused`).
3. `demo-snp-tcb`: while this guest boots, the tenant raises the workload's minimum reported TCB above the
   chip's (an AMD security bulletin, say). The guest's signed report shows the chip's TCB: refused at
   attestation (`reported_tcb_too_low`); the launcher destroys the domain.
4. Replays of the first guest's report, as someone on the guest network who captured it: with its own
   challenge to its own authorisation, and with a fresh challenge to a fresh authorisation. Both refused;
   nothing released.
5. The owner's audit log, shown and verified.

Exit status 0 when all of that came out as described, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sevlaunch.cli import CommandError
from sevlaunch.cli.demo import (
    _ms,
    _print_audit,
    _Printer,
    _short,
    finish,
    run_body,
)
from sevlaunch.demo.snp import (
    SNP_FIRMWARE,
    SNP_WORKLOAD_ID,
    ReplayOutcome,
    SnpDemoEnvironment,
    SnpLaunchOutcome,
)

GOOD = "demo-snp-guest"
TAMPERED = "demo-snp-tampered"
TCB = "demo-snp-tcb"
REPLAY_SAME = "replay-to-its-own-launch"
REPLAY_OTHER = "replay-to-another-launch"

SNP_PHASE_NOTES = {
    "CHAIN_FETCHED": "platform: SNP status and the VCEK of its reported TCB (chain to the emulated ARK)",
    "AUTHORIZED": "owner: chain and TCB checked; ID block + ID auth for the reference digest",
    "DEFINED": "libvirt: domain with <launchSecurity type='sev-snp'> (idBlock, idAuth, hostData)",
    "STARTED": "firmware: SNP_LAUNCH_START/UPDATE/FINISH passed (digest = ID block's); the guest boots",
    "RUNNING": "owner: the guest's report verified and its secret released to it",
}


def _event_printer(p: _Printer) -> Any:
    from sevlaunch.rpc.v1 import launcher_pb2

    def event(guest: str, ev: launcher_pb2.LaunchEvent) -> None:
        took = ev.duration.ToTimedelta().total_seconds() * 1000
        if ev.phase == launcher_pb2.PHASE_FAILED:
            failed = launcher_pb2.Phase.Name(ev.failed_phase).removeprefix("PHASE_")
            p.line(f"  {_ms(took):>9}  FAILED at {failed}: {ev.reason}")
            if ev.detail:
                p.line(f"  {'':>9}    {ev.detail[:300]}")
            return
        phase = launcher_pb2.Phase.Name(ev.phase).removeprefix("PHASE_")
        p.line(f"  {_ms(took):>9}  {phase:<14} {SNP_PHASE_NOTES.get(phase, '')}")

    return event


def _describe(p: _Printer, r: SnpLaunchOutcome) -> None:
    gone = "the domain was destroyed" if r.guests_after == r.guests_before else "DOMAIN LEFT"
    if r.outcome == "running":
        held = "holds the workload's secret" if r.secret_matches else "does NOT hold the workload's secret"
        p.line(
            f"  => RUNNING ({r.domain_name}): measurement {_short(r.measurement)} = the owner's reference "
            f"digest of manifest {_short(r.manifest_id)}; the guest {held} (SHA-256 compared, not shown)"
        )
    else:
        guest = f"; guest agent: {r.guest_outcome} {r.guest_reason}".rstrip() if r.guest_outcome else ""
        p.line(
            f"  => REFUSED at {r.phase} ({r.reason}); authorisation {r.authorization_state or '-'}{guest}; "
            f"{gone} (SNP guests {r.guests_before} -> {r.guests_after})"
        )


def _describe_replay(p: _Printer, r: ReplayOutcome) -> None:
    released = "RELEASED" if r.released_after else "nothing released"
    verdict = f"REFUSED {r.code} {r.reason}" if r.refused else "ACCEPTED"
    p.line(f"  {r.name}: {verdict}; authorisation {r.authorization_id[:12]}…: {released}")


def _checks(results: list[SnpLaunchOutcome], replays: list[ReplayOutcome], audit_ok: bool) -> bool:
    by = {r.name: r for r in results}
    good, bad, low = by.get(GOOD), by.get(TAMPERED), by.get(TCB)
    return (
        good is not None
        and good.outcome == "running"
        and bool(good.secret_matches)
        and bad is not None
        and bad.outcome == "refused"
        and bad.reason == "snp_launch_refused"
        and bad.guests_after == bad.guests_before
        and low is not None
        and low.outcome == "refused"
        and low.reason == "reported_tcb_too_low"
        and low.guests_after == low.guests_before
        and len(replays) == 2
        and all(r.refused and not r.released_after for r in replays[1:])
        and replays[0].refused
        and audit_ok
    )


def run_snp_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    p = _Printer(sys.stderr if args.json else sys.stdout)
    firmware = Path(args.firmware) if args.firmware else SNP_FIRMWARE
    if not firmware.is_file():
        raise CommandError(f"no firmware image at {firmware} (install Debian's `ovmf`, or pass --firmware)")
    env = SnpDemoEnvironment(firmware=firmware, on_step=p.step)
    results: list[SnpLaunchOutcome] = []
    replays: list[ReplayOutcome] = []
    audit_ok = False
    on_event = _event_printer(p)

    def body() -> None:
        nonlocal audit_ok
        p.line(f"sevlaunch demo --snp: attested SEV-SNP launches on emulated hardware, in {env.workdir}")
        p.line("set-up")
        env.prepare()
        env.start()
        env.configure_owner()
        assert env.chip_tcb is not None

        p.line(f"launch {GOOD!r}: {firmware.name}, the image the signed reference values list")
        good = env.launch_snp(GOOD, firmware, on_event)
        _describe(p, good)
        results.append(good)

        p.line(f"launch {TAMPERED!r}: {env.tampered_firmware.name}, one byte flipped")
        bad = env.launch_snp(TAMPERED, env.tampered_firmware, on_event)
        _describe(p, bad)
        results.append(bad)

        raised = replace(env.chip_tcb, snp=env.chip_tcb.snp + 1)
        p.line(
            f"launch {TCB!r}: while it boots, the tenant raises the minimum TCB to {raised} "
            f"(the chip reports {env.chip_tcb})"
        )
        low = env.launch_snp(TCB, firmware, on_event, on_authorized=lambda: env.put_workload(raised))
        env.put_workload()  # the floor back where the chip meets it
        _describe(p, low)
        results.append(low)

        p.line(f"replays of {GOOD!r}'s report, as captured on the guest network")
        recorded = env.guest_record(good.domain_name)
        if recorded.get("report"):
            replays.append(env.replay(REPLAY_SAME, recorded))
            fresh = env.fresh_authorization()
            replays.append(env.replay(REPLAY_OTHER, recorded, target=fresh.authorization_id))
            env.revoke(fresh.authorization_id)
            for r in replays:
                _describe_replay(p, r)
        else:
            p.line("  the guest recorded no report: nothing to replay")
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
        prog="sevlaunch demo --snp",
        started=started,
        checks_ok=_checks(results, replays, audit_ok),
        audit_ok=audit_ok,
        workload_id=SNP_WORKLOAD_ID,
        doc={
            "technology": "sev-snp",
            "launches": [r.to_json() for r in results],
            "replays": [r.to_json() for r in replays],
        },
    )


def _keep_instructions(p: _Printer, env: SnpDemoEnvironment) -> None:
    s = env.services
    tls = shlex.quote(str(env.tls_dir))
    p.line("services left running (--keep):")
    for svc in s.values():
        p.line(f"  {svc.name:<9} {svc.address:<16} pid {svc.pid:<8} log {svc.log_path}")
    p.line(
        f"  owner guest port 127.0.0.1:{env.guest_port}; tls dir {env.tls_dir}; workload {SNP_WORKLOAD_ID}"
    )
    p.line("try:")
    p.line(
        f"  sevlaunch launch --snp --launcher {s['launcher'].address} --owner {s['owner'].address} "
        f"--workload {SNP_WORKLOAD_ID} --firmware {shlex.quote(str(env.firmware))} --tls-dir {tls}"
    )
    p.line(f"  sevlaunch owner audit show --endpoint {s['owner'].address} --tls-dir {tls}")
    pids = " ".join(str(svc.pid) for svc in s.values())
    p.line("stop and clean up:")
    p.line(f"  kill {pids}; rm -rf {shlex.quote(str(env.workdir))}")
