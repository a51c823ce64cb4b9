"""Control endpoints for tests (`/_emulator/...`; open unless the app has an api_key): pause, faults,
stats, the emulator's own provider webhooks.

`ControlMiddleware` sits in front of every route: it counts requests and
carries out injected faults (which fault a request gets is decided in
`faults.py`). The control endpoints themselves are never counted nor
faulted; the presigned-style upload URL is (it stands for the storage host,
whose failures tests want to simulate).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

import anyio
import httpx
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.emulator.answers import anthropic_error_body
from batchd.emulator.bodies import read_json
from batchd.emulator.faults import Fault, Faults, parse_fault, parse_latency, parse_random
from batchd.emulator.google_errors import google_error_body
from batchd.emulator.provider_hooks import ProviderHooks, parse_target
from batchd.emulator.queue import QueueLimit, parse_queue
from batchd.emulator.state import EmulatorState, iso_z, utc_now
from batchd.emulator.triggers import openai_error_body
from batchd.emulator.worker import Gate

log = structlog.get_logger()

CONTROL_PREFIX = "/_emulator/"
#: Where the Anthropic and Gemini dialects are mounted (anthropic.py, gemini_files.py), whose errors
#: have shapes of their own.
ANTHROPIC_PREFIX = "/anthropic/"
GEMINI_PREFIX = "/gemini/"
#: The presigned-style upload URL: under the control prefix, but it stands for the storage host.
UPLOAD_PREFIX = "/_emulator/upload/"


class Control:
    """The switches tests pull: the worker's pause gate, the faults, request counts, the targets of
    the emulator's own provider webhooks."""

    def __init__(
        self,
        gate: Gate,
        faults: Faults | None = None,
        hooks: ProviderHooks | None = None,
        *,
        queue: QueueLimit | None = None,
    ) -> None:
        self.gate = gate
        self.faults = faults or Faults()
        #: the account's queue of enqueued tokens (queue.py; shared with the worker)
        self.queue = queue or QueueLimit()
        self.requests: Counter[str] = Counter()
        self.hooks = hooks or ProviderHooks({}, utc_now)


class _Truncated(Exception):
    """Raised through the app to stop it once a truncating fault has sent its bytes."""


#: The key under which the emulator's server puts each connection's transport into `scope["state"]`.
TRANSPORT_KEY = "batchd.emulator.transport"


def _fault_response(fault: Fault, path: str) -> Response:
    status = fault.status or 500
    message = f"emulated fault: HTTP {status}"
    # Together's batch endpoints answer errors as a bare string; Anthropic and Google in their own
    # shapes; the others (and OpenAI) as an object.
    body: dict[str, Any]
    if path.startswith("/v1/batches"):
        body = {"error": message}
    elif path.startswith(ANTHROPIC_PREFIX):
        body = anthropic_error_body(status, message)
    elif path.startswith(GEMINI_PREFIX):
        body = google_error_body(status, message)
    else:
        body = openai_error_body(status, message)
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    return JSONResponse(body, status_code=status, headers=headers)


class ControlMiddleware:
    """Counts every request and carries out injected faults (pure ASGI, so bodies still stream)."""

    def __init__(self, app: ASGIApp, control: Control) -> None:
        self.app = app
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or (path.startswith(CONTROL_PREFIX) and not path.startswith(UPLOAD_PREFIX)):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        faults = self.control.faults
        self.control.requests[f"{method} {path}"] += 1
        if faults.latency_s:
            await anyio.sleep(faults.latency_s)
        fault = faults.pick(method, path)
        if fault is None:
            await self.app(scope, receive, send)
            return
        faults.served[fault.kind] += 1
        log.info(
            "emulator.fault.injected",
            method=method,
            path=path,
            kind=fault.kind,
            act=fault.act,
            delay_s=fault.delay_s,
            remaining=fault.times,
        )
        if fault.delay_s:
            await anyio.sleep(fault.delay_s)
        if fault.truncate_at is not None:
            await self._truncated(scope, receive, send, fault.truncate_at)
        elif fault.drop or fault.status is not None:
            if fault.act:
                await self.app(scope, receive, _discard)
            if fault.drop:
                await _drop(scope, receive)
            else:
                await _fault_response(fault, path)(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _truncated(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        sent = 0

        async def cut(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                body: bytes = message.get("body", b"")
                if sent + len(body) > limit:
                    await send({"type": "http.response.body", "body": body[: limit - sent], "more_body": True})
                    raise _Truncated
                sent += len(body)
            await send(message)

        # Returning with the response incomplete makes the server close the connection: the
        # client sees the full Content-Length but fewer bytes. (except*: the streaming response
        # runs in a task group, which wraps the exception in a group.)
        try:
            await self.app(scope, receive, cut)
        except* _Truncated:
            log.info("emulator.fault.truncated", path=scope["path"], bytes=limit)


async def _drop(scope: Scope, receive: Receive) -> None:
    """Close the connection without a word: the client sees it end before any response."""
    transport = scope.get("state", {}).get(TRANSPORT_KEY)
    if transport is None:
        # In-process (httpx.ASGITransport) there is no connection: raise what a client sees then.
        raise httpx.RemoteProtocolError("Server disconnected without sending a response (emulated).")
    transport.close()
    # Let the server notice the closed connection first, or it would try to answer 500 on it.
    with anyio.move_on_after(1):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _discard(message: Message) -> None:
    """Swallows the real response of an `act` fault."""


def control_routes(control: Control, state: EmulatorState) -> list[Route]:
    """The `/_emulator/...` routes."""

    async def pause(request: Request) -> Response:
        control.gate.pause()
        log.info("emulator.paused")
        return JSONResponse({"paused": True})

    async def resume(request: Request) -> Response:
        control.gate.resume()
        log.info("emulator.resumed")
        return JSONResponse({"paused": False})

    def listing() -> Response:
        faults = control.faults
        answer: dict[str, Any] = {"faults": [asdict(f) for f in faults.pending]}
        if faults.random is not None:
            answer["random"] = faults.random.describe()
        if faults.latency_s:
            answer["latency_s"] = faults.latency_s
        return JSONResponse(answer)

    async def faults(request: Request) -> Response:
        if request.method == "GET":
            return listing()
        if request.method == "DELETE":
            control.faults.clear()
            return listing()
        try:
            spec = await read_json(request)
            if isinstance(spec, dict) and "rate" in spec:
                random_mode = parse_random(spec)
                control.faults.random = random_mode if random_mode.rate > 0 else None
            elif isinstance(spec, dict) and "latency_s" in spec:
                control.faults.latency_s = parse_latency(spec)
            else:
                control.faults.pending.append(parse_fault(spec))
        except ValueError as exc:  # FaultSpecError, or a body that is not JSON
            return JSONResponse(openai_error_body(400, f"bad fault: {exc}"), status_code=400)
        return listing()

    async def stats(request: Request) -> Response:
        creates = sorted(state.batches(), key=lambda b: b.seq)
        served = control.faults.served
        return JSONResponse(
            {
                "batch_creates": [
                    {"id": b.id, "input_file_id": b.input_file_id, "created_at": iso_z(b.created_at)} for b in creates
                ],
                "requests": dict(control.requests),
                "faults_served": {"total": sum(served.values()), **served},
                "paused": control.gate.paused,
                "provider_webhooks": {"events": control.hooks.events, "answers": dict(control.hooks.answers)},
            }
        )

    async def queue(request: Request) -> Response:
        limit = control.queue
        if request.method == "POST":
            try:
                spec = await read_json(request)
                limit.max_tokens = parse_queue(spec)
            except ValueError as exc:
                return JSONResponse(openai_error_body(400, f"bad queue: {exc}"), status_code=400)
            log.info("emulator.queue", max_enqueued_tokens=limit.max_tokens)
        return JSONResponse(
            {
                "max_enqueued_tokens": limit.max_tokens,
                "enqueued_tokens": limit.enqueued(state),
                "refused": limit.refused,
            }
        )

    async def provider_webhooks(request: Request) -> Response:
        if request.method == "POST":
            try:
                control.hooks.set(parse_target(await read_json(request)))
            except ValueError as exc:  # a bad target, or a body that is not JSON
                return JSONResponse(openai_error_body(400, f"bad provider webhook: {exc}"), status_code=400)
        elif request.method == "DELETE":
            control.hooks.clear()
        return JSONResponse(control.hooks.describe())

    async def expire_results(request: Request) -> Response:
        try:
            spec = await read_json(request)
        except ValueError as exc:
            return JSONResponse(openai_error_body(400, f"bad request: {exc}"), status_code=400)
        raw = spec.get("batch_id") if isinstance(spec, dict) else None
        # Gemini's batches are named `batches/<id>`; the others by their id alone.
        batch = state.batch(raw.removeprefix("batches/")) if isinstance(raw, str) else None
        if batch is None:
            return JSONResponse(openai_error_body(404, f"no batch {raw!r}"), status_code=404)
        if not batch.status.terminal:
            message = f"batch {batch.id} has not ended: it has no results to expire yet"
            return JSONResponse(openai_error_body(409, message), status_code=409)
        # The batch keeps naming its result files: fetching them answers 404 from now on.
        expired = [f for f in (batch.output_file_id, batch.error_file_id) if f is not None and state.file(f)]
        for file_id in expired:
            await state.delete_file(file_id)
        log.info("emulator.results_expired", batch_id=batch.id, files=expired)
        return JSONResponse({"batch_id": batch.id, "expired": expired})

    return [
        Route("/_emulator/queue", queue, methods=["GET", "POST"]),
        Route("/_emulator/expire_results", expire_results, methods=["POST"]),
        Route("/_emulator/pause", pause, methods=["POST"]),
        Route("/_emulator/resume", resume, methods=["POST"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/provider-webhooks", provider_webhooks, methods=["GET", "POST", "DELETE"]),
    ]
