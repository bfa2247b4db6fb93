"""Why a launch was refused or failed: the `reason` of a FAILED event, of `LaunchInfo`, and the ErrorInfo
reason of a refused call. `protos/sevlaunch/rpc/v1/launcher.proto` documents every member (a test keeps the
two equal).

Three families are not members, since their names come from elsewhere:
* `firmware_<status>`: the emulated hypervisor's firmware refused a launch command with that status
  (`firmware_bad_measurement`, ...); `FIRMWARE_PREFIX`.
* the reasons of `sevlaunch.sev.errors.Reason`: a SEV structure the launcher parsed was malformed;
* an owner's or a platform's own ErrorInfo reason, passed through unchanged (`measurement_mismatch`).
"""

from __future__ import annotations

from enum import StrEnum, unique

FIRMWARE_PREFIX = "firmware_"


@unique
class LaunchReason(StrEnum):
    # the request
    BAD_NAME = "bad_name"
    BAD_MEMORY = "bad_memory"
    BAD_VCPUS = "bad_vcpus"
    BAD_POLICY = "bad_policy"
    POLICY_MODE_MISMATCH = "policy_mode_mismatch"
    BAD_MODE = "bad_mode"
    BAD_KERNEL = "bad_kernel"
    BAD_CMDLINE = "bad_cmdline"
    BAD_DISKS = "bad_disks"
    BAD_DISK_TARGET = "bad_disk_target"
    BAD_DISK_FORMAT = "bad_disk_format"
    BAD_NETWORKS = "bad_networks"
    BAD_NETWORK = "bad_network"
    BAD_VCPU_TYPE = "bad_vcpu_type"
    BAD_ENDPOINT = "bad_endpoint"
    BAD_WORKLOAD = "bad_workload"
    BAD_LAUNCH_ID = "bad_launch_id"
    BAD_PATH = "bad_path"
    PATH_NOT_ALLOWED = "path_not_allowed"
    TOO_LARGE = "too_large"
    BAD_GODH = "bad_godh"
    BAD_SESSION = "bad_session"
    BAD_SECRET_HEADER = "bad_secret_header"  # noqa: S105 - a reason name
    BAD_SECRET_PAYLOAD = "bad_secret_payload"  # noqa: S105 - a reason name
    SECRET_TOO_LARGE = "secret_too_large"  # noqa: S105 - a reason name
    NO_SECRET_TWO_PHASE = "no_secret_two_phase"  # noqa: S105 - a reason name
    BAD_GUEST_FEATURES = "bad_guest_features"
    BAD_VMM_TYPE = "bad_vmm_type"
    SNP_NEEDS_ORCHESTRATED = "snp_needs_orchestrated"
    # the firmware image
    BAD_FIRMWARE = "bad_firmware"
    NO_HASHES_TABLE = "no_hashes_table"
    NO_SEV_ES_RESET_BLOCK = "no_sev_es_reset_block"
    NO_SECRET_AREA = "no_secret_area"  # noqa: S105 - a reason name
    IMAGE_UNREADABLE = "image_unreadable"
    NO_FIRMWARE = "no_firmware"
    NO_SNP_METADATA = "no_snp_metadata"
    # admission and the launcher's own state
    NOT_CONFIGURED = "not_configured"
    LAUNCHER_STOPPING = "launcher_stopping"
    TOO_MANY_LAUNCHES = "too_many_launches"
    NO_FREE_ASID = "no_free_asid"
    LAUNCH_NOT_FOUND = "launch_not_found"
    LAUNCH_NOT_WAITING = "launch_not_waiting"
    LAUNCH_RUNNING = "launch_running"
    LAUNCH_STATE_CHANGED = "launch_state_changed"
    # deadlines, aborts and the reconciler
    PHASE_DEADLINE = "phase_deadline"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ABORTED = "aborted"
    DESTROYED_BY_REQUEST = "destroyed_by_request"
    RESUMED_WITHOUT_SECRET = "resumed_without_secret"  # noqa: S105 - a reason name
    DOMAIN_STOPPED = "domain_stopped"
    LAUNCHER_RESTARTED = "launcher_restarted"
    NOT_ADVANCING = "not_advancing"
    # the owner's answers
    POLICY_MISMATCH = "policy_mismatch"
    BAD_OWNER_REPLY = "bad_owner_reply"
    NO_SECRET_NOT_REQUESTED = "no_secret_not_requested"  # noqa: S105 - a reason name
    NO_SECRET_INJECTED = "no_secret_injected"  # noqa: S105 - a reason name
    BAD_AUTHORIZATION = "bad_authorization"
    ATTESTATION_REFUSED = "attestation_refused"
    NOT_ATTESTED = "not_attested"
    # the hypervisor
    BAD_MEASUREMENT = "bad_measurement"
    SEV_UNSUPPORTED = "sev_unsupported"
    HYPERVISOR_UNSUPPORTED = "hypervisor_unsupported"
    HYPERVISOR_REFUSED = "hypervisor_refused"
    HYPERVISOR_ERROR = "hypervisor_error"
    DOMAIN_XML_REJECTED = "domain_xml_rejected"
    DOMAIN_EXISTS = "domain_exists"
    DOMAIN_NOT_FOUND = "domain_not_found"
    UNSUPPORTED_VCPU_TYPE = "unsupported_vcpu_type"
    NOT_SEV = "not_sev"
    NOT_STARTED = "not_started"
    NOT_MEASURED = "not_measured"
    FIRMWARE_RESOURCE_LIMIT = "firmware_resource_limit"
    SNP_UNSUPPORTED = "snp_unsupported"
    SNP_UNSUPPORTED_BY_LIBVIRT = "snp_unsupported_by_libvirt"
    SNP_LAUNCH_REFUSED = "snp_launch_refused"
    UNSUPPORTED_GUEST_FEATURES = "unsupported_guest_features"
    # what a real libvirtd and QEMU say (launcher_svc/adapters/libvirt_errors.py)
    LOCKED_MEMORY_REFUSED = "locked_memory_refused"
    FIRMWARE_NOT_LOADABLE = "firmware_not_loadable"
    MEASUREMENT_UNAVAILABLE = "measurement_unavailable"
    DOMAIN_NOT_RUNNING = "domain_not_running"
    DOMAIN_NOT_PAUSED = "domain_not_paused"
    DOMAIN_ALREADY_RUNNING = "domain_already_running"
    # the peers (the owner's or platform's own reasons pass through; these are the launcher's)
    OWNER_UNAVAILABLE = "owner_unavailable"
    OWNER_DEADLINE = "owner_deadline"
    OWNER_ERROR = "owner_error"
    OWNER_NOT_AUTHENTICATED = "owner_not_authenticated"
    PLATFORM_UNAVAILABLE = "platform_unavailable"
    PLATFORM_DEADLINE = "platform_deadline"
    PLATFORM_ERROR = "platform_error"
    PLATFORM_NOT_AUTHENTICATED = "platform_not_authenticated"
    INTERNAL = "internal"


def peer_reason(who: str, what: str) -> LaunchReason:
    """`owner_unavailable`, `platform_deadline`, ...: the launcher's reason for a peer's failure."""
    return LaunchReason(f"{who}_{what}")
