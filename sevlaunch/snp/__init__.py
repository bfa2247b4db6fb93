"""The pure SEV-SNP protocol: attestation reports, VCEK/VLEK chains, TCB and guest policy, the SNP launch
digest, ID blocks. Like `sevlaunch.sev`, it knows nothing of gRPC, libvirt, sockets or files."""
