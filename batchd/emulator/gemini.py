"""The Gemini dialect's Batch Mode: `/gemini/{v1|v1beta}/models/{model}:batchGenerateContent`,
`/gemini/{v}/batches…`, and the Files API (`gemini_files.py`).

Shapes follow PROVIDERS.md and the official `google-genai` SDK (`batches.py`, whose
`_BatchJob_from_mldev` reads what is answered here):

* Create: `POST …/models/{model}:batchGenerateContent` with `{"batch": {"displayName",
  "inputConfig": {"fileName": "files/…"}}}` or inline `{"batch": {"inputConfig": {"requests":
  {"requests": [{"request": {…}, "metadata": {"key": …}}]}}}}`; snake_case keys too. The body is
  read up to 20 MB (Gemini's inline limit; 413 beyond). Answers the batch.
* Batch: an operation, `{"name": "batches/<id>", "metadata": {"@type": "…GenerateContentBatch",
  "name", "displayName", "model": "models/…", "inputConfig" (a file batch's), "state":
  "BATCH_STATE_…", "createTime", "updateTime", "endTime", "batchStats": {"requestCount",
  "successfulRequestCount", "failedRequestCount", "pendingRequestCount"} (strings), "output"},
  "done", "response": {"@type": "…GenerateContentBatchOutput", …the output} once done with one,
  "error": {"code" (gRPC), "message"} when it FAILED}`. `output` is `{"responsesFile": "files/…"}`
  or `{"inlinedResponses": {"inlinedResponses": [{"response" | "error", "metadata"}…]}}` (in
  the order of the requests), once the batch ended: SUCCEEDED (even with error lines), FAILED or
  CANCELLED with what it answered; never EXPIRED.
* States: validating → PENDING; in progress, finalizing, cancelling → RUNNING; completed →
  SUCCEEDED; then FAILED, CANCELLED, EXPIRED. A batch expires 48 h after its creation.
* `GET …/batches?pageSize=N&pageToken=…` → `{"operations": [...], "nextPageToken"}`, newest
  first, 50 a page unless asked (at most 1000; a larger size is cut to it).
* `POST …/batches/{id}:cancel` → `{}` (CANCELLED at once, or after `Timeline.cancelling_s`;
  400 FAILED_PRECONDITION once it ended). `DELETE …/batches/{id}` → `{}`: a batch not yet ended
  is cancelled first; a file batch's responses file stays.

The batch is the dialect-neutral record of `state.py`; the create turns its input into the
emulator's own request lines (`gemini_input.py`) and the worker runs it like any batch. A request
that is not valid (no key, a key used before, no contents, …) is an error line in the results,
not a refused batch.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.emulator.bodies import BadJson, read_json
from batchd.emulator.gemini_files import DIALECT, PREFIX, VERSIONS, gemini_file_routes, visible
from batchd.emulator.gemini_input import Converted, CreateProblem, convert_file, convert_inline, inline_responses
from batchd.emulator.gemini_pages import PageProblem, Place, micros, page, page_size
from batchd.emulator.google_errors import google_error, grpc_code
from batchd.emulator.inputs import limits_for
from batchd.emulator.queue import take_room
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch, StoredFile, install_file, iso_z
from batchd.emulator.worker import BatchWorker, NotCancellable
from batchd.models import MB, BatchEndpoint

log = structlog.get_logger()

#: Writes a batch's request lines and spool from its input: (lines, spool, model, max_requests).
Converter = Callable[[Path, Path, str, int], Converted]

BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
#: A batch still pending or running this long after its creation expires.
EXPIRY = timedelta(hours=48)
#: Gemini takes inline requests up to this size of create request.
MAX_CREATE_BYTES = 20 * MB
#: The purpose of the emulator's own request lines made from a batch's input (no dialect shows them).
REQUEST_LINES = "gemini-requests"
LIST_PAGE_DEFAULT = 50
LIST_PAGE_MAX = 1000

#: The emulator's statuses as Gemini's states.
STATES = {
    BatchStatus.VALIDATING: "BATCH_STATE_PENDING",
    BatchStatus.IN_PROGRESS: "BATCH_STATE_RUNNING",
    BatchStatus.FINALIZING: "BATCH_STATE_RUNNING",
    BatchStatus.CANCELLING: "BATCH_STATE_RUNNING",
    BatchStatus.COMPLETED: "BATCH_STATE_SUCCEEDED",
    BatchStatus.FAILED: "BATCH_STATE_FAILED",
    BatchStatus.CANCELLED: "BATCH_STATE_CANCELLED",
    BatchStatus.EXPIRED: "BATCH_STATE_EXPIRED",
}


def batch_json(batch: StoredBatch, output: dict[str, Any] | None) -> dict[str, Any]:
    """The batch as Gemini's operation; `output` as `output_of` made it."""
    name = f"batches/{batch.id}"
    moments = (batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.cancelling_at, batch.finished_at)
    metadata: dict[str, Any] = {"@type": BATCH_TYPE, "name": name, "model": batch.model_id}
    if batch.display_name is not None:
        metadata["displayName"] = batch.display_name
    if batch.source_file_id is not None:
        metadata["inputConfig"] = {"fileName": f"files/{batch.source_file_id}"}
    metadata |= {
        "state": STATES[batch.status],
        "createTime": iso_z(batch.created_at),
        "updateTime": iso_z(max(moment for moment in moments if moment is not None)),
    }
    if batch.status.terminal:
        metadata["endTime"] = iso_z(batch.finished_at)
    metadata["batchStats"] = {
        # int64 fields: strings in JSON.
        "requestCount": str(batch.total),
        "successfulRequestCount": str(batch.completed),
        "failedRequestCount": str(batch.failed),
        "pendingRequestCount": str(max(batch.total - batch.completed - batch.failed, 0)),
    }
    answer: dict[str, Any] = {"name": name, "metadata": metadata, "done": batch.status.terminal}
    if output is not None:
        metadata["output"] = output
        answer["response"] = {"@type": OUTPUT_TYPE, **output}
    if batch.status is BatchStatus.FAILED:
        status = "INVALID_ARGUMENT" if batch.error_code not in ("batch_failed", "internal_error") else "INTERNAL"
        answer["error"] = {"code": grpc_code(status), "message": batch.error or "the batch failed"}
    return answer


def batch_place(batch: StoredBatch) -> Place:
    """A batch's place in a list sorted newest first."""
    return micros(batch.created_at), batch.seq


def _field(data: dict[str, Any], camel: str, snake: str) -> Any:
    return data.get(camel, data.get(snake))


def gemini_routes(state: EmulatorState, worker: BatchWorker, clock: Clock) -> list[Route]:
    """The Gemini routes (batches and files) over the shared state, at both versions."""

    def ours(batch_id: str) -> StoredBatch | None:
        batch = state.batch(batch_id)
        return batch if batch is not None and batch.dialect == DIALECT else None

    def not_found(batch_id: str) -> Response:
        return google_error(404, f"Batch batches/{batch_id} not found.")

    async def output_of(batch: StoredBatch) -> dict[str, Any] | None:
        """What the batch gave, once it ended with something to give (an expired one gives nothing)."""
        if not batch.status.terminal or batch.status is BatchStatus.EXPIRED or batch.output_file_id is None:
            return None
        if batch.source_file_id is not None:
            return {"responsesFile": f"files/{batch.output_file_id}"}
        if state.file(batch.output_file_id) is None:
            return None  # expired (`/_emulator/expire_results`): the responses are gone
        results = state.content_path(batch.output_file_id)
        lines = state.content_path(batch.input_file_id)
        responses = await anyio.to_thread.run_sync(inline_responses, lines, results)
        return {"inlinedResponses": {"inlinedResponses": responses}}

    async def rendered(batch: StoredBatch) -> dict[str, Any]:
        return batch_json(batch, await output_of(batch))

    async def create_batch(request: Request) -> Response:
        model = f"models/{request.path_params['model']}"
        try:
            data = await read_json(request, limit=MAX_CREATE_BYTES)
        except BadJson as exc:
            return google_error(400, f"Invalid JSON payload received: {exc}")
        spec = data.get("batch") if isinstance(data, dict) else None
        if not isinstance(spec, dict):
            return google_error(400, 'batch is required: {"batch": {"displayName", "inputConfig"}}')
        display_name = _field(spec, "displayName", "display_name")
        if display_name is not None and not isinstance(display_name, str):
            return google_error(400, "batch.displayName must be a string")
        source = _field(spec, "inputConfig", "input_config")
        if not isinstance(source, dict):
            return google_error(400, "batch.inputConfig is required")
        file_name, inline = _field(source, "fileName", "file_name"), source.get("requests")
        if (file_name is None) == (inline is None):
            return google_error(400, "batch.inputConfig takes exactly one of fileName and requests")
        created = clock()
        batch = StoredBatch(
            id=state.new_batch_id(DIALECT),
            seq=0,
            dialect=DIALECT,
            input_file_id="",
            endpoint=BatchEndpoint.GENERATE_CONTENT,
            completion_window="48h",
            created_at=created,
            deadline=created + EXPIRY,
            file_size_bytes=0,
            model_id=model,
            display_name=display_name,
        )
        if file_name is not None:
            file_id = file_name.removeprefix("files/") if isinstance(file_name, str) else ""
            record = visible(state.file(file_id))
            if record is None:
                return google_error(404, f"File {file_name} not found or you do not have permission to access it.")
            if not record.uploaded:
                return google_error(400, f"File {file_name} has no content yet")
            batch.source_file_id = record.id
            batch.file_size_bytes = record.bytes
            refused = await convert(batch, partial(convert_file, state.content_path(record.id)))
        else:
            items = inline.get("requests") if isinstance(inline, dict) else None
            if not isinstance(items, list):
                return google_error(400, "batch.inputConfig.requests.requests must be a list of requests")
            refused = await convert(batch, partial(convert_inline, items))
        if refused is not None:
            return refused
        full = await take_room(state, worker.queue, batch)
        if full is not None:
            return google_error(429, f"Resource has been exhausted (the batch queue is full). {full}")
        batch.seq = state.next_seq()
        await state.save_batch(batch)
        worker.enqueue(batch.id)
        log.info("emulator.batch.created", batch_id=batch.id, requests=batch.total, dialect=DIALECT, model=model)
        return JSONResponse(await rendered(batch))

    async def convert(batch: StoredBatch, converter: Converter) -> Response | None:
        """Make the batch's request lines (and the error lines of its invalid requests) from its
        input with `converter(lines, spool, model, max_requests)`; None when done, else the
        create's refusal."""
        lines_tmp = state.temp_path("gemini-requests")
        spool_tmp = state.temp_path("gemini-spool")
        model, limit = batch.model_id or "", limits_for(DIALECT).max_requests
        try:
            try:
                converted = await anyio.to_thread.run_sync(converter, lines_tmp, spool_tmp, model, limit)
            except CreateProblem as exc:
                return google_error(400, str(exc))
            size = lines_tmp.stat().st_size
            record = StoredFile(
                id=state.new_file_id(DIALECT),
                seq=state.next_seq(),
                filename=f"batch-{batch.id}-requests.jsonl",
                purpose=REQUEST_LINES,
                file_type="jsonl",
                created_at=int(batch.created_at.timestamp()),
                bytes=size,
                line_count=converted.total,
                processed=True,
            )
            await state.install_content(record, lines_tmp)
            # The invalid requests' answers, ready before the worker first opens the spool.
            await anyio.to_thread.run_sync(install_file, spool_tmp, state.spool_path(batch.id))
        finally:
            await anyio.Path(lines_tmp).unlink(missing_ok=True)
            await anyio.Path(spool_tmp).unlink(missing_ok=True)
        batch.input_file_id = record.id
        batch.total = converted.total
        batch.file_size_bytes = batch.file_size_bytes or size
        return None

    async def list_batches(request: Request) -> Response:
        try:
            size = page_size(request.query_params.get("pageSize"), LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
            batches = [batch for batch in state.batches() if batch.dialect == DIALECT]  # newest first
            chosen, token = page(batches, batch_place, request.query_params.get("pageToken"), size)
        except PageProblem as exc:
            return google_error(400, str(exc))
        answer: dict[str, Any] = {"operations": [await rendered(batch) for batch in chosen]}
        if token is not None:
            answer["nextPageToken"] = token
        return JSONResponse(answer)

    async def get_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = ours(batch_id)
        return not_found(batch_id) if batch is None else JSONResponse(await rendered(batch))

    async def cancel(batch_id: str, *, wait: bool) -> Response | None:
        """Cancel the batch (with `wait`, it is CANCELLED on return); None when it is (or will be)
        cancelled, else the refusal."""
        try:
            batch = await worker.cancel(batch_id, wait=wait)
        except KeyError:
            return not_found(batch_id)
        except NotCancellable:
            now = ours(batch_id)
            if now is not None and now.status.terminal:
                message = f"Batch batches/{batch_id} has already ended ({STATES[now.status]})."
                return google_error(400, message, "FAILED_PRECONDITION")
            # Finalizing: every request has its answer; it ends on its own in a moment.
            return None
        log.info("emulator.batch.cancel_requested", batch_id=batch.id, status=batch.status.value)
        return None

    async def cancel_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if ours(batch_id) is None:
            return not_found(batch_id)
        # CANCELLED at once, unless the timeline asks for a visible cancelling period.
        refused = await cancel(batch_id, wait=worker.timeline.cancelling_s == 0)
        return refused if refused is not None else JSONResponse({})

    async def delete_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = ours(batch_id)
        if batch is None:
            return not_found(batch_id)
        if not batch.status.terminal:
            # Google forgets the operation without stopping it; the emulator keeps no run it cannot show.
            await cancel(batch_id, wait=True)
            if not batch.status.terminal:
                return google_error(409, f"Batch batches/{batch_id} is finishing; delete it in a moment.", "ABORTED")
        await state.delete_batch(batch_id)
        # The files nobody can reach any more go with it: its request lines, and an inline batch's
        # responses (a file batch's responses file is a file of the account's; it stays).
        unreachable = [batch.input_file_id, batch.output_file_id if batch.source_file_id is None else None]
        for file_id in unreachable:
            if file_id is not None:
                await state.delete_file(file_id)
        log.info("emulator.batch.deleted", batch_id=batch_id)
        return JSONResponse({})

    routes = gemini_file_routes(state, clock)
    for version in VERSIONS:
        base = f"{PREFIX}/{version}"
        routes += [
            Route(f"{base}/models/{{model}}:batchGenerateContent", create_batch, methods=["POST"]),
            Route(f"{base}/batches", list_batches, methods=["GET"]),
            Route(f"{base}/batches/{{batch_id}}:cancel", cancel_batch, methods=["POST"]),
            Route(f"{base}/batches/{{batch_id}}", get_batch, methods=["GET"]),
            Route(f"{base}/batches/{{batch_id}}", delete_batch, methods=["DELETE"]),
        ]
    return routes
