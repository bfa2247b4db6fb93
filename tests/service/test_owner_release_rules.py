"""OwnerService rules found in review: release re-checks the workload as it is now, kernel-hash selectors,
extra roots cannot borrow AMD's names, hostile manifest JSON, the polling loop, launching without a
secret, and firmware older than API 0.17."""

from __future__ import annotations

import http.server
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import owner_support
import pytest
from owner_support import (
    DISK_GUID,
    SEV_ES_POLICY,
    SEV_POLICY,
    Publisher,
    db_snapshot,
    emulator_chain,
    launch,
    provision,
    reference_digests,
    rpc_error,
    secret_area,
    workload_msg,
)

from owner_svc.core.refset import ReferenceValueSet
from owner_svc.core.service import OwnerCore
from owner_svc.server import ConfigError, load_trust_root
from sevlaunch.firmware.emulator import ChipConfig, EmulatedFirmware, EmulatedRoot
from sevlaunch.rpc.v1 import owner_pb2
from sevlaunch.sev import roots as amd_roots
from sevlaunch.sev.chain import Generation, TrustedRoot, load_roots_file

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]


def open_req(chain: Any, policy: int = SEV_POLICY, workload_id: str = "web") -> owner_pb2.OpenSessionRequest:
    return owner_pb2.OpenSessionRequest(workload_id=workload_id, chain=chain, policy=policy)


def put(h: Any, workload: owner_pb2.Workload) -> None:
    h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload))


def session_state(h: Any, session_id: str) -> int:
    sessions = h.admin.ListSessions(owner_pb2.ListSessionsRequest()).sessions
    return int(next(s.state for s in sessions if s.session_id == session_id))


# ------------------------------------------------------------------ 1. release re-checks admission


@pytest.mark.parametrize(
    ("tightened", "reason"),
    [
        ({"generations": ["milan", "rome"]}, "generation_not_allowed"),  # the emulated root dropped
        ({"allowed_policies": [SEV_ES_POLICY]}, "policy_not_allowed"),  # the session's policy withdrawn
    ],
    ids=["generation-dropped", "policy-withdrawn"],
)
def test_release_rechecks_the_workload_as_it_is_now(
    make_owner: Any, publisher: Publisher, emu: Any, tightened: dict[str, Any], reason: str
) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    opened = launcher.OpenSession(open_req(emulator_chain(emu)))
    run = launch(emu, opened)
    put(h, workload_msg(**tightened))  # the admin tightens the workload while the launch is paused
    try:
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason)
        # Spent: undoing the change does not bring the session back.
        put(h, workload_msg())
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_refused")
        assert session_state(h, opened.session_id) == owner_pb2.OWNER_SESSION_STATE_REFUSED
        records = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records
        assert any(
            r.action == "release_secret" and r.outcome == "refused" and r.reason == reason for r in records
        )
    finally:
        emu.decommission(run.handle)


# ------------------------------------------------------------------------- 2. kernel hashes


def test_kernel_hash_rule_through_the_service(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    h = make_owner()
    provision(h, publisher)  # reference values without kernel hashes
    got = h.admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id="web"))
    assert got.workload.selectors[0].kernel_hashes == owner_pb2.KERNEL_HASHES_FORBIDDEN
    assert got.accepted_digests_sev == 1 and got.accepted_digests_sev_es == 2

    selector = owner_pb2.ReferenceSelector(
        firmware_name="OVMF",
        modes=[owner_pb2.REFERENCE_MODE_SEV, owner_pb2.REFERENCE_MODE_SEV_ES],
        sev_es_vcpus=[1, 2],
        kernel_hashes=owner_pb2.KERNEL_HASHES_REQUIRED,
    )
    put(h, workload_msg(selectors=[selector]))
    got = h.admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id="web"))
    assert got.workload.selectors[0].kernel_hashes == owner_pb2.KERNEL_HASHES_REQUIRED
    assert got.accepted_digests_sev == 0 and got.accepted_digests_sev_es == 0
    err = rpc_error(lambda: h.stub().OpenSession(open_req(emulator_chain(emu))))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")

    # SEV-ES pins: the reference values are for EPYC-Milan, init2.
    selector.kernel_hashes = owner_pb2.KERNEL_HASHES_ANY
    selector.vcpu_type, selector.vmsa_layout = "EPYC-Rome", "init2"
    put(h, workload_msg(selectors=[selector]))
    got = h.admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id="web"))
    assert (got.accepted_digests_sev, got.accepted_digests_sev_es) == (1, 0)
    assert (got.workload.selectors[0].vcpu_type, got.workload.selectors[0].vmsa_layout) == (
        "EPYC-Rome",
        "init2",
    )
    selector.vcpu_type = "EPYC-Milan"
    put(h, workload_msg(selectors=[selector]))
    assert h.admin.GetWorkload(owner_pb2.GetWorkloadRequest(workload_id="web")).accepted_digests_sev_es == 2
    selector.modes[:] = [owner_pb2.REFERENCE_MODE_SEV]
    err = rpc_error(lambda: put(h, workload_msg(selectors=[selector])))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_selector")


# ---------------------------------------------------------- 3. extra roots and AMD generation names


def test_extra_root_cannot_take_an_amd_generation_name(emu_root_file: Path, tmp_path: Path) -> None:
    named_like_milan = tmp_path / "milan.cert"
    named_like_milan.write_bytes(emu_root_file.read_bytes())
    for spec in (str(named_like_milan), f"milan={emu_root_file}", f"rome={emu_root_file}"):
        with pytest.raises(ConfigError, match="AMD generation"):
            load_trust_root(spec)
    assert load_trust_root(f"emulated={emu_root_file}").name == "emulated"
    assert load_trust_root(str(emu_root_file)).name == "ask_ark"

    # AMD's own Milan ASK||ARK keeps its name: its ARK is byte-equal to the pinned one.
    amd_milan = tmp_path / "milan2.cert"
    amd_milan.write_bytes(amd_roots.ask_bytes("milan") + amd_roots.ark_bytes("milan"))
    assert load_trust_root(f"milan={amd_milan}").generation is Generation.MILAN

    # The core refuses such a root too, whoever builds it.
    impostor = load_roots_file(emu_root_file.read_bytes(), "milan")
    assert isinstance(impostor, TrustedRoot) and impostor.generation is None
    with pytest.raises(ValueError, match="AMD generation"):
        OwnerCore(None, None, ReferenceValueSet([]), extra_roots=[impostor])  # type: ignore[arg-type]


# --------------------------------------------------------------------- 4. hostile manifest JSON


def test_deeply_nested_envelope_is_invalid_argument(make_owner: Any, publisher: Publisher) -> None:
    h = make_owner()
    provision(h, publisher)
    before = db_snapshot(h.config.db)
    for envelope, reason in (
        (b"[" * 200000 + b"]" * 200000, "bad_encoding"),
        (b" " * ((1 << 20) + 1), "bad_length"),
    ):
        request = owner_pb2.ImportReferenceValuesRequest(envelope=envelope)
        err = rpc_error(lambda r=request: h.admin.ImportReferenceValues(r))
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert db_snapshot(h.config.db) == before


@pytest.fixture
def manifest_server() -> Iterator[tuple[str, dict[str, Any]]]:
    served: dict[str, Any] = {"body": b"", "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served["hits"] += 1
            body = served["body"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/ovmf.dsse", served
    finally:
        httpd.shutdown()


def test_polling_loop_picks_up_new_manifests_and_drops_bad_ones(
    make_owner: Any, publisher: Publisher, manifest_server: tuple[str, dict[str, Any]], caplog: Any
) -> None:
    url, served = manifest_server
    caplog.set_level(logging.INFO, logger="owner_svc.refvalues")
    served["body"] = publisher.envelope(digests=reference_digests(), version="2024.05")
    # A URL that refuses connections comes first: its failure does not stop the other.
    dead = "http://127.0.0.1:9/nothing.dsse"
    h = make_owner(refvalues_urls=(dead, url), refvalues_interval=0.1, start_poller=True)

    def in_force() -> list[str]:
        return [
            m.firmware_version
            for m in h.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
        ]

    owner_support.wait_for(lambda: in_force() == ["2024.05"])
    served["body"] = publisher.envelope(
        digests=reference_digests(b"\0" * 4096 + owner_support.OVMF_IMAGE), version="2024.08"
    )
    owner_support.wait_for(lambda: sorted(in_force()) == ["2024.05", "2024.08"])

    # A bad body (nested too deeply to parse) is rejected and logged, round after round; both stay.
    served["body"] = b"[" * 200000 + b"]" * 200000
    hits = served["hits"]
    owner_support.wait_for(lambda: served["hits"] >= hits + 3)
    rejected = [r for r in caplog.records if r.getMessage() == "reference values rejected"]
    assert rejected and all(getattr(r, "reason", "") == "bad_encoding" for r in rejected)
    assert not [r for r in caplog.records if r.getMessage() == "reference values poll failed"]
    assert sorted(in_force()) == ["2024.05", "2024.08"]
    # ... and one signed by an unknown key likewise.
    from sevlaunch.refvalues import KeyType, generate_private_key

    stranger = Publisher(generate_private_key(KeyType.ED25519), publisher.pub_file)
    served["body"] = stranger.envelope(digests=reference_digests(), version="2099.01")
    hits = served["hits"]
    owner_support.wait_for(lambda: served["hits"] >= hits + 2)
    assert any(getattr(r, "reason", "") == "wrong_signer" for r in caplog.records)
    assert sorted(in_force()) == ["2024.05", "2024.08"]


# ------------------------------------------------------------------------------- 5. file modes


def test_owner_database_files_are_private(make_owner: Any, publisher: Publisher) -> None:
    old = os.umask(0o022)
    try:
        h = make_owner(subdir="umask")
        provision(h, publisher)
    finally:
        os.umask(old)
    db = h.config.db
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


# ------------------------------------------------------------------- 6. launching without a secret


def test_launch_without_secret_needs_the_workloads_consent(
    make_owner: Any, publisher: Publisher, emu: Any
) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    chain = emulator_chain(emu)

    # No secret and no consent: refused at open, as before.
    put(h, workload_msg("bare"))
    err = rpc_error(lambda: launcher.OpenSession(open_req(chain, workload_id="bare")))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_secret")

    # Consent, no secret: the matched launch is released with no_secret and nothing to inject.
    put(h, workload_msg("bare", allow_launch_without_secret=True))
    assert h.admin.GetWorkload(
        owner_pb2.GetWorkloadRequest(workload_id="bare")
    ).workload.allow_launch_without_secret
    opened = launcher.OpenSession(open_req(chain, workload_id="bare"))
    run = launch(emu, opened)
    try:
        released = launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        assert released.no_secret
        assert released.secret_header == b"" and released.secret_payload == b""
        assert released.matched_launch_digest == reference_digests()[0].launch_digest and released.manifest_id
        assert session_state(h, opened.session_id) == owner_pb2.OWNER_SESSION_STATE_RELEASED
        last = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records[-1]
        assert (last.action, last.outcome, last.detail) == ("release_secret", "allowed", "no secret")
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert err.reason == "session_already_used"
    finally:
        emu.decommission(run.handle)

    # Consent still needs the measurement to match: a tampered image is refused as ever.
    opened = launcher.OpenSession(open_req(chain, workload_id="bare"))
    tampered = bytearray(owner_support.OVMF_IMAGE)
    tampered[100] ^= 0xFF
    run = launch(emu, opened, image=bytes(tampered))
    try:
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "measurement_mismatch")
    finally:
        emu.decommission(run.handle)

    # Consent with a secret stored: the secret is released as usual.
    h.admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id="bare", entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"pw\0")]
        )
    )
    opened = launcher.OpenSession(open_req(chain, workload_id="bare"))
    run = launch(emu, opened)
    try:
        released = launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        assert not released.no_secret and len(released.secret_header) == 52 and released.secret_payload
    finally:
        emu.decommission(run.handle)


# ------------------------------------------------------------------- 7. firmware below API 0.17


@pytest.fixture(scope="module")
def legacy_chip(emu_root: EmulatedRoot, tmp_path_factory: pytest.TempPathFactory) -> EmulatedFirmware:
    """A chip under the same emulated root, with Naples-era firmware (API 0.16)."""
    return EmulatedFirmware(
        tmp_path_factory.mktemp("legacy-chip"),
        root=emu_root,
        config=ChipConfig(api_major=0, api_minor=16, build=3),
    )


def test_firmware_below_0_17_needs_explicit_consent(
    make_owner: Any, publisher: Publisher, emu: Any, legacy_chip: EmulatedFirmware
) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    chain = emulator_chain(legacy_chip)

    opened = launcher.OpenSession(open_req(chain))
    run = launch(legacy_chip, opened)
    assert (run.api_major, run.api_minor) == (0, 16)
    try:
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "firmware_too_old")
        assert "0.17" in err.message
        assert session_state(h, opened.session_id) == owner_pb2.OWNER_SESSION_STATE_REFUSED
    finally:
        legacy_chip.decommission(run.handle)

    put(h, workload_msg(allow_pre_0_17=True))
    opened = launcher.OpenSession(open_req(chain))
    run = launch(legacy_chip, opened)
    try:
        released = launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
        base, _ = secret_area()
        legacy_chip.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    finally:
        legacy_chip.decommission(run.handle)

    # Even with consent, a current chip's host cannot pass as pre-0.17 to dodge the version check:
    # the firmware measured its real version, so the measurement no longer matches.
    opened = launcher.OpenSession(open_req(emulator_chain(emu)))
    run = launch(emu, opened)
    run.api_minor = 16
    try:
        err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "measurement_mismatch")
    finally:
        emu.decommission(run.handle)


# ------------------------------------------------------------------------------------- the CLI


def test_cli_workload_put_takes_the_new_fields(
    make_owner: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from sevlaunch.cli import main as cli_main

    h = make_owner()
    common = ["--endpoint", h.running.address, "--tls-dir", str(h.tls_dir)]
    wl = tmp_path / "w.json"
    wl.write_text(
        json.dumps(
            {
                "workload_id": "kernel-web",
                "allowed_policies": [SEV_ES_POLICY],
                "generations": ["milan"],
                "allow_launch_without_secret": True,
                "allow_pre_0_17": True,
                "selectors": [
                    {
                        "firmware_name": "OVMF",
                        "modes": ["REFERENCE_MODE_SEV_ES"],
                        "sev_es_vcpus": [4],
                        "kernel_hashes": "KERNEL_HASHES_REQUIRED",
                        "vcpu_type": "EPYC-Milan",
                        "vmsa_layout": "init2",
                    }
                ],
            }
        )
    )
    assert cli_main(["owner", "workload", "put", "--file", str(wl), *common]) == 0
    capsys.readouterr()
    assert cli_main(["owner", "workload", "get", "--workload-id", "kernel-web", *common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["workload"]
    assert got["allow_launch_without_secret"] and got["allow_pre_0_17"]
    selector = got["selectors"][0]
    assert selector["kernel_hashes"] == "REQUIRED"  # docs/CLI.md: enum names without their prefix
    assert (selector["vcpu_type"], selector["vmsa_layout"]) == ("EPYC-Milan", "init2")
