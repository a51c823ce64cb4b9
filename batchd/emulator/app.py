"""The emulator as an ASGI app: the dialects' routes, auth, control middleware, and the worker's lifespan."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs

import anyio
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from batchd.emulator.anthropic import PREFIX as ANTHROPIC_PREFIX
from batchd.emulator.anthropic import anthropic_error, anthropic_routes
from batchd.emulator.bodies import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from batchd.emulator.control import UPLOAD_PREFIX, Control, ControlMiddleware, control_routes
from batchd.emulator.engines import EchoEngine, Engine
from batchd.emulator.faults import Faults, RandomFaults
from batchd.emulator.gemini import gemini_routes
from batchd.emulator.gemini_files import PREFIX as GEMINI_PREFIX
from batchd.emulator.gemini_files import is_upload_session
from batchd.emulator.google_errors import google_error
from batchd.emulator.openai import PREFIX as OPENAI_PREFIX
from batchd.emulator.openai import openai_error, openai_routes
from batchd.emulator.provider_hooks import HookTarget, ProviderHooks
from batchd.emulator.state import Clock, EmulatorState, utc_now
from batchd.emulator.timeline import Timeline
from batchd.emulator.together import UPLOAD_ROUTE, batch_error, file_error, together_routes
from batchd.emulator.transfer import receive_presigned_put, s3_error
from batchd.emulator.worker import BatchWorker, Gate

log = structlog.get_logger()

#: Requests of one batch in flight at once for an engine that does not say (the echo engine).
DEFAULT_CONCURRENCY = 64
#: Path prefixes that need a key when the app has no `api_key`: the dialects.
PROTECTED_PREFIXES: tuple[str, ...] = ("/v1/", f"{OPENAI_PREFIX}/", f"{ANTHROPIC_PREFIX}/", f"{GEMINI_PREFIX}/")


class AuthMiddleware:
    """Requires a bearer token: with `api_key`, exactly that one on every path; else any on the API paths.
    Anthropic's paths also take the key as `x-api-key` (what its API documents; SDK 2.x sends a
    bearer token); Gemini's as `x-goog-api-key` (what its SDK sends) or a `key=` query parameter.

    The upload URLs are the exception: the presigned-style one refuses an `Authorization` header,
    like a real one, and a Gemini upload session's takes the bytes without a key (its SDK sends
    none there); both carry their own signature instead, handed out only to a client that had
    the token when it asked.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, prefixes: Sequence[str] = PROTECTED_PREFIXES) -> None:
        self.app = app
        self.api_key = api_key
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._guarded(scope) and not self._allowed(scope):
            if scope["path"].startswith(ANTHROPIC_PREFIX):
                response = anthropic_error(401, "invalid x-api-key")
            elif scope["path"].startswith(f"{GEMINI_PREFIX}/"):
                response = google_error(401, "API key not valid. Please pass a valid API key.")
            else:
                response = file_error(401, "Invalid API key provided", code="invalid_api_key")
            if any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"]):
                # The body is never read: closing spares the server reading (and discarding) all of it
                # to reuse the connection, however long a stranger keeps sending.
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _guarded(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if path.startswith(UPLOAD_PREFIX) or is_upload_session(path, scope["query_string"]):
            return False
        return self.api_key is not None or path.startswith(self.prefixes)

    def _allowed(self, scope: Scope) -> bool:
        token = _token(scope)
        if not token:
            return False
        # The header's own bytes against the key's UTF-8 (what a client sends for it).
        return self.api_key is None or hmac.compare_digest(token.encode("latin-1"), self.api_key.encode())


def _token(scope: Scope) -> str:
    """The key a request carries, in the form its dialect takes ("" for none)."""
    path: str = scope["path"]
    headers: dict[bytes, bytes] = dict(scope["headers"])
    if path.startswith(ANTHROPIC_PREFIX) and headers.get(b"x-api-key"):
        return headers[b"x-api-key"].decode("latin-1").strip()
    if path.startswith(f"{GEMINI_PREFIX}/"):
        if headers.get(b"x-goog-api-key"):
            return headers[b"x-goog-api-key"].decode("latin-1").strip()
        # Decoded as latin-1, so that the key's bytes compare as a header's would.
        query: bytes = scope["query_string"]
        keys = parse_qs(query.decode("latin-1"), encoding="latin-1").get("key")
        if keys and keys[0].strip():
            return keys[0].strip()
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def dialect_error(path: str, status: int, message: str, *, code: str | None = None) -> Response:
    """An error in the shape of the dialect that serves `path` (Together's batch endpoints: a string)."""
    if path.startswith(f"{GEMINI_PREFIX}/"):
        return google_error(status, message)
    if path.startswith(OPENAI_PREFIX):
        return openai_error(status, message, code=code)
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error(status, message)
    if path.startswith("/v1/batches"):
        return batch_error(status, message)
    return file_error(status, message, code=code)


def _too_large(path: str, limit: int) -> Response:
    """The 413 for a body over `limit` bytes: S3's answer on the upload URL, else the dialect's."""
    if path.startswith(UPLOAD_PREFIX):
        return s3_error(413, "EntityTooLarge", f"Your proposed upload exceeds the maximum allowed size ({limit} bytes)")
    return dialect_error(path, 413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method, bad form) in the dialect's shape."""
    assert isinstance(exc, HTTPException)
    return dialect_error(request.url.path, exc.status_code, str(exc.detail))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that went away mid-request (killed, timed out): one log line, not a traceback.

    Nothing was stored for it (an upload is installed only once its whole body is in), and the
    answer reaches nobody.
    """
    log.info("emulator.client_disconnected", method=request.method, path=request.url.path)
    return Response(status_code=400)


def create_app(
    data_dir: Path,
    *,
    engine: Engine | None = None,
    api_key: str | None = None,
    clock: Clock = utc_now,
    concurrency: int | None = None,
    timeline: Timeline | None = None,
    random_faults: RandomFaults | None = None,
    latency_s: float = 0.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    provider_webhooks: Sequence[HookTarget] = (),
) -> Starlette:
    """Build the emulator over `data_dir` (created if missing).

    `engine` answers requests (default: `EchoEngine()`); `api_key`, when set,
    is the only bearer token accepted, and on every route (the control
    endpoints too; the presigned-style upload URL has its signature) instead
    of any token on the API routes; `max_body_bytes` caps every request body
    (413 beyond it); `clock` is the source of every "now";
    `concurrency` bounds the requests of one batch in flight at the engine
    at once (default: the engine's own `concurrency` if it has one, as
    `UpstreamEngine` does, else 64);
    `timeline` sets how long a batch spends in each state (default: no
    longer than it takes); `random_faults` and `latency_s` start the
    emulator with those faults in force (as if posted to /_emulator/faults);
    `provider_webhooks` are the targets of its own batch events, one per dialect
    (`provider_hooks.py`; as if posted to /_emulator/provider-webhooks). The
    app's lifespan loads the state and runs the batch worker: run it with a
    server (`serve_emulator`) or `app.router.lifespan_context(app)`.
    """
    state = EmulatorState(data_dir)
    gate = Gate()
    engine = engine or EchoEngine()
    if concurrency is None:
        # More requests in flight than the engine takes would only queue at its limiter, which costs
        # CPU per request (measured: tests/benchmarks/bench_upstream.py).
        concurrency = getattr(engine, "concurrency", None) or DEFAULT_CONCURRENCY
    hooks = ProviderHooks({t.dialect: t for t in provider_webhooks}, clock)
    worker = BatchWorker(
        state, engine, gate, clock, concurrency=concurrency, timeline=timeline, on_end=hooks.batch_ended
    )
    control = Control(gate, Faults(random=random_faults, latency_s=latency_s), hooks, queue=worker.queue)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.load()
        try:
            async with anyio.create_task_group() as tg:
                # The webhooks first: a batch the worker resumes may end at once.
                await tg.start(hooks.run)
                await tg.start(worker.run)
                log.info("emulator.started", data_dir=str(data_dir))
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Entered directly (`app.router.lifespan_context(app)`), the caller's exception
            # comes out as itself rather than wrapped by the worker's task group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        log.info("emulator.stopped", data_dir=str(data_dir))

    async def upload(request: Request) -> Response:
        return await receive_presigned_put(request, state)

    routes = [
        *together_routes(state, worker, clock),
        *openai_routes(state, worker, clock),
        *anthropic_routes(state, worker, clock),
        *gemini_routes(state, worker, clock),
        Route("/_emulator/upload/{file_id}", upload, methods=["PUT"], name=UPLOAD_ROUTE),
        *control_routes(control, state),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            # Outermost: a body declared too large is refused before anything else, authorised or
            # not (its connection closed, so the server does not read and discard all of it).
            Middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, refuse=_too_large),
            # Counts and faults see every other request, authorised or not.
            Middleware(ControlMiddleware, control=control),
            Middleware(AuthMiddleware, api_key=api_key),
        ],
        exception_handlers={HTTPException: _http_error, ClientDisconnect: _client_gone},
    )
