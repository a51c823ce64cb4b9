"""The Anthropic dialect: `/anthropic/v1/messages/batches…` in Anthropic's wire shapes.

Shapes follow PROVIDERS.md and the official `anthropic` SDK's types (`MessageBatch`,
`MessageBatchIndividualResponse`): the requests travel inline in the create body, a batch
is `in_progress`, `canceling` or `ended` with `request_counts` saying what happened, times are
RFC 3339, lists page with `after_id` / `before_id` (newest first), the results are a JSONL
stream at the batch's absolute `results_url`, and every error is `{"type": "error", "error":
{"type", "message"}}`. The key comes as `x-api-key` or as a bearer token (app.py), and an
`anthropic-version` header is required, as the real API requires it. `DELETE …/batches/{id}`
answers `{"id", "type": "message_batch_deleted"}` once the batch has ended (400 before: cancel it
first) and takes its request lines and results with it.

The batch is the same dialect-neutral record as the others' (`state.py`): the create turns its
requests into an input file of the emulator's own lines (`{"custom_id", "method", "url":
"/v1/messages", "body": params}`), streamed from a spooled copy of the body, never whole in
memory, and the worker runs it like any batch. A request whose params cannot run is answered
`errored` (invalid_request_error) by the engine, as Anthropic answers it, not refused at create.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import ijson
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from batchd.emulator.answers import anthropic_error_body
from batchd.emulator.inputs import limits_for
from batchd.emulator.queue import take_room
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch, StoredFile, iso_z
from batchd.emulator.transfer import ContentSink
from batchd.emulator.worker import BatchWorker, NotCancellable
from batchd.models import BatchEndpoint

log = structlog.get_logger()

#: Where the dialect is mounted: the SDK's base URL is `http://host:port/anthropic`.
PREFIX = "/anthropic"
BATCHES = f"{PREFIX}/v1/messages/batches"
DIALECT = "anthropic"
#: What Anthropic accepts as a custom_id.
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 1000
#: Message batches expire 24 hours after their creation.
EXPIRY = timedelta(hours=24)
_CHUNK = 64 * 1024


def anthropic_error(status: int, message: str) -> Response:
    """An error in Anthropic's shape."""
    return JSONResponse(anthropic_error_body(status, message), status_code=status)


def _counts(batch: StoredBatch) -> dict[str, int]:
    """`request_counts`: the requests never run are `canceled` or `expired` by how the batch ended."""
    ended = batch.status.terminal
    unrun = batch.unrun if batch.status in (BatchStatus.CANCELLED, BatchStatus.EXPIRED) else 0
    return {
        "processing": 0 if ended else max(batch.total - batch.completed - batch.failed, 0),
        "succeeded": batch.completed,
        "errored": batch.failed - unrun,
        "canceled": unrun if batch.status is BatchStatus.CANCELLED else 0,
        "expired": unrun if batch.status is BatchStatus.EXPIRED else 0,
    }


def _processing_status(status: BatchStatus) -> str:
    if status.terminal:
        return "ended"
    return "canceling" if status is BatchStatus.CANCELLING else "in_progress"


def batch_json(batch: StoredBatch, base_url: str) -> dict[str, Any]:
    """A MessageBatch; `results_url` absolute, at this emulator, once the batch has ended."""
    ended = batch.status.terminal
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": _processing_status(batch.status),
        "request_counts": _counts(batch),
        "created_at": iso_z(batch.created_at),
        "expires_at": iso_z(batch.deadline),
        "ended_at": iso_z(batch.finished_at) if ended else None,
        "cancel_initiated_at": iso_z(batch.cancelling_at),
        "archived_at": None,
        "results_url": f"{base_url.rstrip('/')}{BATCHES}/{batch.id}/results" if ended else None,
    }


class CreateProblem(ValueError):
    """The create body breaks a rule: answered 400 (invalid_request_error) with this message."""


def convert_requests(body: Path, lines: Path, max_requests: int) -> int:
    """Write the inline requests of the create body at `body` as the emulator's request lines at
    `lines` (fsynced); return how many. Raises CreateProblem when the body breaks a rule.

    Blocking (run it in a worker thread); streamed with ijson, one request in memory at a time.
    """
    seen: set[str] = set()
    with body.open("rb") as source, lines.open("wb") as out:
        try:
            for index, request in enumerate(ijson.items(source, "requests.item", use_float=True)):
                where = f"requests.{index}"
                if not isinstance(request, dict):
                    raise CreateProblem(f"{where}: Input should be an object")
                custom_id = request.get("custom_id")
                if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                    raise CreateProblem(f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
                if custom_id in seen:
                    raise CreateProblem(f"{where}.custom_id: Duplicate custom_id {custom_id!r} in the batch")
                seen.add(custom_id)
                params = request.get("params")
                if not isinstance(params, dict):
                    raise CreateProblem(f"{where}.params: Field required (an object)")
                if len(seen) > max_requests:
                    raise CreateProblem(f"requests: a batch holds at most {max_requests} requests")
                line = {"custom_id": custom_id, "method": "POST", "url": BatchEndpoint.MESSAGES, "body": params}
                out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        except (ijson.JSONError, UnicodeDecodeError) as exc:
            raise CreateProblem(f"the request body is not valid JSON ({exc})") from None
        if not seen:
            raise CreateProblem("requests: a batch needs at least one request")
        out.flush()
        os.fsync(out.fileno())
    return len(seen)


def _limit(request: Request) -> int | None:
    raw = request.query_params.get("limit", str(LIST_DEFAULT_LIMIT))
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 1 <= value <= LIST_MAX_LIMIT else None


def anthropic_routes(state: EmulatorState, worker: BatchWorker, clock: Clock) -> list[Route]:
    """The Anthropic routes over the shared state."""

    def ours(batch_id: str) -> StoredBatch | None:
        batch = state.batch(batch_id)
        return batch if batch is not None and batch.dialect == DIALECT else None

    def not_found(batch_id: str) -> Response:
        return anthropic_error(404, f"No message batch with id {batch_id!r}")

    def unversioned(request: Request) -> Response | None:
        if not request.headers.get("anthropic-version"):
            return anthropic_error(400, "anthropic-version: header is required")
        return None

    def base_url(request: Request) -> str:
        return str(request.base_url)

    async def create_batch(request: Request) -> Response:
        if (refused := unversioned(request)) is not None:
            return refused
        limits = limits_for(DIALECT)
        body_tmp = state.temp_path("anthropic-create")
        lines_tmp = state.temp_path("anthropic-requests")
        try:
            async with ContentSink(body_tmp) as sink:
                async for chunk in request.stream():
                    await sink.write(chunk)
                    if sink.size > limits.max_bytes:
                        refused = anthropic_error(413, f"the batch is larger than {limits.max_bytes} bytes")
                        # Unread, the rest of the body is not worth keeping the connection for.
                        refused.headers["Connection"] = "close"
                        return refused
            try:
                total = await anyio.to_thread.run_sync(convert_requests, body_tmp, lines_tmp, limits.max_requests)
            except CreateProblem as exc:
                return anthropic_error(400, str(exc))
            created = clock()
            record = StoredFile(
                id=state.new_file_id(),
                seq=state.next_seq(),
                filename="message-batch-requests.jsonl",
                purpose="anthropic-batch",
                file_type="jsonl",
                created_at=int(created.timestamp()),
                bytes=lines_tmp.stat().st_size,
                line_count=total,
                processed=True,
            )
            await state.install_content(record, lines_tmp)
        finally:
            await anyio.Path(body_tmp).unlink(missing_ok=True)
            await anyio.Path(lines_tmp).unlink(missing_ok=True)
        batch = StoredBatch(
            id=f"msgbatch_{os.urandom(12).hex()}",
            seq=state.next_seq(),
            dialect=DIALECT,
            input_file_id=record.id,
            endpoint=BatchEndpoint.MESSAGES,
            completion_window="24h",
            created_at=created,
            deadline=created + EXPIRY,
            # The body's size is what the 256 MB limit is about (the lines add a few bytes each).
            file_size_bytes=sink.size,
            total=total,
        )
        full = await take_room(state, worker.queue, batch)
        if full is not None:
            return anthropic_error(429, f"Your organization's batch processing queue is full. {full}")
        await state.save_batch(batch)
        worker.enqueue(batch.id)
        log.info("emulator.batch.created", batch_id=batch.id, requests=total, dialect=DIALECT)
        return JSONResponse(batch_json(batch, base_url(request)))

    async def list_batches(request: Request) -> Response:
        if (refused := unversioned(request)) is not None:
            return refused
        limit = _limit(request)
        if limit is None:
            return anthropic_error(400, f"limit: must be from 1 to {LIST_MAX_LIMIT}")
        after, before = request.query_params.get("after_id"), request.query_params.get("before_id")
        if after is not None and before is not None:
            return anthropic_error(400, "after_id and before_id cannot be given together")
        batches = [b for b in state.batches() if b.dialect == DIALECT]  # newest first
        ids = [b.id for b in batches]
        cursor = after or before
        if cursor is not None and cursor not in ids:
            return anthropic_error(400, f"{'after_id' if after else 'before_id'}: no message batch {cursor!r}")
        if before is not None:
            # The page just newer than `before_id`.
            end = ids.index(before)
            start = max(0, end - limit)
            page, has_more = batches[start:end], start > 0
        else:
            start = ids.index(after) + 1 if after is not None else 0
            page, has_more = batches[start : start + limit], start + limit < len(batches)
        data = [batch_json(b, base_url(request)) for b in page]
        return JSONResponse(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def found(request: Request) -> StoredBatch | Response:
        """The Anthropic batch the path names, or the answer refusing the request."""
        if (refused := unversioned(request)) is not None:
            return refused
        batch_id = request.path_params["batch_id"]
        batch = ours(batch_id)
        return not_found(batch_id) if batch is None else batch

    async def get_batch(request: Request) -> Response:
        batch = found(request)
        return batch if isinstance(batch, Response) else JSONResponse(batch_json(batch, base_url(request)))

    async def cancel_batch(request: Request) -> Response:
        if isinstance(target := found(request), Response):
            return target
        batch_id = target.id
        try:
            batch = await worker.cancel(batch_id, wait=False)
        except KeyError:
            return not_found(batch_id)
        except NotCancellable:
            now = ours(batch_id)
            assert now is not None
            if now.status.terminal:
                return anthropic_error(400, f"Message batch {batch_id} has already ended and cannot be canceled")
            # Finalizing: every request has its answer; it ends on its own in a moment.
            return JSONResponse(batch_json(now, base_url(request)))
        log.info("emulator.batch.cancel_requested", batch_id=batch.id, status=batch.status.value)
        return JSONResponse(batch_json(batch, base_url(request)))

    async def delete_batch(request: Request) -> Response:
        batch = found(request)
        if isinstance(batch, Response):
            return batch
        if not batch.status.terminal:
            message = f"Message batch {batch.id} has not ended yet; cancel it first to delete it"
            return anthropic_error(400, message)
        await state.delete_batch(batch.id)
        # Its request lines and results go with it: nothing can reach them any more.
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id is not None:
                await state.delete_file(file_id)
        log.info("emulator.batch.deleted", batch_id=batch.id)
        return JSONResponse({"id": batch.id, "type": "message_batch_deleted"})

    async def results(request: Request) -> Response:
        batch = found(request)
        if isinstance(batch, Response):
            return batch
        if not batch.status.terminal:
            return anthropic_error(404, f"The results of message batch {batch.id} are not available until it has ended")
        kept = [f for f in (batch.output_file_id, batch.error_file_id) if f is not None]
        if any(state.file(f) is None for f in kept):
            # Expired (`/_emulator/expire_results`): the batch is still shown, its results no longer.
            return anthropic_error(404, f"The results of message batch {batch.id} have expired")
        paths = [state.content_path(f) for f in kept]
        return StreamingResponse(_concatenated(paths), media_type="application/binary")

    return [
        Route(BATCHES, create_batch, methods=["POST"]),
        Route(BATCHES, list_batches, methods=["GET"]),
        Route(f"{BATCHES}/{{batch_id}}", get_batch, methods=["GET"]),
        Route(f"{BATCHES}/{{batch_id}}", delete_batch, methods=["DELETE"]),
        Route(f"{BATCHES}/{{batch_id}}/cancel", cancel_batch, methods=["POST"]),
        Route(f"{BATCHES}/{{batch_id}}/results", results, methods=["GET"]),
    ]


async def _concatenated(paths: list[Path]) -> AsyncIterator[bytes]:
    """The files' bytes one after the other, a chunk at a time (the results: succeeded lines,
    then the others; Anthropic's results come in no particular order)."""
    for path in paths:
        async with await anyio.open_file(path, "rb") as f:
            while chunk := await f.read(_CHUNK):
                yield chunk
