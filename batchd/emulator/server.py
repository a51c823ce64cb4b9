"""Serving the emulator over a real socket with uvicorn.

`serve_emulator` embeds it in a running event loop (the daemon's local
backend, the tests); `run_emulator` is the blocking `batchd emulator` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchd.emulator.app import create_app
from batchd.emulator.control import TRANSPORT_KEY
from batchd.emulator.engines import Engine, UpstreamEngine
from batchd.emulator.faults import RandomFaults
from batchd.emulator.timeline import Timeline

log = structlog.get_logger()

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


class TransportInState(H11Protocol):
    """uvicorn's h11 protocol that also hands each request its connection's transport.

    It goes into `scope["state"]` under `TRANSPORT_KEY`, so that a `drop`
    fault can close the connection without any response: ASGI itself has no
    way to do that (uvicorn answers 500 for an app that returns without one).
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        """uvicorn's bookkeeping, then a per-connection copy of the state that carries the transport."""
        super().connection_made(transport)
        self.app_state = {**self.app_state, TRANSPORT_KEY: transport}


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
async def serve_emulator(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on host:port (0: any free port) and yield its base URL once it accepts connections.

    The app's lifespan (state loading, batch worker) runs as with any
    server. Leaving the block shuts down gracefully: stop accepting, let
    open requests finish (at most GRACEFUL_SHUTDOWN_S), run the lifespan's
    shutdown. Signal handlers are left alone; no logging config is
    installed; there is no access log.
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
        http=TransportInState,
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
                raise RuntimeError(f"the emulator at {url} failed to start (see the log)") from exc
            finally:
                sock.close()
        if not ready.is_set():
            raise RuntimeError(f"the emulator at {url} stopped before it was ready")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                await ready.wait()
                log.debug("emulator.listening", url=url)
                yield url
            finally:
                server.should_exit = True
    except BaseExceptionGroup as group:
        # The task group is an implementation detail: the caller's own exception (or the
        # start-up failure) comes out as itself, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@dataclass(frozen=True)
class _Options:
    api_key: str | None
    upstream_url: str | None
    upstream_api_key: str | None
    concurrency: int
    timeline: Timeline | None
    random_faults: RandomFaults | None
    latency_s: float


async def _run(host: str, port: int, data_dir: Path, options: _Options) -> None:
    async with AsyncExitStack() as stack:
        engine: Engine | None = None
        if options.upstream_url:
            # Model calls can be slow; connecting should not be.
            timeout = httpx.Timeout(600.0, connect=10.0)
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=timeout))
            engine = UpstreamEngine(http, options.upstream_url, options.concurrency, api_key=options.upstream_api_key)
        app = create_app(
            data_dir,
            engine=engine,
            api_key=options.api_key,
            timeline=options.timeline,
            random_faults=options.random_faults,
            latency_s=options.latency_s,
        )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve_emulator(app, host, port) as url:
                log.info(
                    "emulator.serving",
                    url=url,
                    openai_base_url=f"{url}/openai/v1",
                    data_dir=str(data_dir),
                    engine="upstream" if engine else "echo",
                )
                async for signum in signals:
                    log.info("emulator.stopping", signal=signal.Signals(signum).name)
                    break


def run_emulator(
    host: str,
    port: int,
    data_dir: Path,
    *,
    api_key: str | None = None,
    upstream_url: str | None = None,
    concurrency: int = 16,
    upstream_api_key: str | None = None,
    timeline: Timeline | None = None,
    random_faults: RandomFaults | None = None,
    latency_s: float = 0.0,
) -> None:
    """Serve the emulator until SIGINT or SIGTERM (the `batchd emulator` command); blocking.

    Uses the echo engine unless `upstream_url` names an OpenAI-compatible
    server, which then gets at most `concurrency` requests at once (with
    `upstream_api_key` as its bearer token, if given). `api_key`, `timeline`,
    `random_faults` and `latency_s` are those of `create_app`.
    """
    options = _Options(api_key, upstream_url, upstream_api_key, concurrency, timeline, random_faults, latency_s)
    anyio.run(_run, host, port, data_dir, options)
