"""The launch technology: one name for it across the library, the services and the CLI."""

from __future__ import annotations

from enum import StrEnum


class Technology(StrEnum):
    """Which AMD launch technology a guest uses. The values are the spellings the CLI, the reference
    values and libvirt's `<launchSecurity type=...>` use."""

    SEV = "sev"
    SEV_ES = "sev-es"
    SEV_SNP = "sev-snp"


#: The 2017 design's technologies: measured before launch, secret injected with LAUNCH_SECRET. Code that
#: handles only these refuses SEV-SNP explicitly instead of treating it as one of them.
PRE_LAUNCH = frozenset({Technology.SEV, Technology.SEV_ES})
