"""Serving an ASGI app over a real socket with uvicorn, inside a running event loop.

`serve_app` is what the embedded Batch API (`batchd.emulator.serve_emulator`),
the /metrics listener, the demo's webhook receiver and the tests serve their
apps with: bound before serving (port 0 picks a free one), ready when it
yields the URL, shut down gracefully, and never touching the process's
signal handlers or logging config. It knows nothing of batchd.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Seconds the server waits for open connections (e.g. a download) before cutting them at shutdown.
GRACEFUL_SHUTDOWN_S = 5


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process that embeds it.

    `uvicorn.Server.serve` wraps itself in `capture_signals()`, which replaces
    the SIGINT/SIGTERM handlers with `signal.signal` for the server's lifetime
    (in the main thread) and re-raises the captured signals when it stops. In
    the daemon that would steal SIGTERM from its own shutdown logic, so the
    capture is a no-op here; the owner stops the server via `should_exit`.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready: anyio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        """Deliberately capture nothing."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (app lifespan, then listening), then announce readiness."""
        await super().startup(sockets=sockets)
        if self.started and self.ready is not None:
            self.ready.set()


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: with port 0 we learn the real port before serving."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    # A wildcard address is not something a client can connect to; loopback is.
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve_app(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    protocol: type[asyncio.Protocol] = H11Protocol,
    name: str = "server",
) -> AsyncIterator[str]:
    """Serve `app` on host:port (0: any free port) and yield its base URL once it accepts connections.

    The app's lifespan (the emulator's state loading and batch worker, say)
    runs as with any server. Leaving the block shuts down gracefully: stop accepting, let
    open requests finish (at most GRACEFUL_SHUTDOWN_S), run the lifespan's
    shutdown. Signal handlers are left alone; no logging config is
    installed; there is no access log. `protocol` is uvicorn's HTTP protocol
    class; `name` says what is served in the errors ("the server at URL
    failed to start").
    """
    sock = _bind(host, port)
    url = _url(sock)
    config = uvicorn.Config(
        app,
        # "auto": an ASGI app without lifespan support (a test's webhook receiver) still runs,
        # while a lifespan that reports a failed start-up still stops the server.
        lifespan="auto",
        log_config=None,
        access_log=False,
        http=protocol,
        ws="none",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = EmbeddedServer(config)
    ready = server.ready = anyio.Event()

    async def serve() -> None:
        # Shielded: even when the owner is cancelled, the server stops through should_exit,
        # so connections and the app's lifespan are wound down instead of abandoned.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve(sockets=[sock])
            except SystemExit as exc:  # uvicorn's answer to a failed start-up
                raise RuntimeError(f"the {name} at {url} failed to start (see the log)") from exc
            finally:
                sock.close()
        if not ready.is_set():
            raise RuntimeError(f"the {name} at {url} stopped before it was ready")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                await ready.wait()
                yield url
            finally:
                server.should_exit = True
    except BaseExceptionGroup as group:
        # The task group is an implementation detail: the caller's own exception (or the
        # start-up failure) comes out as itself, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
