"""Fixtures shared by every test suite: mTLS material from `sevlaunch dev-certs` and one emulated AMD root.

Add fixtures here with care: the owner, launcher and platform suites all load this file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevlaunch.cli.devcerts import DEFAULT_IDENTITIES, write_dev_certs
from sevlaunch.firmware.emulator import EmulatedRoot
from sevlaunch.snp.issue import EmulatedSnpRoot
from sevlaunch.snp.tcb import Product


def pytest_addoption(parser: pytest.Parser) -> None:
    # Hardware tests are opt-in (STYLE.md rule 10): the default suite passes on any Linux machine.
    parser.addoption(
        "--run-hw", action="store_true", default=False, help="also run the tests that need /dev/sev"
    )


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a server's or the CLI's entry point in-process points the root logger at the
    stderr pytest captured for it; after the test that stream is closed, and a later test's in-process
    server logging through it printed "--- Logging error ---" tracebacks. Each test gets the root
    logger back as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


#: Identities beyond the defaults, for authorisation tests (a valid certificate with no role anywhere).
EXTRA_TEST_IDENTITIES = ("nobody",)


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev-certs folder: ca.pem and NAME.pem/NAME.key for platform, launcher, owner, client,
    platform-admin, owner-admin, and `nobody` (authenticated, no role)."""
    out = tmp_path_factory.mktemp("tls")
    write_dev_certs(out, identities=[*DEFAULT_IDENTITIES, *EXTRA_TEST_IDENTITIES])
    return out


@pytest.fixture(scope="session")
def foreign_tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same identities from another, untrusted CA: its certificates must fail the handshake."""
    out = tmp_path_factory.mktemp("tls-foreign")
    write_dev_certs(out, identities=DEFAULT_IDENTITIES)
    return out


@pytest.fixture(scope="session")
def emulated_root() -> EmulatedRoot:
    """The session's emulated AMD root (ARK and ASK). Generating its two RSA-4096 keys takes seconds, so
    every chip of every suite shares this one; make another only where a test needs a second, different
    root (a chip that must not chain to this one)."""
    return EmulatedRoot.generate()


@pytest.fixture(scope="session")
def emulated_snp_root() -> EmulatedSnpRoot:
    """The session's emulated AMD SEV-SNP root for Genoa (ARK, ASK, ASVK as X.509, RSA-4096): chips made
    with `snp_root=` share it instead of generating three RSA-4096 keys each."""
    return EmulatedSnpRoot.generate(Product.GENOA)
