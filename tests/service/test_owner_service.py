"""OwnerService through a real mTLS gRPC server on port 0, with the emulated firmware playing the PSP."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from owner_support import (
    DISK_GUID,
    EXTRA_GUID,
    EXTRA_SECRET,
    OVMF_IMAGE,
    PASSPHRASE,
    SEV_ES_POLICY,
    SEV_POLICY,
    Publisher,
    chain_from_dir,
    db_snapshot,
    emulator_chain,
    launch,
    provision,
    reference_digests,
    rpc_error,
    secret_area,
    workload_msg,
)

from sevlaunch.firmware.status import FirmwareError, StatusCode
from sevlaunch.rpc.v1 import owner_pb2
from sevlaunch.sev import session as sev_session
from sevlaunch.sev.secret import SecretTable

# The owner fixtures (an emulated chip and its root, a publisher, owners on port 0).
pytest_plugins = ["owner_support"]


def open_req(chain: Any, policy: int = SEV_POLICY, workload_id: str = "web") -> owner_pb2.OpenSessionRequest:
    return owner_pb2.OpenSessionRequest(workload_id=workload_id, chain=chain, policy=policy)


# ----------------------------------------------------------------------------------- happy path


@pytest.mark.parametrize(
    ("policy", "vcpus"), [(SEV_POLICY, 1), (SEV_ES_POLICY, 2)], ids=["sev", "sev-es-2vcpus"]
)
def test_attested_launch_end_to_end(
    make_owner: Any, publisher: Publisher, emu: Any, policy: int, vcpus: int
) -> None:
    h = make_owner()
    manifest_id = provision(h, publisher)
    launcher = h.stub("launcher")

    opened = launcher.OpenSession(open_req(emulator_chain(emu), policy))
    assert opened.generation == "emulated" and opened.policy == policy and len(opened.session_blob) == 128
    run = launch(emu, opened, vcpus=vcpus)
    released = launcher.ReleaseSecret(run.release_request(opened.session_id, policy))
    assert released.manifest_id == manifest_id
    expected = [
        d.launch_digest
        for d in reference_digests()
        if (d.config.mode.value == "sev-es") == bool(policy & 4) and d.config.vcpus in (None, vcpus)
    ]
    assert released.matched_launch_digest == expected[0]

    # The firmware accepts the packaged secret for this launch, and the guest finds the table.
    base, _ = secret_area()
    emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    table = SecretTable.from_bytes(emu.read_guest_memory(run.handle, base, len(released.secret_payload)))
    assert table.get(uuid.UUID(DISK_GUID)) == PASSPHRASE + b"\0"
    assert table.get(uuid.UUID(EXTRA_GUID)) == EXTRA_SECRET
    emu.launch_finish(run.handle)
    emu.decommission(run.handle)

    records = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records
    assert [(r.action, r.outcome) for r in records][-2:] == [
        ("open_session", "allowed"),
        ("release_secret", "allowed"),
    ]
    assert records[-1].digest == expected[0].hex() and records[-1].cek_fingerprint
    sessions = h.admin.ListSessions(owner_pb2.ListSessionsRequest()).sessions
    assert sessions[0].state == owner_pb2.OWNER_SESSION_STATE_RELEASED


def test_secret_opens_only_in_the_attested_launch(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    """A released secret is bound to its launch's measure: another launch (even of the same image,
    with the same session blob) has another mnonce, so LAUNCH_SECRET refuses it."""
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    opened = launcher.OpenSession(open_req(emulator_chain(emu)))
    run = launch(emu, opened)
    other = launch(emu, opened)  # the host replays the session blob in a second guest
    released = launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    base, _ = secret_area()
    with pytest.raises(FirmwareError) as info:
        emu.launch_secret(other.handle, released.secret_header, released.secret_payload, base)
    assert info.value.status is StatusCode.BAD_MEASUREMENT
    emu.launch_secret(run.handle, released.secret_header, released.secret_payload, base)
    for handle in (run.handle, other.handle):
        emu.decommission(handle)


# ---------------------------------------------------------------------------- OpenSession refusals


def test_open_session_refusals(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    h = make_owner()
    provision(h, publisher)
    admin, launcher = h.admin, h.stub()
    chain = emulator_chain(emu)

    # Unknown workload.
    err = rpc_error(lambda: launcher.OpenSession(open_req(chain, workload_id="nope")))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_workload")

    # Broken link: one byte of the PEK's signed body flipped.
    pek = bytearray(chain.pek_cert)
    pek[0x5] ^= 1  # api_minor: inside the signed body, still parses
    broken = type(chain)()
    broken.CopyFrom(chain)
    broken.pek_cert = bytes(pek)
    err = rpc_error(lambda: launcher.OpenSession(open_req(broken)))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "bad_signature"
    assert err.metadata["link"] in ("OCA->PEK", "CEK->PEK")

    # Policy not in the allow-list, and a debug policy.
    err = rpc_error(lambda: launcher.OpenSession(open_req(chain, policy=0x1)))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "policy_not_allowed")

    # Wrong generation: a real Rome chain (it verifies against the pinned roots) for a Milan-only workload.
    admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(workload=workload_msg("milan-only", generations=["milan"]))
    )
    admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id="milan-only", entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"x")]
        )
    )
    err = rpc_error(
        lambda: launcher.OpenSession(open_req(chain_from_dir("virtee-rome"), workload_id="milan-only"))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "generation_not_allowed")
    milan = launcher.OpenSession(open_req(chain_from_dir("virtee-milan"), workload_id="milan-only"))
    assert milan.generation == "milan"

    # Minimum firmware API from the chain's PDH/PEK: Milan's chain says 1.28.
    admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=workload_msg("new-fw", firmware_minimum={"api_major": 1, "api_minor": 50})
        )
    )
    admin.PutSecret(
        owner_pb2.PutSecretRequest(
            workload_id="new-fw", entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"x")]
        )
    )
    err = rpc_error(
        lambda: launcher.OpenSession(open_req(chain_from_dir("virtee-milan"), workload_id="new-fw"))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "firmware_too_old")

    # Empty reference values: the workload selects a firmware no trusted manifest lists.
    admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=workload_msg(
                "other-fw",
                selectors=[
                    owner_pb2.ReferenceSelector(firmware_name="SeaBIOS", modes=[owner_pb2.REFERENCE_MODE_SEV])
                ],
            )
        )
    )
    err = rpc_error(lambda: launcher.OpenSession(open_req(chain, workload_id="other-fw")))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")

    reasons = [
        (r.action, r.reason)
        for r in admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records
        if r.outcome == "refused"
    ]
    assert ("open_session", "generation_not_allowed") in reasons and (
        "open_session",
        "bad_signature",
    ) in reasons


def test_untrusted_root_refused(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    """Without --trust-root, the emulator's chain verifies only against the ARK it carries: refused."""
    h = make_owner(trust_emulator=False)
    provision(h, publisher)
    err = rpc_error(lambda: h.stub().OpenSession(open_req(emulator_chain(emu))))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "untrusted_root")


def test_authorisation_is_deny_by_default(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    h = make_owner()
    provision(h, publisher)
    chain = emulator_chain(emu)
    for identity in ("nobody", "owner-admin", "platform"):
        err = rpc_error(lambda i=identity: h.stub(i).OpenSession(open_req(chain)))
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
    for identity in ("launcher", "client", "nobody"):
        err = rpc_error(
            lambda i=identity: h.stub(i).PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg()))
        )
        assert err.code == grpc.StatusCode.PERMISSION_DENIED
    # A session is bound to the identity that opened it.
    opened = h.stub("launcher").OpenSession(open_req(chain))
    run = launch(emu, opened)
    err = rpc_error(
        lambda: h.stub("client").ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "wrong_caller")
    assert h.stub("launcher").ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)).secret_payload
    emu.decommission(run.handle)


# -------------------------------------------------------------------------- ReleaseSecret refusals


def test_release_refusals(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    chain = emulator_chain(emu)

    def fresh() -> tuple[Any, Any]:
        opened = launcher.OpenSession(open_req(chain))
        return opened, launch(emu, opened)

    # Measurement mismatch: the host loaded another image.
    opened = launcher.OpenSession(open_req(chain))
    tampered = bytearray(OVMF_IMAGE)
    tampered[100] ^= 0xFF
    run = launch(emu, opened, image=bytes(tampered))
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "measurement_mismatch")
    # ... and the session is spent: the right evidence afterwards does not help.
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_refused")

    # Policy changed between open and release.
    opened, run = fresh()
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_ES_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "policy_mismatch")

    # Firmware older than the workload's minimum build.
    h.admin.PutWorkload(
        owner_pb2.PutWorkloadRequest(
            workload=workload_msg(firmware_minimum={"api_major": 0, "api_minor": 24, "build_id": 16})
        )
    )
    opened, run = fresh()
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "firmware_too_old")
    h.admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg()))

    # Reused session.
    opened, run = fresh()
    assert launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)).secret_payload
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")

    # Revoked session.
    opened, run = fresh()
    h.admin.RevokeSession(owner_pb2.RevokeSessionRequest(session_id=opened.session_id))
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_revoked")

    # Unknown session.
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request("0" * 32, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_session")

    # Reference values withdrawn between open and release: a manifest revoking the one in force.
    opened, run = fresh()
    in_force = h.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
    revoking = publisher.envelope(
        digests=reference_digests(b"\0" * 4096 + OVMF_IMAGE),
        version="2023.01",
        revokes=tuple(m.manifest_id for m in in_force),
    )
    h.admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=revoking))
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "no_reference_values")


def test_expired_session_refused(make_owner: Any, publisher: Publisher, emu: Any) -> None:
    h = make_owner(session_ttl=1)
    provision(h, publisher)
    launcher = h.stub()
    opened = launcher.OpenSession(open_req(emulator_chain(emu)))
    run = launch(emu, opened)
    time.sleep(1.2)
    err = rpc_error(lambda: launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "session_expired")
    emu.decommission(run.handle)


# ------------------------------------------------------------------------------ malformed input


def test_malformed_fields_are_invalid_argument_and_change_nothing(
    make_owner: Any, publisher: Publisher, emu: Any
) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher, admin = h.stub(), h.admin
    chain = emulator_chain(emu)
    opened = launcher.OpenSession(open_req(chain))
    run = launch(emu, opened)
    good = run.release_request(opened.session_id, SEV_POLICY)

    def with_chain(**fields: bytes) -> owner_pb2.OpenSessionRequest:
        c = type(chain)()
        c.CopyFrom(chain)
        for k, v in fields.items():
            setattr(c, k, v)
        return open_req(c)

    def release(**fields: Any) -> owner_pb2.ReleaseSecretRequest:
        r = owner_pb2.ReleaseSecretRequest()
        r.CopyFrom(good)
        for k, v in fields.items():
            if k == "firmware":
                r.ClearField("firmware") if v is None else r.firmware.CopyFrom(v)
            else:
                setattr(r, k, v)
        return r

    from sevlaunch.rpc.v1 import common_pb2

    calls = [
        lambda: launcher.OpenSession(open_req(chain, workload_id="")),
        lambda: launcher.OpenSession(open_req(chain, workload_id="bad id/../x")),
        lambda: launcher.OpenSession(open_req(chain, policy=0x40)),  # reserved bit
        lambda: launcher.OpenSession(with_chain(pdh_cert=chain.pdh_cert[:100])),
        lambda: launcher.OpenSession(with_chain(ark_cert=b"")),
        lambda: launcher.OpenSession(with_chain(cek_cert=b"\xff" * len(chain.cek_cert))),
        lambda: launcher.ReleaseSecret(release(session_id="not-hex")),
        lambda: launcher.ReleaseSecret(release(launch_measurement=run.measurement[:47])),
        lambda: launcher.ReleaseSecret(release(launch_measurement=b"")),
        lambda: launcher.ReleaseSecret(release(firmware=None)),
        lambda: launcher.ReleaseSecret(release(firmware=common_pb2.FirmwareVersion(api_major=256))),
        lambda: launcher.ReleaseSecret(release(policy=0x8000)),
        lambda: admin.PutWorkload(owner_pb2.PutWorkloadRequest()),
        lambda: admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(allowed_policies=[]))),
        lambda: admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(generations=[]))),
        lambda: admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(selectors=[]))),
        lambda: admin.PutWorkload(
            owner_pb2.PutWorkloadRequest(workload=workload_msg(allowed_policies=[0x1]))
        ),
        lambda: admin.PutWorkload(
            owner_pb2.PutWorkloadRequest(
                workload=workload_msg(
                    selectors=[
                        owner_pb2.ReferenceSelector(
                            firmware_name="OVMF", modes=[owner_pb2.REFERENCE_MODE_SEV_ES]
                        )
                    ]
                )
            )
        ),
        lambda: admin.PutWorkload(owner_pb2.PutWorkloadRequest(workload=workload_msg(secret_area_size=10))),
        lambda: admin.PutSecret(owner_pb2.PutSecretRequest(workload_id="web")),
        lambda: admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id="web", entries=[owner_pb2.SecretEntry(guid="not-a-guid", data=b"x")]
            )
        ),
        lambda: admin.PutSecret(
            owner_pb2.PutSecretRequest(
                workload_id="web", entries=[owner_pb2.SecretEntry(guid=DISK_GUID, data=b"x" * 4000)]
            )
        ),
        lambda: admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=b"{not json")),
        lambda: admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=b"")),
        lambda: admin.RevokeSession(owner_pb2.RevokeSessionRequest(session_id="x")),
        lambda: admin.GetAuditLog(owner_pb2.GetAuditLogRequest(limit=100000)),
    ]
    before = db_snapshot(h.config.db)
    for i, call in enumerate(calls):
        err = rpc_error(call)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (i, err)
        assert err.reason, i
    assert db_snapshot(h.config.db) == before
    # The session is still usable: nothing above touched it.
    assert launcher.ReleaseSecret(good).secret_payload
    emu.decommission(run.handle)


# ----------------------------------------------------------------------------------- concurrency


def test_fifty_concurrent_releases_yield_exactly_one_secret(
    make_owner: Any, publisher: Publisher, emu: Any
) -> None:
    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    opened = launcher.OpenSession(open_req(emulator_chain(emu)))
    run = launch(emu, opened)
    request = run.release_request(opened.session_id, SEV_POLICY)
    stubs = [h.stub() for _ in range(5)]
    barrier = threading.Barrier(50)

    def attempt(i: int) -> Any:
        barrier.wait()
        try:
            return stubs[i % 5].ReleaseSecret(request, timeout=60)
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(attempt, range(50)))
    wins = [r for r in results if isinstance(r, owner_pb2.ReleaseSecretResponse)]
    losses = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(wins) == 1 and len(losses) == 49
    assert {(e.code(), rpc_error(lambda e=e: (_ for _ in ()).throw(e)).reason) for e in losses} == {
        (grpc.StatusCode.FAILED_PRECONDITION, "session_already_used")
    }
    allowed = [
        r
        for r in h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records
        if r.action == "release_secret" and r.outcome == "allowed"
    ]
    assert len(allowed) == 1
    emu.decommission(run.handle)


# ------------------------------------------------------------------------------------- leakage


def test_no_key_or_secret_bytes_in_database_logs_or_metrics(
    make_owner: Any,
    publisher: Publisher,
    emu: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    generated_keys: list[sev_session.TransportKeys] = []
    godh_keys: list[ec.EllipticCurvePrivateKey] = []
    real_generate = sev_session.TransportKeys.generate.__func__  # type: ignore[attr-defined]
    real_ec_generate = ec.generate_private_key

    def capture_keys(cls: Any) -> Any:
        keys = real_generate(cls)
        generated_keys.append(keys)
        return keys

    def capture_ec(curve: Any, *a: Any, **kw: Any) -> Any:
        key = real_ec_generate(curve, *a, **kw)
        godh_keys.append(key)
        return key

    monkeypatch.setattr(sev_session.TransportKeys, "generate", classmethod(capture_keys))
    monkeypatch.setattr(sev_session.ec, "generate_private_key", capture_ec)
    caplog.set_level(logging.DEBUG)

    h = make_owner()
    provision(h, publisher)
    launcher = h.stub()
    chain = emulator_chain(emu)
    opened = launcher.OpenSession(open_req(chain))
    run = launch(emu, opened)
    launcher.ReleaseSecret(run.release_request(opened.session_id, SEV_POLICY))
    bad = launcher.OpenSession(open_req(chain))
    rpc_error(
        lambda: launcher.ReleaseSecret(run.release_request(bad.session_id, SEV_POLICY))
    )  # a refusal too
    emu.decommission(run.handle)
    assert len(generated_keys) == 2 and godh_keys

    needles: list[bytes] = [PASSPHRASE, EXTRA_SECRET]
    for keys in generated_keys:
        needles += [keys.tek, keys.tik]
    for key in godh_keys:
        value = key.private_numbers().private_value
        needles += [value.to_bytes(48, "big"), value.to_bytes(48, "little")]
    kek_text = h.config.kek_file.read_bytes()
    import base64

    needles.append(base64.b64decode(kek_text.strip()))

    stored = b"".join(p.read_bytes() for p in h.config.db.parent.glob("owner.db*"))
    metrics = urllib.request.urlopen(h.running.metrics_url, timeout=5).read()
    logs = "\n".join(r.getMessage() + " " + repr(r.__dict__) for r in caplog.records).encode()
    audit = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).SerializeToString()
    for needle in needles:
        for name, blob in (("db", stored), ("metrics", metrics), ("logs", logs), ("audit", audit)):
            assert needle not in blob, name
            assert needle.hex().encode() not in blob.lower(), name
            assert base64.b64encode(needle) not in blob, name
    assert b"sevlaunch_owner_secrets_released_total 1.0" in metrics
    assert b'sevlaunch_owner_release_refusals_total{reason="measurement_mismatch"}' in metrics
    assert opened.session_id.encode() not in metrics


# ---------------------------------------------------------------------------- reference values


def test_reference_value_imports_and_refusals(make_owner: Any, publisher: Publisher) -> None:
    from sevlaunch.refvalues import KeyType, generate_private_key, sign_envelope

    h = make_owner()
    admin = h.admin
    good = publisher.envelope(digests=reference_digests())
    first = admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=good))
    assert first.newly_imported and first.manifest.digests == 3
    again = admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=good))
    assert not again.newly_imported and again.manifest_id == first.manifest_id
    # A second firmware build valid at the same time (a roll-out).
    admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(
            envelope=publisher.envelope(
                digests=reference_digests(b"\1" * 4096 + OVMF_IMAGE), version="2024.08"
            )
        )
    )
    assert len(admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests) == 2

    import json

    env = json.loads(good)
    unsigned = json.dumps({**env, "signatures": []}).encode()
    stranger = sign_envelope(
        __import__("base64").b64decode(env["payload"]), generate_private_key(KeyType.ECDSA_P256)
    ).to_json()
    tampered_env = dict(env)
    tampered_env["payload"] = (
        __import__("base64")
        .b64encode(__import__("base64").b64decode(env["payload"]).replace(b"test-distro", b"evil-distro"))
        .decode()
    )
    expired = publisher.envelope(
        digests=reference_digests(), valid_days=1, now=datetime.now(UTC) - timedelta(days=3)
    )
    cases = {
        "missing_signature": unsigned,
        "wrong_signer": stranger,
        "bad_signature": json.dumps(tampered_env).encode(),
        "expired": expired,
    }
    before = len(admin.GetAuditLog(owner_pb2.GetAuditLogRequest()).records)
    for reason, envelope in cases.items():
        err = rpc_error(
            lambda e=envelope: admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=e))
        )
        assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, reason)
    refused = h.admin.GetAuditLog(owner_pb2.GetAuditLogRequest(after_seq=before)).records
    assert [r.reason for r in refused] == list(cases)
    # Revocation: a later manifest withdraws the first; re-importing the first is refused.
    admin.ImportReferenceValues(
        owner_pb2.ImportReferenceValuesRequest(
            envelope=publisher.envelope(
                digests=reference_digests(b"\2" * 4096 + OVMF_IMAGE),
                version="2024.09",
                revokes=(first.manifest_id,),
            )
        )
    )
    ids = {m.manifest_id for m in admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests}
    assert first.manifest_id not in ids and len(ids) == 2
    err = rpc_error(
        lambda: admin.ImportReferenceValues(owner_pb2.ImportReferenceValuesRequest(envelope=good))
    )
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")


def test_reference_values_polled_over_http_with_etag(
    make_owner: Any, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    import http.server

    served: dict[str, Any] = {
        "body": publisher.envelope(digests=reference_digests()),
        "etag": '"v1"',
        "hits": [],
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served["hits"].append(self.headers.get("If-None-Match"))
            if self.headers.get("If-None-Match") == served["etag"]:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", served["etag"])
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/ovmf.dsse"
        h = make_owner(refvalues_urls=(url,))
        assert h.app.poller is not None
        h.app.poller.poll_once()
        manifests = h.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
        assert len(manifests) == 1
        h.app.poller.poll_once()
        assert served["hits"] == [None, '"v1"']  # revalidated with the ETag, got 304
        # A new body that fails verification is logged and dropped; the manifest in force stays.
        served["body"], served["etag"] = b'{"payloadType": "x", "payload": "", "signatures": []}', '"v2"'
        caplog.set_level(logging.WARNING)
        h.app.poller.poll_once()
        assert any(r.getMessage() == "reference values rejected" for r in caplog.records)
        assert [
            m.manifest_id
            for m in h.admin.ListReferenceValues(owner_pb2.ListReferenceValuesRequest()).manifests
        ] == [manifests[0].manifest_id]
    finally:
        httpd.shutdown()


# ------------------------------------------------------------------------------------ admin CLI


def test_admin_cli_against_the_service(
    make_owner: Any, publisher: Publisher, emu: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from google.protobuf import json_format

    from sevlaunch.cli import main as cli_main

    h = make_owner()
    common = ["--endpoint", h.running.address, "--tls-dir", str(h.tls_dir)]
    wl = tmp_path / "w.json"
    wl.write_text(json_format.MessageToJson(workload_msg("cli-web"), preserving_proto_field_name=True))
    env = tmp_path / "m.dsse"
    env.write_bytes(publisher.envelope(digests=reference_digests()))
    pw = tmp_path / "luks.txt"
    pw.write_bytes(PASSPHRASE + b"\n")
    assert cli_main(["owner", "refvalues", "import", str(env), *common]) == 0
    assert cli_main(["owner", "workload", "put", "--file", str(wl), *common]) == 0
    assert (
        cli_main(
            ["owner", "secret", "put", "--workload-id", "cli-web", "--passphrase-file", str(pw), *common]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert PASSPHRASE.decode() not in out
    assert cli_main(["owner", "workload", "get", "--workload-id", "cli-web", *common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["has_secret"] and got["accepted_digests_sev"] == 1 and got["accepted_digests_sev_es"] == 2

    opened = h.stub().OpenSession(open_req(emulator_chain(emu), workload_id="cli-web"))
    assert cli_main(["owner", "session", "revoke", "--session-id", opened.session_id, *common]) == 0
    assert cli_main(["owner", "session", "revoke", "--session-id", opened.session_id, *common]) == 1
    assert "session_not_open" in capsys.readouterr().err
    assert cli_main(["owner", "audit", "show", *common, "--json-lines"]) == 0
    actions = [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()]
    assert actions == [
        "import_reference_values",
        "put_workload",
        "put_secret",
        "open_session",
        "revoke_session",
    ]
    # A launcher identity is not an admin.
    assert cli_main(["owner", "sessions", "--identity", "launcher", *common]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- page sizes


def test_list_pages_are_capped_at_the_documented_maximum(make_owner: Any) -> None:
    """GetAuditLog and ListSessions return at most MAX_PAGE records a call, so a reply stays far below
    the clients' 4 MiB receive limit; a larger `limit` is refused (the caller pages with after_seq)."""
    from sevlaunch.audit import MAX_PAGE

    assert MAX_PAGE == 1000
    h = make_owner()
    admin = h.stub("owner-admin")
    before = db_snapshot(h.config.db)
    for call in (
        lambda: admin.GetAuditLog(owner_pb2.GetAuditLogRequest(limit=MAX_PAGE + 1)),
        lambda: admin.GetAuditLog(owner_pb2.GetAuditLogRequest(limit=10_000)),
        lambda: admin.ListSessions(owner_pb2.ListSessionsRequest(limit=MAX_PAGE + 1)),
        lambda: admin.ListSessions(owner_pb2.ListSessionsRequest(limit=10_000)),
    ):
        err = rpc_error(call)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_limit")
    assert db_snapshot(h.config.db) == before
    admin.GetAuditLog(owner_pb2.GetAuditLogRequest(limit=MAX_PAGE))
    admin.ListSessions(owner_pb2.ListSessionsRequest(limit=MAX_PAGE))


def test_audit_show_pages_through_every_record(capsys: pytest.CaptureFixture[str]) -> None:
    """`sevlaunch owner audit show` asks for pages of at most MAX_PAGE and follows after_seq to the end."""
    import argparse
    import json

    from sevlaunch.audit import MAX_PAGE
    from sevlaunch.cli.owner import _audit_show

    total = 2 * MAX_PAGE + 345
    requests: list[tuple[int, int]] = []

    class Stub:
        def GetAuditLog(self, req: owner_pb2.GetAuditLogRequest, timeout: float) -> Any:
            requests.append((req.after_seq, req.limit))
            assert 0 < req.limit <= MAX_PAGE
            seqs = range(req.after_seq + 1, min(req.after_seq + req.limit, total) + 1)
            return owner_pb2.GetAuditLogResponse(
                records=[owner_pb2.AuditRecord(seq=s, action="a") for s in seqs]
            )

    assert _audit_show(Stub(), argparse.Namespace(after=0, limit=0, timeout=5.0, json_lines=True)) == 0  # type: ignore[arg-type]
    seqs = [int(json.loads(line)["seq"]) for line in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(1, total + 1))
    assert [after for after, _ in requests] == [0, MAX_PAGE, 2 * MAX_PAGE]
    # --limit bounds the number printed (paging as needed); --after starts later.
    requests.clear()
    assert _audit_show(Stub(), argparse.Namespace(after=10, limit=1500, timeout=5.0, json_lines=True)) == 0  # type: ignore[arg-type]
    seqs = [int(json.loads(line)["seq"]) for line in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(11, 1511))
    assert requests == [(10, MAX_PAGE), (1010, 500)]
