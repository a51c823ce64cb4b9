"""The Gemini dialect's Files API: resumable uploads, file objects, downloads.

Shapes follow PROVIDERS.md and the official `google-genai` SDK (`files.py`, `_api_client.py`):

* Upload, in two steps. `POST /gemini/upload/{v1|v1beta}/files` with `X-Goog-Upload-Protocol:
  resumable`, `X-Goog-Upload-Command: start`, `X-Goog-Upload-Header-Content-Length` (the file's
  size) and `-Content-Type`, and a JSON body `{"file": {"displayName", "mimeType", "name"}}`
  (snake_case too; all optional) answers 200 with an empty body, `X-Goog-Upload-Status: active`
  and `X-Goog-Upload-URL`: the session's absolute URL, the same path with `upload_id` and a
  `signature`. That URL authorises itself (the SDK sends no key there). `POST` the bytes to it
  with `X-Goog-Upload-Command: upload` (more to come; answered `active`) or `upload, finalize`
  (the last piece) and `X-Goog-Upload-Offset` (the bytes sent so far): the finalize answers
  `{"file": File}` with `X-Goog-Upload-Status: final`. `query` answers the bytes received
  (`X-Goog-Upload-Size-Received`); `cancel` drops the session. A wrong offset is a 400 that
  keeps the session (`active`, with the size received); more or fewer bytes than declared end
  it (`final`). Sessions live in memory: a restart forgets the unfinished ones.
* File: `{"name": "files/<id>", "displayName", "mimeType", "sizeBytes" (a string),
  "createTime", "updateTime", "expirationTime" (48 h on; never enforced), "sha256Hash" (base64 of
  the digest), "uri", "state": "ACTIVE", "source": "UPLOADED" | "GENERATED"}`, plus
  `downloadUri` for a batch's responses file (GENERATED). A `name` given at the start (`[a-z0-9-]`,
  at most 40) is the file's id; taken already: 409 ALREADY_EXISTS.
* `GET files/{id}`, `DELETE files/{id}` (answers `{}`), `GET files?pageSize=N&pageToken=…`
  (`{"files": [...], "nextPageToken"}`, newest first; 10 a page unless asked, at most 100).
* Content: `GET /gemini/{v}/files/{id}:download?alt=media` (what the SDK uses) and
  `GET /gemini/download/{v}/files/{id}:download?alt=media` (older clients), with `Range`.

The dialect sees the files uploaded through it and the responses files of its batches, not the
other dialects' files. Every error is Google's `{"error": {"code", "message", "status"}}`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio
import anyio.to_thread
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.emulator.bodies import BadJson, read_json
from batchd.emulator.gemini_pages import PageProblem, Place, page, page_size
from batchd.emulator.google_errors import google_error
from batchd.emulator.state import Clock, EmulatorState, StoredFile, iso_z
from batchd.emulator.transfer import content_response
from batchd.models import PROVIDER_LIMITS

log = structlog.get_logger()

#: Where the dialect is mounted: the SDK's base URL is `http://host:port/gemini`.
PREFIX = "/gemini"
#: The API versions served side by side (the SDK uses v1; older clients and the docs, v1beta).
VERSIONS = ("v1", "v1beta")
DIALECT = "gemini"
#: The purpose of a file uploaded through this dialect, or of a responses file of its batches:
#: the files it shows.
FILE_PURPOSE = "gemini"
#: Gemini keeps a file 48 hours.
FILE_TTL = timedelta(hours=48)
#: The largest file Gemini takes.
MAX_FILE_BYTES = PROVIDER_LIMITS[DIALECT].max_bytes
FILES_PAGE_DEFAULT = 10
FILES_PAGE_MAX = 100
#: The upload paths: the start call, and (with `upload_id`) the session's own URL.
UPLOAD_PATHS = frozenset(f"{PREFIX}/upload/{version}/files" for version in VERSIONS)
#: What a client may name its file.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
_COMMANDS = frozenset({"upload", "finalize", "query", "cancel"})


def is_upload_session(path: str, query_string: bytes) -> bool:
    """Whether a request goes to an upload session's URL (guarded by its signature, not the key)."""
    return path in UPLOAD_PATHS and "upload_id" in parse_qs(query_string.decode("latin-1"))


def visible(record: StoredFile | None) -> StoredFile | None:
    """The file if this dialect shows it (uploaded through it, or a responses file of its batches)."""
    return record if record is not None and record.purpose == FILE_PURPOSE else None


def file_json(record: StoredFile, api_base: str) -> dict[str, Any]:
    """A File; `api_base` is this emulator's `…/gemini/{version}`."""
    created = iso_z(datetime.fromtimestamp(record.created_at, UTC))
    expires = record.expires_at if record.expires_at is not None else record.created_at + int(FILE_TTL.total_seconds())
    answer: dict[str, Any] = {"name": f"files/{record.id}"}
    if record.filename:
        answer["displayName"] = record.filename
    answer |= {
        "mimeType": record.mime_type or "application/octet-stream",
        "sizeBytes": str(record.bytes),
        "createTime": created,
        "updateTime": created,
        "expirationTime": iso_z(datetime.fromtimestamp(expires, UTC)),
    }
    if record.checksum is not None:
        # A proto `bytes` field: the digest itself, base64 in JSON.
        answer["sha256Hash"] = base64.b64encode(bytes.fromhex(record.checksum)).decode()
    answer |= {"uri": f"{api_base}/files/{record.id}", "state": "ACTIVE"}
    if record.result_of is not None:
        answer |= {"source": "GENERATED", "downloadUri": f"{api_base}/files/{record.id}:download?alt=media"}
    else:
        answer["source"] = "UPLOADED"
    return answer


def api_base(request: Request) -> str:
    """`http://host:port/gemini/{version}` of the version the request came in on."""
    version = next((v for v in VERSIONS if f"/{v}/" in request.url.path), VERSIONS[-1])
    return f"{str(request.base_url).rstrip('/')}{PREFIX}/{version}"


def file_place(record: StoredFile) -> Place:
    """A file's place in a list sorted newest first."""
    return record.created_at * 1_000_000, record.seq


@dataclass
class UploadSession:
    """A resumable upload in progress: where its bytes go, and how many came."""

    id: str
    file_id: str
    display_name: str
    mime_type: str
    #: the size the start call declared
    size: int
    path: Path
    received: int = 0
    newlines: int = 0
    last_byte: bytes = b""
    sha256: Any = field(default_factory=hashlib.sha256)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def line_count(self) -> int:
        """Lines received, counting a last line without a newline."""
        return self.newlines + (1 if self.last_byte not in (b"", b"\n") else 0)


def _signed(session_id: str) -> str:
    # Apart from file ids, so that a session's signature never opens Together's upload URL.
    return f"gemini-upload/{session_id}"


def _upload_answer(status: str, session: UploadSession | None = None) -> dict[str, str]:
    answer = {"X-Goog-Upload-Status": status}
    if session is not None:
        answer["X-Goog-Upload-Size-Received"] = str(session.received)
    return answer


def _upload_error(code: int, message: str, status: str, session: UploadSession | None = None) -> Response:
    """An error of the upload: Google's shape, with the session's status so the SDK does not retry
    (it retries an answer without `X-Goog-Upload-Status`, sleeping between tries)."""
    response = google_error(code, message)
    response.headers.update(_upload_answer(status, session))
    return response


def _field(data: dict[str, Any], camel: str, snake: str) -> Any:
    return data.get(camel, data.get(snake))


def gemini_file_routes(state: EmulatorState, clock: Clock) -> list[Route]:
    """The Files API routes over the shared state, at both versions."""
    sessions: dict[str, UploadSession] = {}

    def not_found(file_id: str) -> Response:
        return google_error(404, f"File files/{file_id} not found or you do not have permission to access it.")

    async def drop(session: UploadSession) -> None:
        sessions.pop(session.id, None)
        await anyio.Path(session.path).unlink(missing_ok=True)

    async def upload(request: Request) -> Response:
        session_id = request.query_params.get("upload_id")
        if session_id is not None:
            return await upload_to_session(request, session_id)
        return await start_upload(request)

    async def start_upload(request: Request) -> Response:
        headers = request.headers
        if headers.get("x-goog-upload-protocol", "").lower() != "resumable":
            return google_error(400, "X-Goog-Upload-Protocol must be resumable (the emulator takes no other upload)")
        if headers.get("x-goog-upload-command", "").lower() != "start":
            return google_error(400, "X-Goog-Upload-Command must be start")
        declared = headers.get("x-goog-upload-header-content-length", "")
        if not declared.isascii() or not declared.isdigit():
            return google_error(400, "X-Goog-Upload-Header-Content-Length must be the file's size in bytes")
        if int(declared) > MAX_FILE_BYTES:
            return google_error(400, f"the file is larger than {MAX_FILE_BYTES} bytes")
        try:
            data = await read_json(request, empty={})
        except BadJson as exc:
            return google_error(400, f"Invalid JSON payload received: {exc}")
        spec = data.get("file", {}) if isinstance(data, dict) else None
        if not isinstance(spec, dict):
            return google_error(400, 'the body must be {"file": {...}}')
        display_name = _field(spec, "displayName", "display_name") or ""
        mime_type = _field(spec, "mimeType", "mime_type") or headers.get("x-goog-upload-header-content-type")
        name = spec.get("name")
        if not isinstance(display_name, str) or len(display_name) > 512:
            return google_error(400, "file.displayName must be a string of at most 512 characters")
        if mime_type is not None and not isinstance(mime_type, str):
            return google_error(400, "file.mimeType must be a string")
        file_id = state.new_file_id(DIALECT)
        if name is not None:
            file_id = name.removeprefix("files/") if isinstance(name, str) else ""
            if not _NAME.fullmatch(file_id):
                return google_error(
                    400, "file.name must be files/ and 1 to 40 of a-z, 0-9 and -, not starting or ending with -"
                )
            if state.file(file_id) is not None:
                return google_error(409, f"File files/{file_id} already exists.")
        session = UploadSession(
            id=uuid.uuid4().hex,
            file_id=file_id,
            display_name=display_name,
            mime_type=mime_type or "application/octet-stream",
            size=int(declared),
            path=state.temp_path("gemini-upload"),
        )
        await anyio.Path(session.path).touch()
        sessions[session.id] = session
        query = {"upload_id": session.id, "upload_protocol": "resumable", "signature": state.sign(_signed(session.id))}
        url = str(request.url.replace(query=urlencode(query)))
        log.info("emulator.gemini.upload_started", upload_id=session.id, file_id=file_id, size=session.size)
        return Response(status_code=200, headers={**_upload_answer("active"), "X-Goog-Upload-URL": url})

    async def upload_to_session(request: Request, session_id: str) -> Response:
        session = sessions.get(session_id)
        if session is None or not state.verify(_signed(session_id), request.query_params.get("signature", "")):
            return _upload_error(404, "No such upload session (finished, cancelled or never started).", "final")
        raw = request.headers.get("x-goog-upload-command", "").lower()
        commands = {part.strip() for part in raw.split(",") if part.strip()}
        alone = commands & {"query", "cancel"}
        if not commands or not commands <= _COMMANDS or (alone and len(commands) > 1):
            message = "X-Goog-Upload-Command must be upload, finalize, 'upload, finalize', query or cancel"
            return _upload_error(400, message, "active", session)
        async with session.lock:
            if "query" in commands:
                return Response(status_code=200, headers=_upload_answer("active", session))
            if "cancel" in commands:
                await drop(session)
                return Response(status_code=200, headers=_upload_answer("cancelled"))
            if "upload" in commands:
                refused = await receive_piece(request, session)
                if refused is not None:
                    return refused
            if "finalize" in commands:
                return await finalize(request, session)
        return Response(status_code=200, headers=_upload_answer("active", session))

    async def receive_piece(request: Request, session: UploadSession) -> Response | None:
        """Append the request's bytes at the declared offset; an error answer, or None."""
        offset = request.headers.get("x-goog-upload-offset", "")
        if not offset.isascii() or not offset.isdigit() or int(offset) != session.received:
            message = f"X-Goog-Upload-Offset must be {session.received}, the bytes received so far (got {offset!r})"
            return _upload_error(400, message, "active", session)
        async with await anyio.open_file(session.path, "ab") as f:
            async for chunk in request.stream():
                if session.received + len(chunk) > session.size:
                    await drop(session)
                    return _upload_error(400, f"more bytes than the {session.size} declared", "final")
                await f.write(chunk)
                session.sha256.update(chunk)
                session.received += len(chunk)
                session.newlines += chunk.count(b"\n")
                session.last_byte = chunk[-1:] or session.last_byte
        return None

    async def finalize(request: Request, session: UploadSession) -> Response:
        """End the session: its bytes become the file, or nothing does."""
        if session.received != session.size:
            await drop(session)
            message = f"the upload ended with {session.received} of the {session.size} bytes declared"
            return _upload_error(400, message, "final")
        if state.file(session.file_id) is not None:
            await drop(session)
            return _upload_error(409, f"File files/{session.file_id} already exists.", "final")
        sessions.pop(session.id, None)
        created = int(clock().timestamp())
        record = StoredFile(
            id=session.file_id,
            seq=state.next_seq(),
            filename=session.display_name,
            purpose=FILE_PURPOSE,
            file_type="jsonl",
            created_at=created,
            bytes=session.received,
            line_count=session.line_count,
            checksum=session.sha256.hexdigest(),
            processed=True,
            expires_at=created + int(FILE_TTL.total_seconds()),
            mime_type=session.mime_type,
        )
        await anyio.to_thread.run_sync(_fsync, session.path)
        await state.install_content(record, session.path)
        log.info("emulator.file.uploaded", file_id=record.id, bytes=record.bytes, flow="gemini")
        return JSONResponse({"file": file_json(record, api_base(request))}, headers=_upload_answer("final"))

    async def get_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        record = visible(state.file(file_id))
        return not_found(file_id) if record is None else JSONResponse(file_json(record, api_base(request)))

    async def delete_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if visible(state.file(file_id)) is None:
            return not_found(file_id)
        await state.delete_file(file_id)
        log.info("emulator.file.deleted", file_id=file_id)
        return JSONResponse({})

    async def list_files(request: Request) -> Response:
        try:
            size = page_size(request.query_params.get("pageSize"), FILES_PAGE_DEFAULT, FILES_PAGE_MAX)
            files = [record for record in state.files() if visible(record)]
            chosen, token = page(files, file_place, request.query_params.get("pageToken"), size)
        except PageProblem as exc:
            return google_error(400, str(exc))
        base = api_base(request)
        answer: dict[str, Any] = {"files": [file_json(record, base) for record in chosen]}
        if token is not None:
            answer["nextPageToken"] = token
        return JSONResponse(answer)

    async def download(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        record = visible(state.file(file_id))
        if record is None:
            return not_found(file_id)
        if request.query_params.get("alt") != "media":
            return google_error(400, "a download needs alt=media")
        return content_response(request, state.content_path(record.id), record.bytes)

    routes = []
    for version in VERSIONS:
        base = f"{PREFIX}/{version}/files"
        routes += [
            Route(f"{PREFIX}/upload/{version}/files", upload, methods=["POST"]),
            Route(f"{base}/{{file_id}}:download", download, methods=["GET"]),
            Route(f"{PREFIX}/download/{version}/files/{{file_id}}:download", download, methods=["GET"]),
            Route(base, list_files, methods=["GET"]),
            Route(f"{base}/{{file_id}}", get_file, methods=["GET"]),
            Route(f"{base}/{{file_id}}", delete_file, methods=["DELETE"]),
        ]
    return routes


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
