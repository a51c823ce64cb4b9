"""The Together dialect: `/v1/files…` and `/v1/batches…` in Together's wire shapes.

Shapes follow PROVIDERS.md and the official `together` SDK's types: FileResponse
has PascalCase `FileType` / `LineCount` / `Processed` and unix-second
`created_at`; BatchJob has upper-case `status` and ISO-8601 times; batch
endpoints answer errors as `{"error": "text"}`, file endpoints as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import structlog
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.emulator.bodies import BadJson, read_json
from batchd.emulator.queue import take_room
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch, StoredFile, iso_z
from batchd.emulator.transfer import content_response, receive_upload_file
from batchd.emulator.triggers import openai_error_body
from batchd.emulator.worker import BatchWorker, NotCancellable
from batchd.models import SUPPORTED_ENDPOINTS

log = structlog.get_logger()

#: The `user_id` of every batch: the emulator has one account.
EMULATOR_USER_ID = "user-batchd-emulator"
#: Purposes the SDK accepts (together.types.FilePurpose).
FILE_PURPOSES = ("fine-tune", "calibration", "eval", "batch-api")
FILE_TYPES = ("jsonl", "csv", "parquet")
#: The route name of the presigned-style upload URL (registered by the app).
UPLOAD_ROUTE = "emulator_upload"

#: OpenAI's purposes as Together names them (a file uploaded through one dialect, seen through the other).
TOGETHER_PURPOSES = {"batch": "batch-api", "batch_output": "batch-api"}
#: Statuses Together does not have: finalizing is still IN_PROGRESS (at 100%); cancelling is
#: CANCELING, as an older Together SDK spells it.
TOGETHER_STATUS = {BatchStatus.FINALIZING: "IN_PROGRESS", BatchStatus.CANCELLING: "CANCELING"}

_CHECKSUM = re.compile(r"^[0-9a-f]{64}$")
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_WINDOW_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def file_json(record: StoredFile) -> dict[str, Any]:
    """A FileResponse."""
    return {
        "id": record.id,
        "object": "file",
        "created_at": record.created_at,
        "filename": record.filename,
        "bytes": record.bytes,
        "purpose": TOGETHER_PURPOSES.get(record.purpose, record.purpose),
        "FileType": record.file_type,
        "LineCount": record.line_count,
        "Processed": record.processed,
    }


def batch_json(batch: StoredBatch) -> dict[str, Any]:
    """A BatchJob."""
    return {
        "id": batch.id,
        "user_id": EMULATOR_USER_ID,
        "input_file_id": batch.input_file_id,
        "file_size_bytes": batch.file_size_bytes,
        "status": TOGETHER_STATUS.get(batch.status, batch.status.value.upper()),
        "job_deadline": iso_z(batch.deadline),
        "created_at": iso_z(batch.created_at),
        "endpoint": batch.endpoint,
        "progress": batch.progress,
        "model_id": batch.model_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "error": batch.error,
        "completed_at": iso_z(batch.finished_at),
    }


def file_error(status: int, message: str, *, code: str | None = None) -> Response:
    """An error of the file (and other non-batch) endpoints."""
    return JSONResponse(openai_error_body(status, message, code=code), status_code=status)


def batch_error(status: int, message: str) -> Response:
    """An error of the batch endpoints: a bare string."""
    return JSONResponse({"error": message}, status_code=status)


def parse_window(text: str) -> timedelta | None:
    """`24h`, `30m`, `2d`, `90s` → a duration; None when malformed or zero."""
    match = _WINDOW.match(text)
    if match is None or int(match.group(1)) == 0:
        return None
    return timedelta(**{_WINDOW_UNITS[match.group(2)]: int(match.group(1))})


def together_routes(state: EmulatorState, worker: BatchWorker, clock: Clock) -> list[Route]:
    """The Together routes over the shared state."""

    def now_s() -> int:
        return int(clock().timestamp())

    async def create_file(request: Request) -> Response:
        async with request.form() as form:
            purpose = form.get("purpose")
            if not isinstance(purpose, str) or purpose not in FILE_PURPOSES:
                return file_error(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}", code="invalid_purpose")
            upload = form.get("file")
            if isinstance(upload, UploadFile):
                return await _direct_upload(form.get("file_type"), purpose, upload)
            return await _start_upload(
                request, purpose, form.get("file_name"), form.get("file_type"), form.get("checksum")
            )

    async def _direct_upload(file_type: Any, purpose: str, upload: UploadFile) -> Response:
        """One multipart request with the content: stored and processed at once (200)."""
        filename = upload.filename or "upload.jsonl"
        if not isinstance(file_type, str):
            file_type = filename.rsplit(".", 1)[-1].lower() if "." in filename else "jsonl"
        if file_type not in FILE_TYPES:
            return file_error(400, f"file_type must be one of {', '.join(FILE_TYPES)}")
        sink = await receive_upload_file(upload, state)
        record = StoredFile(
            id=state.new_file_id(),
            seq=state.next_seq(),
            filename=filename,
            purpose=purpose,
            file_type=file_type,
            created_at=now_s(),
            bytes=sink.size,
            line_count=sink.line_count,
            checksum=sink.sha256,
            processed=True,
        )
        await state.install_content(record, sink.path)
        log.info("emulator.file.uploaded", file_id=record.id, bytes=record.bytes, flow="direct")
        return JSONResponse(file_json(record))

    async def _start_upload(request: Request, purpose: str, file_name: Any, file_type: Any, checksum: Any) -> Response:
        """Step 1 of the SDK's upload: 409 with the existing file, or 302 to a presigned URL."""
        if not isinstance(file_name, str) or not file_name:
            return file_error(400, "file_name is required (or send the content as a `file` part)")
        if file_type not in FILE_TYPES:
            return file_error(400, f"file_type must be one of {', '.join(FILE_TYPES)}")
        if not isinstance(checksum, str) or not _CHECKSUM.match(checksum):
            return file_error(400, "checksum must be the sha256 hex digest of the file")
        existing = state.find_processed_by_checksum(checksum)
        if existing is not None:
            log.info("emulator.file.exists", file_id=existing.id)
            return JSONResponse({"file_id": existing.id}, status_code=409)
        record = StoredFile(
            id=state.new_file_id(),
            seq=state.next_seq(),
            filename=file_name,
            purpose=purpose,
            file_type=file_type,
            created_at=now_s(),
            checksum=checksum,
        )
        await state.save_file(record)
        location = request.url_for(UPLOAD_ROUTE, file_id=record.id).include_query_params(
            signature=state.sign(record.id)
        )
        log.info("emulator.file.pending", file_id=record.id)
        return Response(status_code=302, headers={"Location": str(location), "X-Together-File-Id": record.id})

    async def preprocess(request: Request) -> Response:
        record = state.file(request.path_params["file_id"])
        if record is None:
            return file_error(404, "file not found", code="file_not_found")
        if not record.uploaded:
            return file_error(400, "the file's content was never uploaded")
        if not record.processed:
            record.processed = True
            await state.save_file(record)
            log.info("emulator.file.uploaded", file_id=record.id, bytes=record.bytes, flow="presigned")
        return JSONResponse(file_json(record))

    async def list_files(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [file_json(f) for f in state.files()]})

    async def get_file(request: Request) -> Response:
        record = state.file(request.path_params["file_id"])
        if record is None:
            return file_error(404, "file not found", code="file_not_found")
        return JSONResponse(file_json(record))

    async def delete_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if state.file(file_id) is None:
            return file_error(404, "file not found", code="file_not_found")
        reader = state.reader_of(file_id)
        if reader is not None:
            return file_error(400, f"the file is the input of batch {reader.id}, which has not ended")
        await state.delete_file(file_id)
        log.info("emulator.file.deleted", file_id=file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def file_content(request: Request) -> Response:
        record = state.file(request.path_params["file_id"])
        if record is None:
            return file_error(404, "file not found", code="file_not_found")
        if not record.uploaded:
            return file_error(400, "the file has no content yet")
        return content_response(request, state.content_path(record.id), record.bytes)

    async def create_batch(request: Request) -> Response:
        try:
            data = await read_json(request)
        except BadJson as exc:
            return batch_error(400, f"the request body must be JSON: {exc}")
        if not isinstance(data, dict):
            return batch_error(400, "the request body must be a JSON object")
        input_file_id = data.get("input_file_id")
        record = state.file(input_file_id) if isinstance(input_file_id, str) else None
        if record is None or not record.processed:
            return batch_error(400, f"input file {input_file_id!r} not found or not processed")
        endpoint = data.get("endpoint")
        if endpoint not in SUPPORTED_ENDPOINTS:
            return batch_error(400, f"unsupported endpoint {endpoint!r}")
        window_text = data.get("completion_window") or "24h"
        window = parse_window(window_text) if isinstance(window_text, str) else None
        if window is None:
            return batch_error(400, f"invalid completion_window {window_text!r}")
        model_id, priority = data.get("model_id"), data.get("priority")
        if model_id is not None and not isinstance(model_id, str):
            return batch_error(400, "model_id must be a string")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            return batch_error(400, "priority must be an integer")
        created = clock()
        batch = StoredBatch(
            id=state.new_batch_id("together"),
            seq=state.next_seq(),
            dialect="together",
            input_file_id=record.id,
            endpoint=endpoint,
            completion_window=window_text,
            created_at=created,
            deadline=created + window,
            file_size_bytes=record.bytes,
            model_id=model_id,
            priority=priority,
        )
        full = await take_room(state, worker.queue, batch)
        if full is not None:
            return batch_error(429, f"Queued token limit exceeded for your account: {full}")
        await state.save_batch(batch)
        worker.enqueue(batch.id)
        log.info("emulator.batch.created", batch_id=batch.id, input_file_id=record.id, endpoint=endpoint)
        return JSONResponse({"job": batch_json(batch), "warning": None}, status_code=201)

    async def list_batches(request: Request) -> Response:
        return JSONResponse([batch_json(b) for b in state.batches()])

    async def get_batch(request: Request) -> Response:
        batch = state.batch(request.path_params["batch_id"])
        if batch is None:
            return batch_error(404, "batch not found")
        return JSONResponse(batch_json(batch))

    async def cancel_batch(request: Request) -> Response:
        try:
            # Together answers CANCELLED at once, unless the timeline asks for a visible cancelling period.
            wait = worker.timeline.cancelling_s == 0
            batch = await worker.cancel(request.path_params["batch_id"], wait=wait)
        except KeyError:
            return batch_error(404, "batch not found")
        except NotCancellable as exc:
            return batch_error(400, f"batch is {str(exc).upper()} and cannot be cancelled")
        log.info("emulator.batch.cancel_requested", batch_id=batch.id, status=batch.status.value)
        return JSONResponse(batch_json(batch))

    return [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/preprocess", preprocess, methods=["POST"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]
