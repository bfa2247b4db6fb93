"""AMD's SEV root certificates (ARK and ASK, AMD CA format) for each EPYC generation, as package data.

Sources (tests/vectors/README.md gives each file's provenance and hash): the ARK/ASK pairs split from AMD's
`ask_ark_<gen>.cert`. The Naples ARK is the 832-byte one that carries its self-signature; AMD publishes
it without that signature (576 bytes), which `sevlaunch.sev.amd_cert.parse_ark` recognises by its bytes.

This module only hands out bytes: parsing and trust decisions live in `amd_cert` and `chain`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

GENERATIONS = ("naples", "rome", "milan", "genoa", "turin")


@cache
def ark_bytes(generation: str) -> bytes:
    return _read(generation, "ark.cert")


@cache
def ask_bytes(generation: str) -> bytes:
    return _read(generation, "ask.cert")


def _read(generation: str, name: str) -> bytes:
    if generation not in GENERATIONS:
        raise KeyError(generation)
    return resources.files(__name__).joinpath(generation, name).read_bytes()
