"""`EmulatedFirmware`: the chip with every command group, and what only an emulator offers (the KDS's
ASK-signed CEK, the root to trust explicitly, the full chain)."""

from __future__ import annotations

from sevlaunch.firmware.emulator.commands.platform import PlatformCommands
from sevlaunch.firmware.emulator.commands.sev import SevGuestCommands
from sevlaunch.firmware.emulator.commands.snp_guest import SnpGuestCommands
from sevlaunch.firmware.emulator.layout import ASK_ARK_CERT, ASK_KEY
from sevlaunch.firmware.emulator.root import load_rsa
from sevlaunch.sev.cert import CERT_SIZE, Algorithm, Usage


class EmulatedFirmware(PlatformCommands, SevGuestCommands, SnpGuestCommands):
    """A software PSP implementing `LaunchFirmware` and the SEV-SNP commands, persisted in `state_dir`.

    Opening a directory without a chip creates one (with `config`, and `root` when given, else a fresh
    emulated AMD root) unless `create=False`. Opening an existing chip with a different explicit
    `config` is an error.
    """

    def __repr__(self) -> str:
        return (
            f"EmulatedFirmware(state_dir={str(self.state_dir)!r}, generation={self.config.generation!r}, "
            f"product={self.config.product!r})"
        )

    def kds_cek(self) -> bytes:
        """The CEK signed by the emulated ASK, as AMD's KDS serves it. Like the KDS each call signs
        afresh (RSA-PSS is randomised): the bytes differ, the key and the chain stay the same."""
        if self._ask_key is None:
            self._ask_key = load_rsa(self._read(ASK_KEY))
        _, cek = self._cek()
        return cek.sign_with(Usage.ASK, Algorithm.RSA_SHA384, self._ask_key).to_bytes()

    def ask_ark(self) -> bytes:
        """The emulated ASK‖ARK (AMD's `ask_ark_<gen>.cert` layout): the root to trust explicitly."""
        return self._read(ASK_ARK_CERT)

    def asids_in_use(self) -> dict[str, int]:
        """ASIDs held by guests now, by pool as Linux's misc cgroup names them: "sev_es" (1..max_es_guests,
        SEV-ES and SEV-SNP guests) and "sev" (above, plain SEV guests). For monitoring: read without the
        chip lock (the state file is replaced atomically), so a scrape never waits for a command."""
        chip = self._load()
        used = chip.used_asids()
        es = sum(1 for asid in used if asid <= chip.config.max_es_guests)
        return {"sev": len(used) - es, "sev_es": es}

    def chip_id_hex(self) -> str:
        return self.get_id().hex()

    def full_chain(self) -> bytes:
        """PDH‖PEK‖OCA‖CEK‖ASK‖ARK with the ASK-signed CEK (sevctl's `export --full` layout)."""
        pdh, chain = self.pdh_cert_export()
        return pdh + chain[: 2 * CERT_SIZE] + self.kds_cek() + self.ask_ark()
