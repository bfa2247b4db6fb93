"""The ctypes structures of the SNP kernel interfaces against the kernel's own headers, at test time.

A C program is generated, compiled with gcc against a header and run: it prints every structure's
`sizeof`, every member's `offsetof`/`sizeof`, the bytes of each bit field set to all ones, the ioctl
numbers and enum values, and whole structures filled with sample values. Nothing here is a number typed
from the header: each Python value is compared with what the compiler made of the header.

Headers: the machine's `linux-libc-dev` (`<linux/psp-sev.h>`, `<linux/sev-guest.h>`; bookworm's 6.1 has
no SNP host commands, so its psp-sev.h is checked for the SEV structures only unless it has them) and a
current one, Debian unstable's `linux-libc-dev` unpacked into .cache/linux-uapi by
`scripts/fetch-unstable-packages`. `./run` installs gcc and the headers and fetches the current ones; a
machine without them fails these tests rather than skipping them.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sevlaunch.firmware import devsev, devsev_snp
from sevlaunch.firmware.devsev_snp import SnpConfig, SnpPlatformState, SnpPlatformStatus
from sevlaunch.firmware.status import StatusCode
from sevlaunch.guest import devsevguest

# The include root (its linux/ holds the headers): -I on linux/ itself would shadow <stddef.h>.
NEWER = Path(__file__).resolve().parents[2] / ".cache" / "linux-uapi" / "usr" / "include"
INSTALLED = Path("/usr/include/linux")

SEV_STRUCTS: list[type[ctypes.Structure]] = [
    devsev.sev_issue_cmd,
    devsev.sev_user_data_status,
    devsev.sev_user_data_pek_csr,
    devsev.sev_user_data_pek_cert_import,
    devsev.sev_user_data_pdh_cert_export,
    devsev.sev_user_data_get_id,
    devsev.sev_user_data_get_id2,
]
SNP_STRUCTS: list[type[ctypes.Structure]] = [
    devsev_snp.sev_user_data_snp_status,
    devsev_snp.sev_user_data_snp_config,
    devsev_snp.sev_user_data_snp_vlek_load,
    devsev_snp.sev_user_data_snp_wrapped_vlek_hashstick,
]
GUEST_STRUCTS: list[type[ctypes.Structure]] = [
    devsevguest.snp_report_req,
    devsevguest.snp_report_resp,
    devsevguest.snp_guest_request_ioctl,
    devsevguest.snp_ext_report_req,
]

# The kernel's names for the SNP-era StatusCode members (psp-sev.h sev_ret_code).
KERNEL_STATUS_NAMES = {
    "SEV_RET_INVALID_PAGE_SIZE": StatusCode.INVALID_PAGE_SIZE,
    "SEV_RET_INVALID_PAGE_STATE": StatusCode.INVALID_PAGE_STATE,
    "SEV_RET_INVALID_MDATA_ENTRY": StatusCode.INVALID_MDATA_ENTRY,
    "SEV_RET_INVALID_PAGE_OWNER": StatusCode.INVALID_PAGE_OWNER,
    "SEV_RET_AEAD_OFLOW": StatusCode.AEAD_OFLOW,
    "SEV_RET_EXIT_RING_BUFFER": StatusCode.RING_BUFFER_EXIT,
    "SEV_RET_RMP_INIT_REQUIRED": StatusCode.RMP_INIT_REQUIRED,
    "SEV_RET_BAD_SVN": StatusCode.BAD_SVN,
    "SEV_RET_BAD_VERSION": StatusCode.BAD_VERSION,
    "SEV_RET_SHUTDOWN_REQUIRED": StatusCode.SHUTDOWN_REQUIRED,
    "SEV_RET_UPDATE_FAILED": StatusCode.UPDATE_FAILED,
    "SEV_RET_RESTORE_REQUIRED": StatusCode.RESTORE_REQUIRED,
    "SEV_RET_RMP_INITIALIZATION_FAILED": StatusCode.RMP_INITIALIZATION_FAILED,
    "SEV_RET_INVALID_KEY": StatusCode.INVALID_KEY,
    "SEV_RET_INVALID_PARAM": StatusCode.INVALID_PARAM,
    "SEV_RET_SECURE_DATA_INVALID": StatusCode.SECURE_DATA_INVALID,
}
SNP_COMMANDS = {
    "SNP_PLATFORM_STATUS": devsev_snp.SnpCmd.PLATFORM_STATUS,
    "SNP_COMMIT": devsev_snp.SnpCmd.COMMIT,
    "SNP_SET_CONFIG": devsev_snp.SnpCmd.SET_CONFIG,
    "SNP_VLEK_LOAD": devsev_snp.SnpCmd.VLEK_LOAD,
}

# Sample values the C program stores through the header's own member names (bit fields included);
# the Python side must decode the resulting bytes to exactly these.
STATUS_SAMPLES = [
    SnpPlatformStatus(
        api_major=1,
        api_minor=55,
        state=SnpPlatformState.INIT,
        is_rmp_initialized=True,
        build_id=0x15,
        mask_chip_id=True,
        mask_chip_key=False,
        vlek_en=True,
        feature_info=False,
        rapl_dis=True,
        ciphertext_hiding_cap=False,
        ciphertext_hiding_en=True,
        guest_count=7,
        current_tcb=0xDB18_0000_0000_0004,
        reported_tcb=0x1500_0000_0000_0003,
    ),
    SnpPlatformStatus(
        api_major=0xFE,
        api_minor=0x01,
        state=SnpPlatformState.UNINIT,
        is_rmp_initialized=False,
        build_id=0xA1B2C3D4,
        mask_chip_id=False,
        mask_chip_key=True,
        vlek_en=False,
        feature_info=True,
        rapl_dis=False,
        ciphertext_hiding_cap=True,
        ciphertext_hiding_en=False,
        guest_count=0xFFFF_FFFE,
        current_tcb=0x0102_0304_0506_0708,
        reported_tcb=0xFFFF_FFFF_FFFF_FFFF,
    ),
]
CONFIG_SAMPLES = [
    SnpConfig(reported_tcb=0x1122_3344_5566_7788, mask_chip_id=True, mask_chip_key=False),
    SnpConfig(reported_tcb=0xDB18_0000_0000_0004, mask_chip_id=False, mask_chip_key=True),
]


@dataclass
class Layout:
    """What one compiled program printed."""

    sizes: dict[str, int] = field(default_factory=dict)
    offsets: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    bits: dict[tuple[str, str], bytes] = field(default_factory=dict)
    consts: dict[str, int] = field(default_factory=dict)
    samples: dict[str, bytes] = field(default_factory=dict)


def _leaves(struct_type: type[ctypes.Structure | ctypes.Union]) -> Iterator[tuple[str, int | None]]:
    """(member name, bit width or None) of a structure, anonymous members flattened as C names them."""
    anonymous = set(getattr(struct_type, "_anonymous_", ()))
    for entry in struct_type._fields_:
        name, ctype = entry[0], entry[1]
        if name in anonymous:
            yield from _leaves(ctype)
        else:
            yield name, (entry[2] if len(entry) == 3 else None)


def _c_dump(label: str, expr: str) -> str:
    return f'dump("{label}", &{expr}, sizeof({expr}));'


def _struct_checks(struct_type: type[ctypes.Structure]) -> list[str]:
    name = struct_type.__name__
    lines = [f'printf("size {name} %zu\\n", sizeof(struct {name}));']
    for member, width in _leaves(struct_type):
        if width is None:
            lines.append(
                f'printf("offset {name} {member} %zu %zu\\n", offsetof(struct {name}, {member}), '
                f"sizeof(((struct {name} *)0)->{member}));"
            )
        else:
            lines.append(
                f"{{ struct {name} v; memset(&v, 0, sizeof v); v.{member} = ~0ULL; "
                + _c_dump(f"bits {name} {member}", "v")
                + " }"
            )
    return lines


def _status_sample(index: int, sample: SnpPlatformStatus) -> str:
    assigns = "".join(
        f"v.{member} = {value}ULL; "
        for member, value in (
            ("api_major", sample.api_major),
            ("api_minor", sample.api_minor),
            ("state", int(sample.state)),
            ("is_rmp_initialized", int(sample.is_rmp_initialized)),
            ("build_id", sample.build_id),
            ("mask_chip_id", int(sample.mask_chip_id)),
            ("mask_chip_key", int(sample.mask_chip_key)),
            ("vlek_en", int(sample.vlek_en)),
            ("feature_info", int(sample.feature_info)),
            ("rapl_dis", int(sample.rapl_dis)),
            ("ciphertext_hiding_cap", int(sample.ciphertext_hiding_cap)),
            ("ciphertext_hiding_en", int(sample.ciphertext_hiding_en)),
            ("guest_count", sample.guest_count),
            ("current_tcb_version", sample.current_tcb),
            ("reported_tcb_version", sample.reported_tcb),
        )
    )
    return (
        f"{{ struct sev_user_data_snp_status v; memset(&v, 0, sizeof v); {assigns}"
        + _c_dump(f"sample status{index}", "v")
        + " }"
    )


def _config_sample(index: int, sample: SnpConfig) -> str:
    return (
        "{ struct sev_user_data_snp_config v; memset(&v, 0, sizeof v); "
        f"v.reported_tcb = {sample.reported_tcb}ULL; v.mask_chip_id = {int(sample.mask_chip_id)}; "
        f"v.mask_chip_key = {int(sample.mask_chip_key)}; " + _c_dump(f"sample config{index}", "v") + " }"
    )


HOST_SAMPLES_C = [
    *(_status_sample(i, s) for i, s in enumerate(STATUS_SAMPLES)),
    *(_config_sample(i, s) for i, s in enumerate(CONFIG_SAMPLES)),
    "{ struct sev_user_data_snp_vlek_load v; memset(&v, 0, sizeof v); v.len = sizeof v; "
    "v.vlek_wrapped_version = 0; v.vlek_wrapped_address = 0x1122334455667788ULL; "
    + _c_dump("sample vlek_load", "v")
    + " }",
]
GUEST_SAMPLES_C = [
    "{ struct snp_guest_request_ioctl v; memset(&v, 0, sizeof v); v.msg_version = 1; "
    "v.req_data = 0x1111222233334444ULL; v.resp_data = 0x5555666677778888ULL; v.fw_error = 0x16; "
    "v.vmm_error = 1; " + _c_dump("sample guest_request", "v") + " }",
    "{ struct snp_ext_report_req v; int i; memset(&v, 0, sizeof v); "
    "for (i = 0; i < 64; i++) v.data.user_data[i] = (unsigned char)(i * 3 + 1); v.data.vmpl = 2; "
    "v.certs_address = 0x0123456789ABCDEFULL; v.certs_len = 0x3000; "
    + _c_dump("sample ext_report_req", "v")
    + " }",
]

_PROLOGUE = """\
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include {header}

static void dump(const char *label, const void *p, size_t n) {{
    const unsigned char *b = p;
    size_t i;
    printf("%s ", label);
    for (i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\\n");
}}

int main(void) {{
"""


def _program(header: str, structs: list[type[ctypes.Structure]], consts: list[str], extra: list[str]) -> str:
    body = [line for struct_type in structs for line in _struct_checks(struct_type)]
    body += [f'printf("const {c} %lld\\n", (long long)({c}));' for c in consts]
    body += extra
    return (
        _PROLOGUE.format(header=header) + "\n".join(f"    {line}" for line in body) + "\n    return 0;\n}\n"
    )


def _compile_and_run(source: str, workdir: Path, include: Path | None) -> Layout:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required for the kernel layout tests (./run installs it)"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "layout.c").write_text(source)
    command = [
        gcc,
        "-std=gnu11",
        "-Wall",
        "-Wno-overflow",
        "-o",
        str(workdir / "layout"),
        str(workdir / "layout.c"),
    ]
    if include is not None:
        assert (include / "linux" / "psp-sev.h").is_file(), (
            f"{include} has no current kernel headers: run scripts/fetch-unstable-packages (./run test does)"
        )
        command[1:1] = ["-I", str(include)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"compiling against the header failed:\n{built.stderr}"
    ran = subprocess.run([str(workdir / "layout")], capture_output=True, text=True, check=True)
    layout = Layout()
    for line in ran.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            layout.sizes[rest[0]] = int(rest[1])
        elif kind == "offset":
            layout.offsets[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "bits":
            layout.bits[(rest[0], rest[1])] = bytes.fromhex(rest[2])
        elif kind == "const":
            layout.consts[rest[0]] = int(rest[1])
        elif kind == "sample":
            layout.samples[rest[0]] = bytes.fromhex(rest[1])
    return layout


def _installed(name: str) -> Path:
    path = INSTALLED / name
    assert path.is_file(), f"{path} is missing: the layout tests need linux-libc-dev (./run installs it)"
    return path


def _installed_psp_has_snp() -> bool:
    return "SNP_PLATFORM_STATUS" in _installed("psp-sev.h").read_text()


@pytest.fixture(scope="module")
def host_current(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    source = _program(
        '"linux/psp-sev.h"',
        SEV_STRUCTS + SNP_STRUCTS,
        ["SEV_ISSUE_CMD", *SNP_COMMANDS, *KERNEL_STATUS_NAMES],
        HOST_SAMPLES_C,
    )
    return _compile_and_run(source, tmp_path_factory.mktemp("host-current"), NEWER)


@pytest.fixture(scope="module")
def host_installed(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    snp = _installed_psp_has_snp()
    source = _program(
        "<linux/psp-sev.h>",
        SEV_STRUCTS + (SNP_STRUCTS if snp else []),
        ["SEV_ISSUE_CMD", *(SNP_COMMANDS if snp else [])],
        HOST_SAMPLES_C if snp else [],
    )
    return _compile_and_run(source, tmp_path_factory.mktemp("host-installed"), None)


GUEST_CONSTS = [
    "SNP_GET_REPORT",
    "SNP_GET_EXT_REPORT",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "SNP_GUEST_VMM_ERR_BUSY",
]


@pytest.fixture(scope="module", params=["installed", "current"])
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    if request.param == "installed":
        _installed("sev-guest.h")
        header, include = "<linux/sev-guest.h>", None
    else:
        header, include = '"linux/sev-guest.h"', NEWER
    source = _program(header, GUEST_STRUCTS, GUEST_CONSTS, GUEST_SAMPLES_C)
    return _compile_and_run(source, tmp_path_factory.mktemp(f"guest-{request.param}"), include)


def _assert_layout(layout: Layout, structs: list[type[ctypes.Structure]]) -> None:
    for struct_type in structs:
        name = struct_type.__name__
        assert ctypes.sizeof(struct_type) == layout.sizes[name], name
        for member, width in _leaves(struct_type):
            if width is None:
                descriptor = getattr(struct_type, member)
                assert (descriptor.offset, descriptor.size) == layout.offsets[(name, member)], (name, member)
            else:
                value = struct_type()
                setattr(value, member, (1 << width) - 1)
                assert bytes(value) == layout.bits[(name, member)], (name, member)


def test_every_header_member_was_checked(host_current: Layout, guest: Layout) -> None:
    # Guards the generator itself: every struct and member produced a line.
    for layout, structs in ((host_current, SEV_STRUCTS + SNP_STRUCTS), (guest, GUEST_STRUCTS)):
        for struct_type in structs:
            assert struct_type.__name__ in layout.sizes
            for member, width in _leaves(struct_type):
                table = layout.offsets if width is None else layout.bits
                assert (struct_type.__name__, member) in table


def test_host_structures_match_current_header(host_current: Layout) -> None:
    _assert_layout(host_current, SEV_STRUCTS + SNP_STRUCTS)


def test_host_structures_match_installed_header(host_installed: Layout) -> None:
    _assert_layout(host_installed, SEV_STRUCTS + (SNP_STRUCTS if _installed_psp_has_snp() else []))
    assert host_installed.consts["SEV_ISSUE_CMD"] == devsev.SEV_ISSUE_CMD


def test_guest_structures_match_header(guest: Layout) -> None:
    _assert_layout(guest, GUEST_STRUCTS)


def test_ioctl_numbers_and_command_ids(host_current: Layout, guest: Layout) -> None:
    assert host_current.consts["SEV_ISSUE_CMD"] == devsev.SEV_ISSUE_CMD
    for name, value in SNP_COMMANDS.items():
        assert host_current.consts[name] == value, name
    assert guest.consts["SNP_GET_REPORT"] == devsevguest.SNP_GET_REPORT
    assert guest.consts["SNP_GET_EXT_REPORT"] == devsevguest.SNP_GET_EXT_REPORT
    assert guest.consts["SNP_GUEST_VMM_ERR_INVALID_LEN"] == devsevguest.VMM_ERR_INVALID_LEN
    assert guest.consts["SNP_GUEST_VMM_ERR_BUSY"] == devsevguest.VMM_ERR_BUSY


def test_snp_status_codes_match_current_enum(host_current: Layout) -> None:
    for name, code in KERNEL_STATUS_NAMES.items():
        assert host_current.consts[name] == int(code), name


@pytest.mark.parametrize("index", range(len(STATUS_SAMPLES)))
def test_snp_status_decodes_what_c_packed(host_current: Layout, index: int) -> None:
    raw = host_current.samples[f"status{index}"]
    assert SnpPlatformStatus.from_bytes(raw) == STATUS_SAMPLES[index]
    assert STATUS_SAMPLES[index].to_bytes() == raw


@pytest.mark.parametrize("index", range(len(CONFIG_SAMPLES)))
def test_snp_config_encodes_as_c_packs(host_current: Layout, index: int) -> None:
    raw = host_current.samples[f"config{index}"]
    assert CONFIG_SAMPLES[index].to_bytes() == raw
    assert SnpConfig.from_bytes(raw) == CONFIG_SAMPLES[index]


def test_vlek_load_encodes_as_c_packs(host_current: Layout) -> None:
    value = devsev_snp.sev_user_data_snp_vlek_load(
        len=ctypes.sizeof(devsev_snp.sev_user_data_snp_vlek_load),
        vlek_wrapped_version=devsev_snp.VLEK_WRAPPED_VERSION,
        vlek_wrapped_address=0x1122334455667788,
    )
    assert bytes(value) == host_current.samples["vlek_load"]


def test_guest_request_union_decodes_what_c_packed(guest: Layout) -> None:
    value = devsevguest.snp_guest_request_ioctl.from_buffer_copy(guest.samples["guest_request"])
    assert (value.msg_version, value.req_data, value.resp_data) == (1, 0x1111222233334444, 0x5555666677778888)
    assert (value.fw_error, value.vmm_error) == (0x16, 1)
    assert value.exitinfo2 == (1 << 32) | 0x16  # bits 63:32 VMM error, 31:0 firmware error


def test_ext_report_request_encodes_as_c_packs(guest: Layout) -> None:
    req = devsevguest.snp_ext_report_req(certs_address=0x0123456789ABCDEF, certs_len=0x3000)
    req.data.vmpl = 2
    ctypes.memmove(req.data.user_data, bytes((i * 3 + 1) & 0xFF for i in range(64)), 64)
    assert bytes(req) == guest.samples["ext_report_req"]
