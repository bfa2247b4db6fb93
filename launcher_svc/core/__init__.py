"""The launcher's core: guest spec validation, domain XML, the persisted launch state machine, and the
orchestration that drives a `Hypervisor` through an attested launch, failing closed."""
