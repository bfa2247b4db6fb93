"""A software model of the SEV firmware (the PSP), kept in a state directory.

It implements the SEV API (AMD publication 55766) with the real formats, the real crypto of
`sevlaunch.sev` and the real status codes:

* its own emulated AMD root (ARK and ASK, RSA-4096 in AMD's format), a CEK (ECDSA P-384) signed by
  that ASK, a self-signed OCA, a PEK signed by the OCA and the CEK, a PDH signed by the PEK, and a
  64-byte chip id;
* the platform state machine UNINIT/INIT/WORKING (55766 section 5.1.2) and the platform commands;
* guest contexts with handles and ASIDs from a bounded pool, in the guest state machine
  UNINIT/LUPDATE/LSECRET/RUNNING (55766 section 6.1.1), and the launch commands.

Like `/dev/sev` (Linux's ccp driver INITs the platform on demand) a command that needs an initialised
platform INITs it first; on INIT the firmware creates the OCA, PEK and PDH if none exist (after a
FACTORY_RESET, say).

Every command runs under the chip's exclusive file lock and reloads the state from disk, so several
`EmulatedFirmware` objects in several processes on one directory act as one chip (the platform service
and the launcher's emulated hypervisor share it), and every change is written atomically
(`sevlaunch.firmware.state`). Private keys live in 0600 files of the state directory, as the real ones
live in the PSP's flash; nothing secret appears in a repr, a log or an error.

Nothing trusts the emulated root unless told to: `ask_ark()` (also `<dir>/ask_ark.cert`) is what a
verifier must be given explicitly as an extra root.

It also implements SEV-SNP (AMD publication 56860) for its configured product (Milan, Genoa or Turin,
which decides the report version and the TCB layout): SNP_INIT, SNP_PLATFORM_STATUS, SNP_COMMIT,
SNP_SET_CONFIG, SNP_VLEK_LOAD, an emulated firmware update, SNP_LAUNCH_START/UPDATE/FINISH with the
launch digest built page by page and the ID block checked, and the guest's MSG_REPORT_REQ answered with a
report signed by the VCEK of the reported TCB (derived from a chip secret), chained to an emulated X.509
ARK/ASK (`snp_root_pem()`, `snp_trusted_root()`: trusted only by whoever is handed it).

The package's modules, by what they hold: `layout` (sizes, file names, `EmulatorStateError`), `root` (the
emulated AMD root and key PEM handling), `fields` (typed reading of `state.json`), `codec` (the persistent
chip and guest state and its `state.json` codec), `snp_state` (the SEV-SNP part of it and the products),
`snp_keys` (the emulated SNP root on disk, VCEK/VLEK derivation), `chip` (the state directory, the locked
command, the chip's keys), `commands.platform`, `commands.sev`, `commands.snp` (SNP platform commands and
AMD's side of the SNP keys) and `commands.snp_guest` (SNP launch and the guest request), `firmware`
(`EmulatedFirmware`, which combines them).
"""

from sevlaunch.firmware.emulator.codec import ChipConfig, GuestState
from sevlaunch.firmware.emulator.firmware import EmulatedFirmware
from sevlaunch.firmware.emulator.layout import (
    ARK_CERT,
    ARK_KEY,
    ASK_ARK_CERT,
    ASK_CERT,
    ASK_KEY,
    ATTESTATION_MIN_API,
    CEK_CERT,
    CEK_KEY,
    CHIP_ID_SIZE,
    GUESTS_DIR,
    LAUNCH_DIGEST_SIZE,
    MNONCE_SIZE,
    ROOT_RSA_BITS,
    SECRET_HEADER_SIZE,
    STATE_COMMAND,
    STATE_FILE,
    STATE_FORMAT,
    U32_MAX,
    U64_MAX,
    VMSA_SIZE,
    EmulatorStateError,
)
from sevlaunch.firmware.emulator.root import EmulatedRoot

# Every public name of the single-module emulator, unchanged by the split into modules.
__all__ = [
    "ARK_CERT",
    "ARK_KEY",
    "ASK_ARK_CERT",
    "ASK_CERT",
    "ASK_KEY",
    "ATTESTATION_MIN_API",
    "CEK_CERT",
    "CEK_KEY",
    "CHIP_ID_SIZE",
    "GUESTS_DIR",
    "LAUNCH_DIGEST_SIZE",
    "MNONCE_SIZE",
    "ROOT_RSA_BITS",
    "SECRET_HEADER_SIZE",
    "STATE_COMMAND",
    "STATE_FILE",
    "STATE_FORMAT",
    "U32_MAX",
    "U64_MAX",
    "VMSA_SIZE",
    "ChipConfig",
    "EmulatedFirmware",
    "EmulatedRoot",
    "EmulatorStateError",
    "GuestState",
]
