"""Request ids the shell makes for calls that bring none: unique within a process, and a forked child
(a `--workers` process) draws its own prefix instead of repeating its parent's ids."""

from __future__ import annotations

import os

from sevlaunch.rpc.interceptor import _request_ids


def test_ids_are_unique_and_fixed_width() -> None:
    ids = [_request_ids.next() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert {len(i) for i in ids} == {32}
    assert len({i[:16] for i in ids}) == 1  # one prefix per process, then a counter


def test_a_forked_child_draws_its_own_prefix() -> None:
    parent = _request_ids.next()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.close(read)
        os.write(write, _request_ids.next().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[:16] != parent[:16]
