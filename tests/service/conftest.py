"""Helpers for service tests: run an `RpcServer` on port 0 in a background event loop.

Tests stay synchronous (no pytest-asyncio needed): the server's loop runs in its own thread, and a test
calls it with blocking channels, or with `asyncio.run(...)` and aio channels of its own loop.

    def test_x(serve, tls_dir):
        running = serve(lambda: build_my_server(tls_dir))   # an async factory returning an RpcServer
        with secure_channel_sync(running.address, tls_dir, "client") as ch: ...
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

from sevlaunch.rpc import RpcServer

# Support modules that test modules load as plugins (`pytest_plugins`) after importing their helpers:
# registered here, before that import, so their asserts are rewritten like a test's.
pytest.register_assert_rewrite("owner_support", "pg_fixture", "owner_replicas", "snp_support")

T = TypeVar("T")


class RunningServer:
    """An RpcServer started on port 0 inside a private event loop thread."""

    def __init__(self, factory: Callable[[], Awaitable[RpcServer]]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rpc-server-loop", daemon=True)
        self._thread.start()

        async def boot() -> RpcServer:
            server = await factory()
            if not server.port:
                await server.start()
            return server

        self.server: RpcServer = self.run(boot())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Runs a coroutine in the server's loop and waits for its result."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def address(self) -> str:
        return f"localhost:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], Awaitable[RpcServer]]], RunningServer]]:
    """`serve(factory)` starts a server (the factory may return it started or not); stopped at teardown."""
    started: list[RunningServer] = []

    def start(factory: Callable[[], Awaitable[RpcServer]]) -> RunningServer:
        running = RunningServer(factory)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()


# -- platform service fixtures (used by test_platform_*.py; owner/launcher suites may reuse them) -------


# `emulated_root`: the session's one emulated AMD root, from tests/conftest.py.


@pytest.fixture
def emulated_chip(tmp_path: Any, emulated_root: Any) -> Any:
    """A fresh emulated chip (EmulatedFirmware) under tmp_path/chip, signed by the session's root."""
    from sevlaunch.firmware import EmulatedFirmware

    return EmulatedFirmware(tmp_path / "chip", root=emulated_root)


@pytest.fixture
def start_platform(serve: Any, tls_dir: Any, emulated_chip: Any) -> Callable[..., Any]:
    """`start_platform(firmware=None, **PlatformConfig fields)` → (RunningServer, PlatformCore).

    Defaults: the `emulated_chip`, listening on localhost:0, metrics on 127.0.0.1:0."""
    from platform_svc.server import PlatformConfig, create_server

    def start(firmware: Any = None, **overrides: Any) -> tuple[RunningServer, Any]:
        fields: dict[str, Any] = {
            "tls_dir": tls_dir,
            "listen": "localhost:0",
            "metrics_listen": "127.0.0.1:0",
            "emulator": emulated_chip.state_dir,
            "grace": 2.0,
        }
        fields.update(overrides)
        cfg = PlatformConfig(**fields)
        holder: dict[str, Any] = {}

        async def factory() -> RpcServer:
            server, core, _ = await create_server(cfg, firmware=firmware or emulated_chip)
            holder["core"] = core
            return server

        running = serve(factory)
        return running, holder["core"]

    return start


Reply = tuple[int, dict[str, str], bytes]


class ScriptedKDS:
    """An HTTP server whose n-th request gets `script(n)`: (status, headers, body), after `delay` s."""

    def __init__(
        self, script: Callable[[int], Reply], delay: float = 0.0, record_paths: list[str] | None = None
    ) -> None:
        self.requests = 0
        self.closed = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                if record_paths is not None:
                    record_paths.append(self.path)
                time.sleep(delay)
                status, headers, body = script(owner.requests)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A short poll interval: close() waits up to one interval (0.5 s by default).
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def scripted_kds() -> Iterator[Callable[..., ScriptedKDS]]:
    """`scripted_kds(script, delay=0, record_paths=None)` → a ScriptedKDS (closed at teardown)."""
    made: list[ScriptedKDS] = []

    def make(
        script: Callable[[int], Reply], delay: float = 0.0, record_paths: list[str] | None = None
    ) -> ScriptedKDS:
        made.append(ScriptedKDS(script, delay, record_paths))
        return made[-1]

    yield make
    for s in made:
        s.close()
