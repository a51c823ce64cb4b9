"""Serving the emulator over a real socket with uvicorn.

`serve_emulator` embeds it in a running event loop (the daemon's local
backend, the tests) through the generic `batchd.asgi_server.serve_app`;
`run_emulator` is the blocking `batchd emulator` command.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import structlog
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from batchd.asgi_server import serve_app
from batchd.emulator.app import create_app
from batchd.emulator.bodies import DEFAULT_MAX_BODY_BYTES
from batchd.emulator.control import TRANSPORT_KEY
from batchd.emulator.engines import Engine, UpstreamEngine
from batchd.emulator.faults import RandomFaults
from batchd.emulator.provider_hooks import HookTarget
from batchd.emulator.timeline import Timeline

log = structlog.get_logger()


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


@asynccontextmanager
async def serve_emulator(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the emulator `app` on host:port (0: any free port); yield its base URL once it accepts connections.

    `serve_app` with the protocol that hands each request its transport (the
    `drop` fault closes it); leaving the block shuts the emulator down gracefully.
    """
    async with serve_app(app, host, port, protocol=TransportInState, name="emulator") as url:
        log.debug("emulator.listening", url=url)
        yield url


@dataclass(frozen=True)
class _Options:
    api_key: str | None
    upstream_url: str | None
    upstream_api_key: str | None
    concurrency: int
    timeline: Timeline | None
    random_faults: RandomFaults | None
    latency_s: float
    max_body_bytes: int
    provider_webhooks: tuple[HookTarget, ...]


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
            max_body_bytes=options.max_body_bytes,
            provider_webhooks=options.provider_webhooks,
        )
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve_emulator(app, host, port) as url:
                log.info(
                    "emulator.serving",
                    url=url,
                    openai_base_url=f"{url}/openai/v1",
                    anthropic_base_url=f"{url}/anthropic",
                    gemini_base_url=f"{url}/gemini",
                    data_dir=str(data_dir),
                    engine="upstream" if engine else "echo",
                    max_body_bytes=options.max_body_bytes,
                    provider_webhooks=[t.describe() for t in options.provider_webhooks],
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    provider_webhooks: Sequence[HookTarget] = (),
) -> None:
    """Serve the emulator until SIGINT or SIGTERM (the `batchd emulator` command); blocking.

    Uses the echo engine unless `upstream_url` names an OpenAI-compatible
    server, which then gets at most `concurrency` requests at once (with
    `upstream_api_key` as its bearer token, if given). `api_key`, `timeline`,
    `random_faults`, `latency_s`, `max_body_bytes` and `provider_webhooks` are
    those of `create_app`.
    """
    options = _Options(
        api_key, upstream_url, upstream_api_key, concurrency, timeline, random_faults, latency_s, max_body_bytes,
        tuple(provider_webhooks),
    )  # fmt: skip
    anyio.run(_run, host, port, data_dir, options)
