"""The guest agent against a fake owner (a real gRPC server with server-only TLS, in the test) and a fake
report source: the flow, the CLI, and every failure typed with nothing written."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevlaunch.cli import main as cli_main
from sevlaunch.guest.agent import AgentReason, OwnerRefused, OwnerUnavailable, attest_and_receive
from sevlaunch.guest.owner_client import GrpcOwnerClient
from sevlaunch.guest.source import GuestReport
from sevlaunch.rpc.errors import MappedError
from sevlaunch.rpc.v1 import guest_pb2, guest_pb2_grpc
from sevlaunch.sev.errors import VerificationFailed
from sevlaunch.snp.challenge import check_report_data, new_challenge
from sevlaunch.snp.initdata import InitData
from sevlaunch.snp.report import AttestationReport
from sevlaunch.snp.secret_wrap import SUITE_NAME, SecretUnwrapFailed, seal

SECRET = b"luks passphrase: correct horse battery staple"
MEASUREMENT = b"\x6d" * 48


@dataclass
class FakeOwner(guest_pb2_grpc.OwnerGuestServicer):
    """Issues challenges, and on Attest checks the challenge is its own and unused, the report's
    REPORT_DATA binding and HOST_DATA, that the guest sent no client certificate, then seals SECRET."""

    host_data: bytes = b""
    refuse_with: str = ""
    tamper: bool = False
    issued: set[bytes] = field(default_factory=set)
    attests: list[guest_pb2.AttestRequest] = field(default_factory=list)
    peer_certs: list[object] = field(default_factory=list)

    def GetChallenge(
        self, request: guest_pb2.GetChallengeRequest, context: grpc.ServicerContext
    ) -> guest_pb2.GetChallengeResponse:
        challenge = new_challenge()
        self.issued.add(challenge)
        return guest_pb2.GetChallengeResponse(challenge=challenge)

    def Attest(
        self, request: guest_pb2.AttestRequest, context: grpc.ServicerContext
    ) -> guest_pb2.AttestResponse:
        self.attests.append(request)
        self.peer_certs.append(context.auth_context().get("x509_pem_cert"))
        if self.refuse_with:
            context.abort_with_status(
                MappedError(grpc.StatusCode.PERMISSION_DENIED, "refused", self.refuse_with).to_status()
            )
        if request.challenge not in self.issued:
            context.abort_with_status(
                MappedError(grpc.StatusCode.FAILED_PRECONDITION, "used", "challenge_used").to_status()
            )
        self.issued.discard(request.challenge)
        report = AttestationReport.from_bytes(request.report)
        check_report_data(report.report_data, request.challenge, request.guest_public_key)
        assert report.host_data == self.host_data
        wrapped = seal(
            SECRET,
            request.guest_public_key,
            authorization_id=request.authorization_id,
            challenge=request.challenge,
        )
        ciphertext = (
            wrapped.ciphertext[:-1] + bytes([wrapped.ciphertext[-1] ^ 1])
            if self.tamper
            else wrapped.ciphertext
        )
        return guest_pb2.AttestResponse(hpke_enc=wrapped.enc, ciphertext=ciphertext, suite=SUITE_NAME)


@dataclass
class FakeSource:
    """A firmware stand-in: reports binding the REPORT_DATA asked for, signed by a key of its own."""

    host_data: bytes
    honest: bool = True
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    asked: list[bytes] = field(default_factory=list)

    def get_report(self, report_data: bytes, vmpl: int) -> GuestReport:
        self.asked.append(report_data)
        rd = report_data if self.honest else bytes(64)
        report = AttestationReport(
            report_data=rd, host_data=self.host_data, measurement=MEASUREMENT, vmpl=vmpl
        )
        return GuestReport(report.signed(self.key).to_bytes(), b"\x00" * 24)


@pytest.fixture
def owner(tls_dir: Path) -> Iterator[tuple[FakeOwner, int]]:
    servicer = FakeOwner()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    guest_pb2_grpc.add_OwnerGuestServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((tls_dir / "owner.key").read_bytes(), (tls_dir / "owner.pem").read_bytes())],
        require_client_auth=False,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None)


def _init(ca_dir: Path, port: int) -> InitData:
    return InitData.new(
        endpoint=f"https://127.0.0.1:{port}",
        ca_pem=(ca_dir / "ca.pem").read_text(),
        authorization_id="auth-42",
    )


def test_flow_receives_the_secret(owner: tuple[FakeOwner, int], tls_dir: Path) -> None:
    fake, port = owner
    init = _init(tls_dir, port)
    fake.host_data = init.host_data
    source = FakeSource(init.host_data)
    with GrpcOwnerClient(init, timeout=10) as client:
        released = attest_and_receive(init, client, source)
    assert released.secret == SECRET and released.measurement == MEASUREMENT
    assert SECRET.decode() not in repr(released)
    (request,) = fake.attests
    assert request.authorization_id == "auth-42" and len(request.guest_public_key) == 97
    assert request.cert_table == b"\x00" * 24
    assert fake.peer_certs == [None]  # the guest presents no client certificate
    assert source.asked and not fake.issued  # the challenge was spent


def test_cli_writes_the_secret_0600(
    owner: tuple[FakeOwner, int], tls_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake, port = owner
    init = _init(tls_dir, port)
    fake.host_data = init.host_data
    (tmp_path / "init.json").write_bytes(init.to_bytes() + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("sevlaunch.cli.guest.report_source", lambda name: FakeSource(init.host_data))
    assert cli_main(["guest", "attest", "--init-data", str(tmp_path / "init.json"), "--out", str(out)]) == 0
    secret = out / "secret"
    assert secret.read_bytes() == SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    printed = capsys.readouterr()
    assert "auth-42" in printed.out and SECRET.decode() not in printed.out + printed.err


def test_cli_refusal_writes_nothing(
    owner: tuple[FakeOwner, int], tls_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    fake, port = owner
    init = _init(tls_dir, port)
    fake.refuse_with = "measurement_mismatch"
    (tmp_path / "init.json").write_bytes(init.to_bytes())
    monkeypatch.setattr("sevlaunch.cli.guest.report_source", lambda name: FakeSource(init.host_data))
    assert (
        cli_main(["guest", "attest", "--init-data", str(tmp_path / "init.json"), "--out", str(tmp_path)]) == 1
    )
    assert "measurement_mismatch" in capsys.readouterr().err
    assert not (tmp_path / "secret").exists()


def test_owner_refusal_is_typed(owner: tuple[FakeOwner, int], tls_dir: Path) -> None:
    fake, port = owner
    init = _init(tls_dir, port)
    fake.refuse_with = "host_data_mismatch"
    with GrpcOwnerClient(init, timeout=10) as client, pytest.raises(OwnerRefused) as err:
        attest_and_receive(init, client, FakeSource(init.host_data))
    assert err.value.reason is AgentReason.OWNER_REFUSED and err.value.owner_reason == "host_data_mismatch"


def test_owner_certificate_from_another_ca_is_refused(
    owner: tuple[FakeOwner, int], foreign_tls_dir: Path
) -> None:
    fake, port = owner
    init = _init(foreign_tls_dir, port)  # the init data names a CA that did not issue the owner's certificate
    with GrpcOwnerClient(init, timeout=5) as client, pytest.raises(OwnerUnavailable) as err:
        attest_and_receive(init, client, FakeSource(init.host_data))
    assert err.value.reason is AgentReason.OWNER_UNAVAILABLE
    assert fake.attests == [] and not fake.issued


def test_own_report_checked_before_sending(owner: tuple[FakeOwner, int], tls_dir: Path) -> None:
    fake, port = owner
    init = _init(tls_dir, port)
    with GrpcOwnerClient(init, timeout=10) as client:
        with pytest.raises(VerificationFailed) as err:
            attest_and_receive(init, client, FakeSource(b"\x01" * 32))
        assert err.value.reason is AgentReason.HOST_DATA_MISMATCH
        with pytest.raises(VerificationFailed) as err:
            attest_and_receive(init, client, FakeSource(init.host_data, honest=False))
        assert err.value.reason is AgentReason.REPORT_DATA_MISMATCH
    assert fake.attests == []


def test_tampered_answer_does_not_open(owner: tuple[FakeOwner, int], tls_dir: Path) -> None:
    fake, port = owner
    init = _init(tls_dir, port)
    fake.host_data, fake.tamper = init.host_data, True
    with GrpcOwnerClient(init, timeout=10) as client, pytest.raises(SecretUnwrapFailed):
        attest_and_receive(init, client, FakeSource(init.host_data))


def test_owner_down_is_unavailable(tls_dir: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = _init(tls_dir, port)
    with GrpcOwnerClient(init, timeout=2) as client, pytest.raises(OwnerUnavailable):
        attest_and_receive(init, client, FakeSource(init.host_data))


def test_guest_help_does_not_need_a_guest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["guest", "attest", "--help"])
    assert exc.value.code == 0
    assert "--init-data" in capsys.readouterr().out
