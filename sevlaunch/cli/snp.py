"""`sevlaunch snp ...`: offline SEV-SNP commands (reports, VCEK URLs, ID blocks)."""

from __future__ import annotations

import argparse

from sevlaunch.cli import snp_idblock, snp_report


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("snp", help="SEV-SNP attestation reports, VCEK URLs and ID blocks (offline)")
    snp_sub = parser.add_subparsers(dest="snp_command", required=True, metavar="SNP_COMMAND")
    snp_report.register(snp_sub)
    snp_idblock.register(snp_sub)
