"""sevlaunch: attested launch of AMD SEV / SEV-ES confidential VMs."""

__version__ = "0.1.0"
