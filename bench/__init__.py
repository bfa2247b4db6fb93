"""sevlaunch benchmarks: every number is measured beside a floor (the same work done without our layers)
in the same run, and reported as a ratio, because this machine is too noisy for absolute numbers.

* `python bench/bench_sev.py [--json]`: the pure protocol library against raw `cryptography`/`hashlib`.
* `python -m bench [--quick] [--json]`: the services end to end; writes bench/RESULTS.md.
"""
