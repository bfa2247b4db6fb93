"""The guest a client asks for, validated before anything of it reaches libvirt.

Everything here comes from a remote caller: names are restricted to a conservative alphabet, paths must
be absolute, normalised and below a configured image directory (the launcher runs on the host, so a
caller must not be able to make it read /etc/shadow as a kernel), sizes are bounded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from launcher_svc.core.reasons import LaunchReason
from sevlaunch import limits
from sevlaunch.errors import InvalidArgument
from sevlaunch.sev.errors import MalformedInput, Unsupported
from sevlaunch.sev.policy import GuestPolicy
from sevlaunch.sev.technology import Technology
from sevlaunch.sev.vmsa import vcpu_signature
from sevlaunch.snp.policy import SnpGuestPolicy

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
DISK_TARGET_RE = re.compile(r"^vd[a-z]$")
NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WORKLOAD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
ENDPOINT_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]{2,45}\]):[0-9]{1,5}$")

# One set of limits for the service and the CLI (sevlaunch.limits); re-exported under the old names.
MIN_MEMORY_MIB = limits.MIN_MEMORY_MIB
MAX_MEMORY_MIB = limits.MAX_MEMORY_MIB
MAX_VCPUS = limits.MAX_VCPUS
MAX_CMDLINE = 2048  # what the kernel accepts on x86 by default
MAX_DISKS = 16
MAX_NETWORKS = 8

MAX_FIRMWARE_BYTES = 64 << 20
MAX_KERNEL_BYTES = 256 << 20
MAX_INITRD_BYTES = 1 << 30

#: The only VMM this launcher drives (libvirt's QEMU); SNP launch digests depend on the VMM's choices.
SNP_VMM_TYPE = "QEMU"


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True)
class DiskSpec:
    path: str
    target: str
    format: DiskFormat = DiskFormat.RAW
    readonly: bool = False


@dataclass(frozen=True)
class GuestSpec:
    """A validated guest description. Build it with `GuestSpec.create`, which checks every field."""

    name: str
    memory_mib: int
    vcpus: int
    firmware_path: str
    mode: Technology
    policy: int
    kernel_path: str | None = None
    initrd_path: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    networks: tuple[str, ...] = ()
    launch_without_secret: bool = False
    vcpu_type: str | None = None  # a `sevlaunch.sev.vmsa.VCPU_TYPES` name, pinned in the domain XML
    # SEV-SNP only: the VMSA's SEV_FEATURES (None until the launcher pins its QEMU's value).
    guest_features: int | None = None

    @property
    def has_kernel(self) -> bool:
        return self.kernel_path is not None

    @property
    def snp(self) -> bool:
        return self.mode is Technology.SEV_SNP

    def to_json_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "firmware_path": self.firmware_path,
            "mode": self.mode.value,
            "policy": self.policy,
            "kernel_path": self.kernel_path,
            "initrd_path": self.initrd_path,
            "cmdline": self.cmdline,
            "disks": [
                {"path": d.path, "target": d.target, "format": d.format.value, "readonly": d.readonly}
                for d in self.disks
            ],
            "networks": list(self.networks),
            "launch_without_secret": self.launch_without_secret,
            "vcpu_type": self.vcpu_type,
            "guest_features": self.guest_features,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, object]) -> GuestSpec:
        """Re-reads a spec this launcher validated and stored earlier (the database is trusted)."""
        disks_raw = data.get("disks") or []
        networks_raw = data.get("networks") or []
        assert isinstance(disks_raw, list) and isinstance(networks_raw, list)
        return cls(
            name=str(data["name"]),
            memory_mib=int(str(data["memory_mib"])),
            vcpus=int(str(data["vcpus"])),
            firmware_path=str(data["firmware_path"]),
            mode=Technology(str(data["mode"])),
            policy=int(str(data["policy"])),
            kernel_path=_opt_str(data.get("kernel_path")),
            initrd_path=_opt_str(data.get("initrd_path")),
            cmdline=_opt_str(data.get("cmdline")),
            disks=tuple(
                DiskSpec(str(d["path"]), str(d["target"]), DiskFormat(str(d["format"])), bool(d["readonly"]))
                for d in disks_raw
            ),
            networks=tuple(str(n) for n in networks_raw),
            launch_without_secret=bool(data.get("launch_without_secret", False)),
            vcpu_type=_opt_str(data.get("vcpu_type")),
            guest_features=None if data.get("guest_features") is None else int(str(data["guest_features"])),
        )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class PathPolicy:
    """Where guest images may come from. Paths are resolved (symlinks followed) before the check."""

    allowed_dirs: tuple[str, ...] = field(default=("/usr/share/OVMF", "/var/lib/libvirt/images"))

    def check(self, value: str, *, what: str, max_bytes: int | None, must_exist: bool = True) -> str:
        if not value or "\x00" in value or len(value) > 4096:
            raise InvalidArgument(LaunchReason.BAD_PATH, f"{what}: empty or invalid path")
        if not value.startswith("/") or os.path.normpath(value) != value:
            raise InvalidArgument(LaunchReason.BAD_PATH, f"{what}: must be an absolute, normalised path")
        resolved = os.path.realpath(value)
        for root in self.allowed_dirs:
            root_real = os.path.realpath(root)
            if resolved == root_real or resolved.startswith(root_real.rstrip("/") + "/"):
                break
        else:
            raise InvalidArgument(
                LaunchReason.PATH_NOT_ALLOWED,
                f"{what}: {value} is outside the allowed image directories",
                # What to change: the file's place, or the launcher's --image-dir.
                metadata={"field": what, "allowed_dirs": ":".join(self.allowed_dirs),
                          "server_option": "--image-dir"},
            )  # fmt: skip
        if must_exist:
            p = Path(resolved)
            if not p.is_file():
                raise InvalidArgument(LaunchReason.BAD_PATH, f"{what}: {value} is not a regular file")
            size = p.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise InvalidArgument(
                    LaunchReason.TOO_LARGE, f"{what}: {size} bytes exceeds the limit of {max_bytes}"
                )
            if size == 0:
                raise InvalidArgument(LaunchReason.BAD_PATH, f"{what}: {value} is empty")
        return value


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            LaunchReason.BAD_NAME, "name must be 1-48 characters of A-Z a-z 0-9 _ . - (not leading)"
        )
    return name


def validate_vcpu_type(name: str) -> str:
    """A vCPU type the VMSA builder knows (so the owner's reference values can name it too)."""
    try:
        vcpu_signature(name)
    except Unsupported:
        raise InvalidArgument(LaunchReason.BAD_VCPU_TYPE, f"unknown vCPU type {name[:64]!r}") from None
    return name


def validate_endpoint(endpoint: str) -> str:
    if not ENDPOINT_RE.fullmatch(endpoint):
        raise InvalidArgument(LaunchReason.BAD_ENDPOINT, "owner endpoint must be HOST:PORT")
    port = int(endpoint.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise InvalidArgument(LaunchReason.BAD_ENDPOINT, "owner endpoint port out of range")
    return endpoint


def validate_workload(workload: str) -> str:
    if not WORKLOAD_RE.fullmatch(workload):
        raise InvalidArgument(
            LaunchReason.BAD_WORKLOAD, "workload id must be 1-128 characters of A-Z a-z 0-9 _ . : / -"
        )
    return workload


def create_spec(
    *,
    name: str,
    memory_mib: int,
    vcpus: int,
    firmware_path: str,
    mode: Technology,
    policy: int,
    paths: PathPolicy,
    kernel_path: str | None = None,
    initrd_path: str | None = None,
    cmdline: str | None = None,
    disks: tuple[DiskSpec, ...] = (),
    networks: tuple[str, ...] = (),
    launch_without_secret: bool = False,
    vcpu_type: str | None = None,
    guest_features: int | None = None,
    vmm_type: str | None = None,
    kernel_hashes: bool | None = None,
) -> GuestSpec:
    """Validates every field of a guest request; raises `InvalidArgument` with the first problem.

    SEV-SNP only: `guest_features` (the VMSA's SEV_FEATURES; None for the launcher's), `vmm_type` (the
    VMM the owner's reference values assume; only QEMU, the launcher's own), `kernel_hashes` (a kernel
    is always measured through the hashes page: False with a kernel is refused). SNP's `policy` is the
    64-bit guest policy."""
    validate_name(name)
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise InvalidArgument(
            LaunchReason.BAD_MEMORY, f"memory must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} MiB"
        )
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidArgument(LaunchReason.BAD_VCPUS, f"vcpus must be 1..{MAX_VCPUS}")
    if mode is Technology.SEV_SNP:
        _check_snp(
            policy,
            guest_features=guest_features,
            vmm_type=vmm_type,
            kernel_hashes=kernel_hashes,
            has_kernel=kernel_path is not None,
            launch_without_secret=launch_without_secret,
        )
    else:
        if guest_features is not None:
            raise InvalidArgument(LaunchReason.BAD_GUEST_FEATURES, "guest features are for SEV-SNP only")
        if vmm_type is not None:
            raise InvalidArgument(LaunchReason.BAD_VMM_TYPE, "a VMM type is for SEV-SNP only")
        try:
            guest_policy = GuestPolicy(policy)
        except MalformedInput as exc:
            raise InvalidArgument(LaunchReason.BAD_POLICY, str(exc)) from None
        # The ES bit and the mode must agree: the firmware enforces the policy, QEMU picks SEV-ES from
        # the policy too, and a mismatch would launch something else than what the owner attests.
        if guest_policy.requires_es != (mode is Technology.SEV_ES):
            raise InvalidArgument(
                LaunchReason.POLICY_MODE_MISMATCH,
                f"policy {policy:#06x} does not agree with mode {mode.value}",
            )
    paths.check(firmware_path, what="firmware", max_bytes=MAX_FIRMWARE_BYTES)
    if kernel_path is not None:
        paths.check(kernel_path, what="kernel", max_bytes=MAX_KERNEL_BYTES)
    elif initrd_path is not None or cmdline is not None:
        raise InvalidArgument(LaunchReason.BAD_KERNEL, "initrd and cmdline need a kernel")
    if initrd_path is not None:
        paths.check(initrd_path, what="initrd", max_bytes=MAX_INITRD_BYTES)
    if cmdline is not None:
        if len(cmdline) > MAX_CMDLINE or not cmdline.isprintable():
            raise InvalidArgument(
                LaunchReason.BAD_CMDLINE, f"cmdline must be printable and at most {MAX_CMDLINE} characters"
            )
    if len(disks) > MAX_DISKS:
        raise InvalidArgument(LaunchReason.BAD_DISKS, f"at most {MAX_DISKS} disks")
    targets: set[str] = set()
    for disk in disks:
        if not DISK_TARGET_RE.fullmatch(disk.target) or disk.target in targets:
            raise InvalidArgument(LaunchReason.BAD_DISK_TARGET, "disk targets must be distinct vda..vdz")
        targets.add(disk.target)
        paths.check(disk.path, what=f"disk {disk.target}", max_bytes=None)
    if len(networks) > MAX_NETWORKS:
        raise InvalidArgument(LaunchReason.BAD_NETWORKS, f"at most {MAX_NETWORKS} networks")
    for net in networks:
        if not NETWORK_RE.fullmatch(net):
            raise InvalidArgument(
                LaunchReason.BAD_NETWORK, "network names must be 1-64 characters of A-Z a-z 0-9 _ . -"
            )
    if vcpu_type is not None:
        validate_vcpu_type(vcpu_type)
    return GuestSpec(
        name=name,
        memory_mib=memory_mib,
        vcpus=vcpus,
        firmware_path=firmware_path,
        mode=mode,
        policy=policy,
        kernel_path=kernel_path,
        initrd_path=initrd_path,
        cmdline=cmdline,
        disks=disks,
        networks=networks,
        launch_without_secret=launch_without_secret,
        vcpu_type=vcpu_type,
        guest_features=guest_features,
    )


def _check_snp(
    policy: int,
    *,
    guest_features: int | None,
    vmm_type: str | None,
    kernel_hashes: bool | None,
    has_kernel: bool,
    launch_without_secret: bool,
) -> None:
    try:
        SnpGuestPolicy.from_int(policy)
    except MalformedInput as exc:
        raise InvalidArgument(LaunchReason.BAD_POLICY, exc.detail) from None
    if guest_features is not None and not 0 <= guest_features < 1 << 64:
        raise InvalidArgument(LaunchReason.BAD_GUEST_FEATURES, "guest features are a u64")
    if vmm_type is not None and vmm_type.upper() != SNP_VMM_TYPE:
        raise InvalidArgument(
            LaunchReason.BAD_VMM_TYPE, f"this launcher's VMM is {SNP_VMM_TYPE}, not {vmm_type[:32]!r}"
        )
    if has_kernel and kernel_hashes is False:
        raise InvalidArgument(
            LaunchReason.BAD_KERNEL, "an SEV-SNP kernel boot is measured with kernel hashes"
        )
    if launch_without_secret:
        # The owner releases an SNP guest's secret to the guest itself after attestation: the launcher
        # never sees it, so there is nothing to waive.
        raise InvalidArgument(LaunchReason.BAD_MODE, "launch_without_secret is for SEV and SEV-ES launches")
