"""Control endpoints for tests (`/_emulator/...`, no auth): pause, faults, stats.

`ControlMiddleware` sits in front of every route: it counts requests and
answers injected faults. The control endpoints themselves are never counted
nor faulted; the presigned-style upload URL is (it stands for the storage
host, whose failures tests want to simulate).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.emulator.state import EmulatorState, iso_z
from batchd.emulator.triggers import openai_error_body
from batchd.emulator.worker import Gate

log = structlog.get_logger()

CONTROL_PREFIX = "/_emulator/"
_UPLOAD_PREFIX = "/_emulator/upload/"


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` + `path` with `status` (or cut the body)."""

    method: str
    #: a path; `*` stands for exactly one segment, e.g. "/v1/files/*/content"
    path: str
    status: int | None = None
    times: int = 1
    retry_after: float | None = None
    #: carry the request out first, then answer the fault instead (a lost answer)
    act: bool = False
    #: send the real headers (full Content-Length) but only this many body bytes, then close
    truncate_at: int | None = None

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is one this fault is waiting for."""
        if method != self.method:
            return False
        want = self.path.strip("/").split("/")
        got = path.strip("/").split("/")
        return len(want) == len(got) and all(w in ("*", g) for w, g in zip(want, got, strict=True))


class FaultSpecError(ValueError):
    """A fault posted to /_emulator/faults is malformed."""


def _number(spec: dict[str, Any], key: str, *, lowest: float, integer: bool) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    wrong_kind = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_kind or value < lowest:
        raise FaultSpecError(f"{key} must be a {'whole ' if integer else ''}number >= {lowest:g}")
    return value


def parse_fault(spec: Any) -> Fault:
    """Build a Fault from its JSON form; raise FaultSpecError when it is malformed."""
    if not isinstance(spec, dict):
        raise FaultSpecError("a fault is a JSON object")
    unknown = sorted(set(spec) - {"method", "path", "status", "times", "retry_after", "act", "truncate_at"})
    if unknown:
        raise FaultSpecError(f"unknown keys: {', '.join(unknown)}")
    method, path = spec.get("method"), spec.get("path")
    if not isinstance(method, str) or not method:
        raise FaultSpecError("method is required")
    if not isinstance(path, str) or not path.startswith("/"):
        raise FaultSpecError("path is required and starts with /")
    status = _number(spec, "status", lowest=100, integer=True)
    truncate_at = _number(spec, "truncate_at", lowest=0, integer=True)
    if status is not None and status > 599:
        raise FaultSpecError("status must be from 100 to 599")
    if status is None and truncate_at is None:
        raise FaultSpecError("status or truncate_at is required")
    act = spec.get("act", False)
    if not isinstance(act, bool):
        raise FaultSpecError("act must be true or false")
    times = _number(spec, "times", lowest=1, integer=True)
    return Fault(
        method=method.upper(),
        path=path,
        status=status,
        times=1 if times is None else times,
        retry_after=_number(spec, "retry_after", lowest=0, integer=False),
        act=act,
        truncate_at=truncate_at,
    )


class Control:
    """The switches tests pull: the worker's pause gate, pending faults, request counts."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.faults: list[Fault] = []
        self.requests: Counter[str] = Counter()

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first pending fault for this request, used up by one."""
        for fault in self.faults:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None


class _Truncated(Exception):
    """Raised through the app to stop it once a truncating fault has sent its bytes."""


def _fault_response(fault: Fault, path: str) -> Response:
    status = fault.status or 500
    message = f"emulated fault: HTTP {status}"
    # Together's batch endpoints answer errors as a bare string; the others as an object.
    body: dict[str, Any] = {"error": message} if path.startswith("/v1/batches") else openai_error_body(status, message)
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    return JSONResponse(body, status_code=status, headers=headers)


class ControlMiddleware:
    """Counts every request and answers injected faults (pure ASGI, so bodies still stream)."""

    def __init__(self, app: ASGIApp, control: Control) -> None:
        self.app = app
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or (path.startswith(CONTROL_PREFIX) and not path.startswith(_UPLOAD_PREFIX)):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        self.control.requests[f"{method} {path}"] += 1
        fault = self.control.take_fault(method, path)
        if fault is None:
            await self.app(scope, receive, send)
            return
        log.info(
            "emulator.fault.injected",
            method=method,
            path=path,
            status=fault.status,
            act=fault.act,
            truncate_at=fault.truncate_at,
            remaining=fault.times,
        )
        if fault.truncate_at is not None:
            await self._truncated(scope, receive, send, fault.truncate_at)
            return
        if fault.act:
            await self.app(scope, receive, _discard)
        await _fault_response(fault, path)(scope, receive, send)

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
        return JSONResponse({"faults": [asdict(f) for f in control.faults]})

    async def faults(request: Request) -> Response:
        if request.method == "GET":
            return listing()
        if request.method == "DELETE":
            control.faults.clear()
            return listing()
        try:
            fault = parse_fault(await request.json())
        except ValueError as exc:  # FaultSpecError, or a body that is not JSON
            return JSONResponse(openai_error_body(400, f"bad fault: {exc}"), status_code=400)
        control.faults.append(fault)
        return listing()

    async def stats(request: Request) -> Response:
        creates = sorted(state.batches(), key=lambda b: b.seq)
        return JSONResponse(
            {
                "batch_creates": [
                    {"id": b.id, "input_file_id": b.input_file_id, "created_at": iso_z(b.created_at)} for b in creates
                ],
                "requests": dict(control.requests),
                "paused": control.gate.paused,
            }
        )

    return [
        Route("/_emulator/pause", pause, methods=["POST"]),
        Route("/_emulator/resume", resume, methods=["POST"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
    ]
