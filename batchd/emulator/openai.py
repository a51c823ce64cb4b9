"""The OpenAI dialect: `/openai/v1/files…` and `/openai/v1/batches…` in OpenAI's wire shapes.

Shapes follow PROVIDERS.md and the official `openai` SDK's types
(`openai.types.Batch`, `FileObject`): lower-case statuses, unix-second times,
`request_counts`, `errors` as a list object, cursor pagination
(`after`, `limit`, `has_more`), and every error as `{"error": {"message",
"type", "param", "code"}}`. The records are the same as the Together
dialect's (`state.py`): only the rendering differs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import structlog
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.emulator.bodies import BadJson, read_json
from batchd.emulator.queue import take_room
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch, StoredFile
from batchd.emulator.transfer import content_response, receive_upload_file
from batchd.emulator.triggers import openai_error_body
from batchd.emulator.worker import BatchWorker, NotCancellable
from batchd.models import SUPPORTED_ENDPOINTS

log = structlog.get_logger()

#: Where the dialect is mounted: the SDK's base URL is `http://host:port/openai/v1`.
PREFIX = "/openai/v1"
#: Purposes the files endpoint accepts (an upload's purpose; `batch_output` is the emulator's own).
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
#: Purposes a batch's input file may have (`batch-api`: uploaded through the Together dialect).
BATCH_INPUT_PURPOSES = ("batch", "batch-api")
#: The only completion window OpenAI accepts.
COMPLETION_WINDOW = "24h"
#: Files uploaded for batches expire after 30 days unless `expires_after` says otherwise.
DEFAULT_FILE_TTL_S = 30 * 24 * 3600
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100
FILES_MAX_LIMIT = 10_000
_CREATE_KEYS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"})


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    """An error in OpenAI's shape."""
    body = openai_error_body(status, message, code=code)
    body["error"]["param"] = param
    return JSONResponse(body, status_code=status)


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_json(record: StoredFile) -> dict[str, Any]:
    """A FileObject."""
    if record.result_of is not None:
        purpose = "batch_output"
    elif record.purpose == "batch-api":
        purpose = "batch"
    else:
        purpose = record.purpose
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": purpose,
        "status": "processed" if record.processed else "uploaded",
        "status_details": None,
    }


def _errors(batch: StoredBatch) -> dict[str, Any] | None:
    if batch.error is None:
        return None
    error = {"code": batch.error_code, "line": batch.error_line, "message": batch.error, "param": batch.error_param}
    return {"object": "list", "data": [error]}


def batch_json(batch: StoredBatch) -> dict[str, Any]:
    """A Batch."""
    status = batch.status
    finished = _unix(batch.finished_at)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": _errors(batch),
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _unix(batch.created_at),
        "in_progress_at": _unix(batch.in_progress_at),
        "expires_at": _unix(batch.deadline),
        "finalizing_at": _unix(batch.finalizing_at),
        "completed_at": finished if status is BatchStatus.COMPLETED else None,
        "failed_at": finished if status is BatchStatus.FAILED else None,
        "expired_at": finished if status is BatchStatus.EXPIRED else None,
        "cancelling_at": _unix(batch.cancelling_at),
        "cancelled_at": finished if status is BatchStatus.CANCELLED else None,
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
        "model": batch.model_id,
        "usage": {
            "input_tokens": batch.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": batch.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": batch.input_tokens + batch.output_tokens,
        },
    }


def check_metadata(value: Any) -> str | None:
    """Why `metadata` is not acceptable (≤16 string pairs, keys ≤64, values ≤512 characters), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return "metadata must be an object of string keys and values"
    if len(value) > METADATA_MAX_PAIRS:
        return f"metadata may hold at most {METADATA_MAX_PAIRS} pairs"
    for key, item in value.items():
        if not isinstance(item, str):
            return f"metadata value for {key!r} must be a string"
        if len(key) > METADATA_MAX_KEY:
            return f"metadata keys may be at most {METADATA_MAX_KEY} characters"
        if len(item) > METADATA_MAX_VALUE:
            return f"metadata values may be at most {METADATA_MAX_VALUE} characters"
    return None


def _limit(request: Request, default: int, highest: int) -> int | None:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 1 <= value <= highest else None


def _page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool] | None:
    """The page after the item whose id is `after` (None: unknown id)."""
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            return None
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


def _listing(data: list[dict[str, Any]], has_more: bool) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def _expires_after(form: FormData, created: int) -> int | str:
    """The file's `expires_at` from the optional `expires_after[anchor|seconds]` fields, or an error text."""
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return created + DEFAULT_FILE_TTL_S
    if anchor != "created_at":
        return "expires_after[anchor] must be created_at"
    try:
        value = int(seconds) if isinstance(seconds, str) else -1
    except ValueError:
        value = -1
    if not 3600 <= value <= DEFAULT_FILE_TTL_S:
        return f"expires_after[seconds] must be from 3600 to {DEFAULT_FILE_TTL_S}"
    return created + value


def openai_routes(state: EmulatorState, worker: BatchWorker, clock: Clock) -> list[Route]:
    """The OpenAI routes over the shared state."""

    def now_s() -> int:
        return int(clock().timestamp())

    def not_found(kind: str, object_id: str) -> Response:
        return openai_error(404, f"No such {kind} object: {object_id}", param="id")

    async def create_file(request: Request) -> Response:
        async with request.form() as form:
            purpose = form.get("purpose")
            if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
                message = f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}"
                return openai_error(400, message, param="purpose")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return openai_error(400, "a file part named 'file' is required", param="file")
            filename = upload.filename or "upload.jsonl"
            if purpose == "batch" and not filename.endswith(".jsonl"):
                return openai_error(400, "Invalid file format for Batch API. Must be .jsonl", param="file")
            created = now_s()
            expires_at = _expires_after(form, created)
            if isinstance(expires_at, str):
                return openai_error(400, expires_at, param="expires_after")
            sink = await receive_upload_file(upload, state)
        record = StoredFile(
            id=state.new_file_id(),
            seq=state.next_seq(),
            filename=filename,
            purpose=purpose,
            file_type=filename.rsplit(".", 1)[-1].lower() if "." in filename else "jsonl",
            created_at=created,
            bytes=sink.size,
            line_count=sink.line_count,
            checksum=sink.sha256,
            processed=True,
            expires_at=expires_at,
        )
        await state.install_content(record, sink.path)
        log.info("emulator.file.uploaded", file_id=record.id, bytes=record.bytes, flow="openai")
        return JSONResponse(file_json(record))

    async def list_files(request: Request) -> Response:
        limit = _limit(request, FILES_MAX_LIMIT, FILES_MAX_LIMIT)
        if limit is None:
            return openai_error(400, f"limit must be from 1 to {FILES_MAX_LIMIT}", param="limit")
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            return openai_error(400, "order must be asc or desc", param="order")
        purpose = request.query_params.get("purpose")
        records = [r for r in state.files() if purpose is None or file_json(r)["purpose"] == purpose]
        if order == "asc":
            records.reverse()
        page = _page(records, request.query_params.get("after"), limit)
        if page is None:
            return openai_error(400, "after must be the id of a listed file", param="after")
        items, has_more = page
        return _listing([file_json(r) for r in items], has_more)

    async def get_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        record = state.file(file_id)
        if record is None:
            return not_found("File", file_id)
        return JSONResponse(file_json(record))

    async def delete_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if state.file(file_id) is None:
            return not_found("File", file_id)
        reader = state.reader_of(file_id)
        if reader is not None:
            return openai_error(400, f"File {file_id} is the input of batch {reader.id}, which has not ended")
        await state.delete_file(file_id)
        log.info("emulator.file.deleted", file_id=file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def file_content(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        record = state.file(file_id)
        if record is None:
            return not_found("File", file_id)
        if not record.uploaded:
            return openai_error(400, "the file has no content yet", param="file_id")
        return content_response(request, state.content_path(record.id), record.bytes)

    async def create_batch(request: Request) -> Response:
        try:
            data = await read_json(request)
        except BadJson as exc:
            message = f"We could not parse the JSON body of your request ({exc})."
            return openai_error(400, message)
        if not isinstance(data, dict):
            return openai_error(400, "the request body must be a JSON object")
        unknown = sorted(set(data) - _CREATE_KEYS)
        if unknown:
            return openai_error(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
        input_file_id = data.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            return openai_error(400, "input_file_id is required", param="input_file_id")
        record = state.file(input_file_id)
        if record is None:
            return openai_error(404, f"No such File object: {input_file_id}", param="input_file_id")
        if record.result_of is not None or record.purpose not in BATCH_INPUT_PURPOSES or not record.processed:
            message = f"File {input_file_id} was not uploaded with purpose 'batch'"
            return openai_error(400, message, param="input_file_id")
        endpoint = data.get("endpoint")
        if endpoint not in SUPPORTED_ENDPOINTS:
            message = f"endpoint must be one of {', '.join(SUPPORTED_ENDPOINTS)} (the emulator's endpoints)"
            return openai_error(400, message, param="endpoint")
        if data.get("completion_window") != COMPLETION_WINDOW:
            return openai_error(400, "completion_window must be '24h'", param="completion_window")
        problem = check_metadata(data.get("metadata"))
        if problem is not None:
            return openai_error(400, problem, param="metadata")
        created = clock()
        batch = StoredBatch(
            id=state.new_batch_id("openai"),
            seq=state.next_seq(),
            dialect="openai",
            input_file_id=record.id,
            endpoint=endpoint,
            completion_window=COMPLETION_WINDOW,
            created_at=created,
            deadline=created + timedelta(hours=24),
            file_size_bytes=record.bytes,
            metadata=data.get("metadata"),
        )
        full = await take_room(state, worker.queue, batch)
        if full is not None:
            # As OpenAI does: the batch is created (the answer says validating), then fails
            # before any of it runs.
            accepted = batch_json(batch)
            batch.status, batch.finished_at, batch.error_code = BatchStatus.FAILED, created, "token_limit_exceeded"
            batch.error = (
                f"Enqueued token limit reached in organization org-emulator. {full} "
                "Please try again once some in_progress batches have been completed."
            )
            await state.save_batch(batch)
            log.info("emulator.batch.created", batch_id=batch.id, input_file_id=record.id, queue="full")
            return JSONResponse(accepted)
        await state.save_batch(batch)
        worker.enqueue(batch.id)
        log.info("emulator.batch.created", batch_id=batch.id, input_file_id=record.id, endpoint=endpoint)
        return JSONResponse(batch_json(batch))

    async def list_batches(request: Request) -> Response:
        limit = _limit(request, LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT)
        if limit is None:
            return openai_error(400, f"limit must be from 1 to {LIST_MAX_LIMIT}", param="limit")
        page = _page(state.batches(), request.query_params.get("after"), limit)
        if page is None:
            return openai_error(400, "after must be the id of a listed batch", param="after")
        items, has_more = page
        return _listing([batch_json(b) for b in items], has_more)

    async def get_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = state.batch(batch_id)
        if batch is None:
            return not_found("Batch", batch_id)
        return JSONResponse(batch_json(batch))

    async def cancel_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        try:
            batch = await worker.cancel(batch_id, wait=False)
        except KeyError:
            return not_found("Batch", batch_id)
        except NotCancellable as exc:
            # 400, not 409: the SDK would retry a 409.
            return openai_error(400, f"Cannot cancel a batch with status '{exc}'.", code="batch_not_cancellable")
        log.info("emulator.batch.cancel_requested", batch_id=batch.id, status=batch.status.value)
        return JSONResponse(batch_json(batch))

    return [
        Route(f"{PREFIX}/files", create_file, methods=["POST"]),
        Route(f"{PREFIX}/files", list_files, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id}}", get_file, methods=["GET"]),
        Route(f"{PREFIX}/files/{{file_id}}", delete_file, methods=["DELETE"]),
        Route(f"{PREFIX}/files/{{file_id}}/content", file_content, methods=["GET"]),
        Route(f"{PREFIX}/batches", create_batch, methods=["POST"]),
        Route(f"{PREFIX}/batches", list_batches, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id}}", get_batch, methods=["GET"]),
        Route(f"{PREFIX}/batches/{{batch_id}}/cancel", cancel_batch, methods=["POST"]),
    ]
