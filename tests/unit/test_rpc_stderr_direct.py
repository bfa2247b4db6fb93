"""Python's log lines reach the real stderr straight (`json_stderr` yields the stream), past the pipe
that turns the gRPC core's own lines into JSON: both kinds, written at once from several threads,
come out as whole JSON lines, none lost, none interleaved; after the block the stream writes to fd 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import logging, os, threading
    from sevlaunch.rpc.logs import configure_logging
    from sevlaunch.rpc.stderr import json_stderr

    with json_stderr() as direct:
        configure_logging("INFO", direct)
        log = logging.getLogger("t")

        def python_lines(n):
            for i in range(300):
                log.info("python line", extra={"n": n, "i": i, "pad": "x" * 300})

        def foreign_lines():
            for i in range(300):
                os.write(2, b"E1206 11:58:36.195059 19204 ssl.cc:1] foreign line %d\\n" % i)

        threads = [threading.Thread(target=python_lines, args=(n,)) for n in range(3)]
        threads.append(threading.Thread(target=foreign_lines))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    log.info("after the block")
    """
)


def test_python_and_foreign_lines_are_whole_json() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, check=True, timeout=60)
    records = [json.loads(line) for line in out.stderr.decode().splitlines()]
    python = [r for r in records if r["logger"] == "t" and r["message"] == "python line"]
    foreign = [r for r in records if r["logger"] == "grpc"]
    assert sorted((r["n"], r["i"]) for r in python) == [(n, i) for n in range(3) for i in range(300)]
    assert sorted(int(r["message"].rsplit(" ", 1)[1]) for r in foreign) == list(range(300))
    assert all(r["source"] == "ssl.cc:1" for r in foreign)
    assert records[-1]["message"] == "after the block"
    assert len(records) == 900 + 300 + 1
