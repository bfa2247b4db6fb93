"""The plain SEV launch digest skips the OVMF and LaunchUpdate models (`sevlaunch.sev.footer` does the
checks): it must agree with the full path, `digest_updates(launch_updates(...))`, on every image,
digest for digest and error for error. Also: the footer module's GUID bytes are the UUIDs ovmf names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevlaunch.sev import footer
from sevlaunch.sev.digest import LaunchUpdate, digest_updates, launch_digest, launch_updates
from sevlaunch.sev.errors import MalformedInput, SevError
from sevlaunch.sev.launch_update import LaunchUpdate as DefinedLaunchUpdate
from sevlaunch.sev.ovmf import (
    FOOTER_GUID,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_GUID,
    SEV_SECRET_AREA_GUID,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "measurement"
_FIXTURE = (VECTORS / "ovmf_AmdSev_suffix.bin").read_bytes()


def _outcome(fn: object, image: bytes) -> tuple[str, object]:
    try:
        return "digest", fn(image)  # type: ignore[operator]
    except (SevError, ValueError) as exc:
        return type(exc).__name__, (getattr(exc, "reason", None), str(exc))


def _fast(image: bytes) -> bytes:
    return launch_digest(image, mode="sev")


def _full(image: bytes) -> bytes:
    return digest_updates(launch_updates(image, mode="sev"))


def test_guid_constants_are_ovmfs() -> None:
    assert footer.FOOTER_GUID_LE == FOOTER_GUID.bytes_le
    assert footer.SEV_ES_RESET_BLOCK_GUID_LE == SEV_ES_RESET_BLOCK_GUID.bytes_le
    assert footer.SEV_SECRET_AREA_GUID_LE == SEV_SECRET_AREA_GUID.bytes_le
    assert footer.SEV_HASH_TABLE_GUID_LE == SEV_HASH_TABLE_GUID.bytes_le


@given(raw=st.binary(min_size=16, max_size=16))
def test_guid_text_is_uuids(raw: bytes) -> None:
    assert footer.guid_text(raw) == str(UUID(bytes_le=raw))


def test_launch_update_is_reexported() -> None:
    assert LaunchUpdate is DefinedLaunchUpdate
    with pytest.raises(AttributeError):
        from sevlaunch.sev import digest

        digest.NoSuchName  # noqa: B018


def test_real_fixture_agrees() -> None:
    image = bytes(4096 * 15) + _FIXTURE
    assert _outcome(_fast, image) == _outcome(_full, image)
    assert _outcome(_fast, image)[0] == "digest"


@pytest.mark.parametrize("image", [b"", bytes(49), bytes(50), bytes(4095), bytes(4096), _FIXTURE[1:]])
def test_short_and_misaligned_images_agree(image: bytes) -> None:
    fast = _outcome(_fast, image)
    assert fast == _outcome(_full, image)


def test_duplicate_entry_is_refused_alike() -> None:
    from sevlaunch.sev.ovmf import FooterEntry, FooterTable

    entry = FooterEntry(SEV_SECRET_AREA_GUID, bytes(8))
    body = entry.to_bytes() * 2
    table = body + (len(body) + 18).to_bytes(2, "little") + FOOTER_GUID.bytes_le
    image = bytes(4096 - len(table) - 32) + table + bytes(32)
    fast = _outcome(_fast, image)
    assert fast[0] == "MalformedInput" and "twice" in str(fast[1])
    assert fast == _outcome(_full, image)
    with pytest.raises(MalformedInput):
        FooterTable((entry, entry))


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(1, 300), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 4096 - 60),
)
def test_mangled_footers_agree(flips: list[tuple[int, int]], cut: int) -> None:
    image = bytearray(_FIXTURE)
    for back, value in flips:
        image[-back] = value
    data = bytes(image[cut:])
    assert _outcome(_fast, data) == _outcome(_full, data)


def test_plain_sev_digest_command_loads_no_models() -> None:
    """What the start-up saving rests on: the SEV digest path never imports these."""
    firmware = str(VECTORS / "ovmf_AmdSev_suffix.bin")
    code = (
        "import sys\n"
        "from sevlaunch.cli import main\n"
        f"main(['measurement', 'digest', '--mode', 'sev', '--firmware', {firmware!r}])\n"
        "print(sorted(m for m in ('dataclasses', 'uuid', 'sevlaunch.sev.ovmf', 'sevlaunch.sev.vmsa',"
        " 'sevlaunch.sev.kernel_hashes', 'sevlaunch.sev.launch_update') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == "[]"
