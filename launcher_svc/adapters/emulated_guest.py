"""The emulated SEV-SNP guests' agents: what `sevlaunch guest attest` does inside a real guest, run by the
emulated hypervisor for each SNP guest it starts, so that a whole SNP launch runs on one machine.

A real guest boots, reads its init data from fw_cfg, and runs the agent: challenge from the owner named in
the init data, a report through the firmware's guest request, Attest, the secret opened with its ephemeral
key. Here the agent is a thread of the launcher process (the process that plays QEMU), with the domain's
init data and a guest-request channel to the emulated firmware (`EmulatedSnpGuest`). It speaks to the
owner exactly as a guest does: `GrpcOwnerClient`, server-authenticated TLS trusting only the init data's CA.

Each guest has a folder `<guests_dir>/<domain>/` (0700) standing in for its memory:
* `secret` (0600): the released secret table, what the guest would hold in RAM; nothing else writes it;
* `attestation.json`: what went over the wire and the outcome: the authorisation id, the challenge, the
  guest's public key, the report (all public: the owner's guest port sees them in clear inside TLS), the
  measurement, and on a refusal the owner's reason. Never the secret or the private key.
When the domain goes (`discard`), so does the secret, as the guest's memory would; `attestation.json`
stays, like a console log kept after the VM is gone.

The agent tries again while the owner cannot be reached (a guest would keep retrying its boot service);
an owner's refusal is final: the launcher learns it from the owner (GetSnpAttestation) and destroys the
domain.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sevlaunch.guest.agent import OwnerClient, OwnerRefused, OwnerUnavailable, attest_and_receive
from sevlaunch.guest.owner_client import GrpcOwnerClient
from sevlaunch.guest.source import GuestReportSource
from sevlaunch.sev.errors import SevError
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.secret_wrap import WrappedSecret

log = logging.getLogger("launcher_svc.emulated_guest")

SECRET_FILE = "secret"  # noqa: S105 - a file name
ATTESTATION_FILE = "attestation.json"
DEFAULT_ATTEMPTS = 20
DEFAULT_RETRY_SECONDS = 0.25
DEFAULT_CALL_TIMEOUT = 15.0

#: Makes the agent's owner client from the init data (tests swap in another).
OwnerFactory = Callable[[InitData], GrpcOwnerClient]


@dataclass
class _Wire:
    """What the agent sent, for `attestation.json` (public values only)."""

    challenge: bytes = b""
    report: bytes = b""
    guest_public_key: bytes = b""


class _Recording:
    """An `OwnerClient` that notes the public values of the exchange on their way to the owner."""

    def __init__(self, inner: OwnerClient, wire: _Wire) -> None:
        self._inner = inner
        self._wire = wire

    def get_challenge(self, authorization_id: str) -> bytes:
        return self._inner.get_challenge(authorization_id)

    def attest(
        self,
        *,
        authorization_id: str,
        challenge: bytes,
        report: bytes,
        cert_table: bytes | None,
        guest_public_key: bytes,
    ) -> WrappedSecret:
        self._wire.challenge, self._wire.report, self._wire.guest_public_key = (
            challenge,
            report,
            guest_public_key,
        )
        return self._inner.attest(
            authorization_id=authorization_id,
            challenge=challenge,
            report=report,
            cert_table=cert_table,
            guest_public_key=guest_public_key,
        )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class EmulatedGuestAgents:
    """Starts one agent thread per SNP guest; `discard` ends a guest's agent and forgets its folder."""

    def __init__(
        self,
        guests_dir: str | Path,
        *,
        boot_seconds: float = 0.0,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        owner_factory: OwnerFactory | None = None,
    ) -> None:
        if not 0 <= boot_seconds <= 600:
            raise ValueError("the emulated boot time is 0..600 seconds")
        self.guests_dir = Path(guests_dir)
        self.guests_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.boot_seconds = boot_seconds
        self.attempts = attempts
        self.retry_seconds = retry_seconds
        self._owner_factory = owner_factory or (lambda init: GrpcOwnerClient(init, timeout=call_timeout))
        self._lock = threading.Lock()
        self._running: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def folder(self, name: str) -> Path:
        return self.guests_dir / name

    def start(self, name: str, source: GuestReportSource, init_data: bytes) -> None:
        """Boots the guest's agent (after `boot_seconds`), in a daemon thread."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(name, source, init_data, stop), name=f"guest-agent-{name}", daemon=True
        )
        with self._lock:
            old = self._running.pop(name, None)
            if old is not None:
                old[1].set()
            self._running[name] = (thread, stop)
        thread.start()

    def wait(self, name: str, timeout: float | None = None) -> bool:
        """Waits for the agent of `name` to finish; True when it has (or none runs)."""
        with self._lock:
            entry = self._running.get(name)
        if entry is None:
            return True
        entry[0].join(timeout)
        return not entry[0].is_alive()

    def discard(self, name: str) -> None:
        """The guest is gone: its agent stops at its next step and its secret (its "memory") goes."""
        with self._lock:
            entry = self._running.pop(name, None)
        if entry is not None:
            entry[1].set()
        for leftover in (SECRET_FILE, SECRET_FILE + ".tmp"):
            (self.folder(name) / leftover).unlink(missing_ok=True)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            entries = list(self._running.values())
            self._running.clear()
        for _, stop in entries:
            stop.set()
        for thread, _ in entries:
            thread.join(timeout)

    # ------------------------------------------------------------------------------ the agent

    def _run(self, name: str, source: GuestReportSource, init_data: bytes, stop: threading.Event) -> None:
        if stop.wait(self.boot_seconds):
            return
        folder = self.folder(name)
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            init = InitData.parse(init_data)
        except (OSError, SevError) as exc:
            log.warning(
                "emulated SNP guest cannot start its agent", extra={"domain": name, "error": str(exc)}
            )
            return
        record: dict[str, object] = {"authorization_id": init.authorization_id, "endpoint": init.endpoint.url}
        wire = _Wire()
        for attempt in range(1, self.attempts + 1):
            if stop.is_set():
                return
            try:
                with self._owner_factory(init) as client:
                    released = attest_and_receive(init, _Recording(client, wire), source)
            except OwnerUnavailable as exc:
                record.update(outcome="unavailable", reason="owner_unavailable", detail=exc.detail[:300])
                if attempt < self.attempts and not stop.wait(self.retry_seconds * attempt):
                    continue
                break
            except OwnerRefused as exc:
                record.update(outcome="refused", reason=exc.owner_reason, detail=exc.detail[:300])
                break
            except SevError as exc:
                record.update(outcome="failed", reason=str(exc.reason), detail=exc.detail[:300])
                break
            else:
                if stop.is_set():
                    return  # destroyed while attesting: no memory to keep it in
                try:
                    _write_private(folder / SECRET_FILE, released.secret)
                except OSError:
                    return  # the folder went with the guest
                record.update(outcome="released", measurement=released.measurement.hex())
                break
        record.update(
            challenge=wire.challenge.hex(),
            report=wire.report.hex(),
            guest_public_key=wire.guest_public_key.hex(),
        )
        try:
            _write_private(folder / ATTESTATION_FILE, json.dumps(record, indent=1).encode())
        except OSError as exc:
            log.warning("emulated SNP guest cannot record its attestation", extra={"error": str(exc)})
        log.info(
            "emulated SNP guest attested",
            extra={"domain": name, "outcome": record.get("outcome"), "reason": record.get("reason", "")},
        )
