"""The real libvirt backend against libvirt's test driver, for the calls the test driver implements
(define, list, resume, destroy, undefine, lifecycle events); the SEV calls it lacks must fail closed
with a typed error, never pass silently."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import libvirt
import pytest

from launcher_svc.adapters.libvirt_backend import LibvirtHypervisor, check_cpu_model, libvirt_error
from launcher_svc.core.domain_xml import SevLaunchParams, build_domain_xml
from launcher_svc.core.loader import LoaderType
from launcher_svc.core.ports import DomainState, LifecycleKind
from launcher_svc.core.preflight import SecretArea, read_firmware
from launcher_svc.core.spec import GuestSpec
from sevlaunch.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from sevlaunch.sev.technology import Technology

LAUNCH_ID = "fedcba9876543210fedcba9876543210"
OVMF = Path(__file__).resolve().parents[1] / "vectors" / "measurement" / "ovmf_OvmfX64_suffix.bin"


@pytest.fixture
def hv(tmp_path: Path) -> LibvirtHypervisor:
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")
    h = LibvirtHypervisor(f"test://{node}")
    yield h  # type: ignore[misc]
    h.close()


def _xml(es: bool = False, vcpu_type: str | None = None) -> str:
    spec = GuestSpec(
        name="g",
        memory_mib=256,
        vcpus=2,
        firmware_path=str(OVMF),
        mode=Technology.SEV_ES if es else Technology.SEV,
        policy=0x7 if es else 0x3,
        vcpu_type=vcpu_type,
    )
    return build_domain_xml(
        spec,
        launch_id=LAUNCH_ID,
        domain_name="sl-fedcba987654-g",
        sev=SevLaunchParams(51, 1, spec.policy, b"\x01" * 0x824, b"\x02" * 128),
        loader=LoaderType.PFLASH,
    )


def test_define_list_resume_destroy_with_events(hv: LibvirtHypervisor) -> None:
    events: list[tuple[str, LifecycleKind]] = []
    seen = threading.Event()

    def handler(name: str, kind: LifecycleKind) -> None:
        events.append((name, kind))
        if kind is LifecycleKind.UNDEFINED:
            seen.set()

    hv.set_lifecycle_handler(handler)
    uuid = hv.define(_xml(es=True))
    (dom,) = hv.list_domains()
    assert (dom.uuid, dom.state, dom.sev, dom.sev_es, dom.launch_id) == (
        uuid,
        DomainState.SHUTOFF,
        True,
        True,
        LAUNCH_ID,
    )
    with pytest.raises(AlreadyExists):
        hv.define(_xml())
    # The test driver has no START_PAUSED: a typed refusal, and nothing started.
    with pytest.raises(FailedPrecondition) as err:
        hv.start_paused("sl-fedcba987654-g", read_firmware(str(OVMF)))
    assert err.value.reason in ("hypervisor_unsupported", "hypervisor_refused")
    assert hv.list_domains()[0].state is DomainState.SHUTOFF
    # Start and pause the way the emulated backend does, then resume through the backend.
    hv._conn.lookupByName("sl-fedcba987654-g").create()
    hv._conn.lookupByName("sl-fedcba987654-g").suspend()
    assert hv.list_domains()[0].state is DomainState.PAUSED
    hv.resume("sl-fedcba987654-g")
    assert hv.list_domains()[0].state is DomainState.RUNNING
    assert hv.destroy("sl-fedcba987654-g") is True
    assert hv.list_domains() == []
    assert hv.destroy("sl-fedcba987654-g") is False  # idempotent
    assert seen.wait(5)
    kinds = [k for n, k in events if n == "sl-fedcba987654-g"]
    assert kinds[:1] == [LifecycleKind.STARTED] or LifecycleKind.STARTED in kinds
    assert LifecycleKind.RESUMED in kinds and LifecycleKind.STOPPED in kinds


def test_sev_calls_the_test_driver_lacks_fail_closed(hv: LibvirtHypervisor) -> None:
    hv.define(_xml())
    with pytest.raises(FailedPrecondition) as caps:
        hv.sev_capabilities()
    assert caps.value.reason == "hypervisor_unsupported"
    hv._conn.lookupByName("sl-fedcba987654-g").create()
    with pytest.raises(FailedPrecondition):
        hv.launch_security_info("sl-fedcba987654-g")
    with pytest.raises(FailedPrecondition) as inj:
        hv.inject_secret(
            "sl-fedcba987654-g", b"\x00" * 52, b"\x00" * 32, SecretArea(0x80C000, 3072, declared=False)
        )
    assert inj.value.reason == "hypervisor_unsupported"


def test_libvirt_rejects_bad_xml_as_invalid_argument(hv: LibvirtHypervisor) -> None:
    with pytest.raises(InvalidArgument) as err:
        hv.define(_xml().replace("<cbitpos>51</cbitpos>", "<cbitpos>zz</cbitpos>"))
    assert err.value.reason == "domain_xml_rejected"
    assert hv.list_domains() == []


def test_events_arrive_without_polling(hv: LibvirtHypervisor) -> None:
    got = threading.Event()
    hv.set_lifecycle_handler(lambda name, kind: got.set() if kind is LifecycleKind.STARTED else None)
    hv.define(_xml())
    start = time.monotonic()
    hv._conn.lookupByName("sl-fedcba987654-g").create()
    assert got.wait(5) and time.monotonic() - start < 5


# `virsh domcapabilities --virttype kvm` of libvirt 9.0 (Debian 12) with QEMU 7.2 on an EPYC Milan host,
# abridged: its CPU map knows EPYC, EPYC-IBPB, EPYC-Rome and EPYC-Milan, not Genoa or Turin. (The test
# driver reports no domain capabilities at all.)
DOMCAPS_LIBVIRT_9_0 = """<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>kvm</domain>
  <machine>pc-q35-7.2</machine>
  <arch>x86_64</arch>
  <vcpu max='255'/>
  <cpu>
    <mode name='host-passthrough' supported='yes'>
      <enum name='hostPassthroughMigratable'><value>on</value><value>off</value></enum>
    </mode>
    <mode name='maximum' supported='yes'>
      <enum name='maximumMigratable'><value>on</value><value>off</value></enum>
    </mode>
    <mode name='host-model' supported='yes'>
      <model fallback='forbid'>EPYC-Genoa</model>
      <vendor>AMD</vendor>
      <feature policy='require' name='x2apic'/>
    </mode>
    <mode name='custom' supported='yes'>
      <model usable='yes' vendor='unknown'>qemu64</model>
      <model usable='yes' vendor='AMD'>Opteron_G3</model>
      <model usable='yes' vendor='AMD'>EPYC</model>
      <model usable='yes' vendor='AMD'>EPYC-IBPB</model>
      <model usable='yes' vendor='AMD'>EPYC-Rome</model>
      <model usable='yes' vendor='AMD'>EPYC-Milan</model>
      <model usable='no' vendor='Intel'>Icelake-Server</model>
    </mode>
  </cpu>
  <features>
    <sev supported='yes'>
      <cbitpos>51</cbitpos>
      <reducedPhysBits>1</reducedPhysBits>
      <maxGuests>509</maxGuests>
      <maxESGuests>0</maxESGuests>
    </sev>
  </features>
</domainCapabilities>
"""


def test_pinned_cpu_models_are_checked_against_the_domain_capabilities() -> None:
    for model in ("EPYC", "EPYC-IBPB", "EPYC-Rome", "EPYC-Milan"):
        check_cpu_model(DOMCAPS_LIBVIRT_9_0, model)
    # Genoa is only the host-model here, not a model this libvirt can pin.
    for model, why in (
        ("EPYC-Genoa", "does not know"),
        ("EPYC-Turin", "does not know"),
        ("Icelake-Server", "cannot run"),
    ):
        with pytest.raises(FailedPrecondition) as err:
            check_cpu_model(DOMCAPS_LIBVIRT_9_0, model)
        assert err.value.reason == "unsupported_vcpu_type"
        assert model in err.value.detail and why in err.value.detail


def test_define_refuses_a_cpu_model_the_host_does_not_know_before_defining(
    hv: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[object] = []

    def domcaps(*args: object) -> str:
        asked.append(args)
        return DOMCAPS_LIBVIRT_9_0

    monkeypatch.setattr(hv._conn, "getDomainCapabilities", domcaps)
    for vcpu_type in ("EPYC-Genoa", "EPYC-Genoa-v1", "EPYC-Turin"):
        with pytest.raises(FailedPrecondition) as err:
            hv.define(_xml(es=True, vcpu_type=vcpu_type))
        assert err.value.reason == "unsupported_vcpu_type"
        assert "EPYC-Milan" in err.value.detail  # what the host does offer
        assert hv.list_domains() == []
    hv.define(_xml(es=True, vcpu_type="EPYC-Milan-v2"))
    (dom,) = hv.list_domains()
    assert dom.sev_es and asked
    assert hv.destroy(dom.name)
    hv.define(_xml())  # no pinned model: nothing to check
    assert len(hv.list_domains()) == 1


def test_without_domain_capabilities_define_is_left_to_libvirt(hv: LibvirtHypervisor) -> None:
    # The test driver has none: the check cannot run, and libvirt's own define and start decide.
    hv.define(_xml(es=True, vcpu_type="EPYC-v4"))
    assert len(hv.list_domains()) == 1


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt-python raises it: (code, domain, message, level, ...)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, "", "", "", 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "message"),
    [
        # VIR_ERR_OPERATION_UNSUPPORTED (84): setLaunchSecurityState on a domain without SEV.
        (
            libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            "Operation not supported: launch security type 0 is not supported",
        ),
        # VIR_ERR_CONFIG_UNSUPPORTED (67): SEV asked of a QEMU or host that cannot do it.
        (
            libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
            "unsupported configuration: SEV launch security is not supported with this QEMU binary",
        ),
    ],
    ids=["VIR_ERR_OPERATION_UNSUPPORTED-84", "VIR_ERR_CONFIG_UNSUPPORTED-67"],
)
def test_a_host_without_sev_is_sev_unsupported_not_a_generic_refusal(code: int, message: str) -> None:
    assert (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_ERR_CONFIG_UNSUPPORTED) == (84, 67)
    err = libvirt_error(_libvirt_error(code, message), "inject secret")
    assert (type(err), err.reason) == (FailedPrecondition, "sev_unsupported")
    assert message in err.detail


def test_other_config_errors_stay_the_callers_xml() -> None:
    err = libvirt_error(
        _libvirt_error(libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "unsupported configuration: 2 IOMMUs"), "define"
    )
    assert (type(err), err.reason) == (InvalidArgument, "domain_xml_rejected")
