"""Moving file content in and out, streamed: uploads to disk, downloads with Range.

Dialect-neutral: the Together routes use it for the presigned-style PUT, the
one-step multipart upload and `/v1/files/{id}/content`; the OpenAI dialect
for its multipart upload and `/openai/v1/files/{id}/content`. Memory never
grows with the file size.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape

import anyio
import anyio.to_thread
import structlog
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from batchd.emulator.state import EmulatorState

log = structlog.get_logger()

_CHUNK = 64 * 1024


class ContentSink:
    """Writes streamed bytes to a temp file while counting size, lines and sha256.

    On a clean exit the file is fsynced and kept for `EmulatorState.install_content`;
    on an error (a client that went away) it is deleted. Bytes are gathered up to _CHUNK and
    written in one worker-thread call; the last of them, the fsync and the close share one: a
    small upload (most batch inputs) costs one thread hop, not one per chunk and per step,
    and memory stays at one chunk whatever the size.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._newlines = 0
        self._last = b""
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = None

    async def __aenter__(self) -> Self:
        return self

    async def write(self, chunk: bytes) -> None:
        """Append a chunk."""
        if not chunk:
            return
        self._hash.update(chunk)
        self.size += len(chunk)
        self._newlines += chunk.count(b"\n")
        self._last = chunk[-1:]
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= _CHUNK:
            await anyio.to_thread.run_sync(self._write_pending)

    def _write_pending(self) -> None:
        """Blocking: open the file if not yet, write what is gathered."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _finish(self) -> None:
        """Blocking: write the rest, make the file durable, close it."""
        try:
            self._write_pending()
            assert self._fd is not None
            os.fsync(self._fd)
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def sha256(self) -> str:
        """Hex digest of everything written."""
        return self._hash.hexdigest()

    @property
    def line_count(self) -> int:
        """Lines, counting a last line without a newline."""
        return self._newlines + (1 if self._last not in (b"", b"\n") else 0)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            if exc_type is None:
                try:
                    await anyio.to_thread.run_sync(self._finish)
                except BaseException:
                    # A full disk at the last write or the fsync: nothing half-written stays.
                    await anyio.Path(self.path).unlink(missing_ok=True)
                    raise
                return
            self._close()
            self._pending.clear()
            await anyio.Path(self.path).unlink(missing_ok=True)

    async def discard(self) -> None:
        """Delete the temp file (after a clean exit whose content was refused)."""
        await anyio.Path(self.path).unlink(missing_ok=True)


def s3_error(status: int, code: str, message: str) -> Response:
    """An error the way S3 answers a presigned URL: XML."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


async def receive_presigned_put(request: Request, state: EmulatorState) -> Response:
    """`PUT /_emulator/upload/{file_id}?signature=…`: the storage host of the three-step upload."""
    # Real presigned URLs refuse a second auth mechanism; a client that sends its API key
    # here would leak it to the storage host.
    if "authorization" in request.headers:
        return s3_error(
            400,
            "InvalidArgument",
            "Only one auth mechanism allowed; the Authorization header must not be sent to a presigned URL",
        )
    file_id: str = request.path_params["file_id"]
    record = state.file(file_id)
    if record is None or not state.verify(file_id, request.query_params.get("signature", "")):
        return s3_error(403, "SignatureDoesNotMatch", "The request signature does not match")
    if record.processed:
        return s3_error(403, "AccessDenied", "This upload URL was already used for a processed file")
    try:
        async with ContentSink(state.temp_path()) as sink:
            async for chunk in request.stream():
                await sink.write(chunk)
    except ClientDisconnect:
        log.info("emulator.upload.interrupted", file_id=file_id)
        return Response(status_code=400)
    if record.checksum is not None and sink.sha256 != record.checksum:
        await sink.discard()
        log.info("emulator.upload.bad_digest", file_id=file_id)
        return s3_error(400, "BadDigest", "The sha256 of the body does not match the declared checksum")
    record.bytes = sink.size
    record.line_count = sink.line_count
    record.checksum = sink.sha256
    await state.install_content(record, sink.path)
    log.info("emulator.upload.stored", file_id=file_id, bytes=sink.size)
    return Response(status_code=200, headers={"ETag": f'"{sink.sha256[:32]}"'})


async def receive_upload_file(upload: UploadFile, state: EmulatorState) -> ContentSink:
    """Copy a multipart `file` part (already spooled by the form parser) into tmp/, chunk by chunk."""
    async with ContentSink(state.temp_path()) as sink:
        while chunk := await upload.read(_CHUNK):
            await sink.write(chunk)
    return sink


class RangeNotSatisfiable(Exception):
    """The Range starts at or after the end of the file."""


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single `bytes=N-` or `bytes=N-M` range; None to send it all.

    Other forms (several ranges, suffix ranges, garbage) are ignored, which
    RFC 9110 allows: the whole file is sent with 200.
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size:
        raise RangeNotSatisfiable
    if last < first:
        return None
    return first, min(last, size - 1)


class FileContentResponse(Response):
    """Streams `length` bytes of a file from `start`, stopping if the client goes away."""

    def __init__(self, path: Path, *, start: int, length: int, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(status_code=status_code, headers=headers, media_type="application/octet-stream")
        self._path = path
        self._start = start
        self._length = length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope["method"] == "HEAD" or self._length == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            await self._stream(send)
            tg.cancel_scope.cancel()

    async def _stream(self, send: Send) -> None:
        async with await anyio.open_file(self._path, "rb") as f:
            await f.seek(self._start)
            remaining = self._length
            while remaining:
                chunk = await f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise RuntimeError(f"{self._path} shrank while being sent")
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})


def content_response(request: Request, path: Path, size: int) -> Response:
    """The file's bytes with Content-Length, honouring `Range: bytes=N-` with 206."""
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    if wanted is None:
        headers = {"Content-Length": str(size), "Accept-Ranges": "bytes"}
        return FileContentResponse(path, start=0, length=size, status_code=200, headers=headers)
    first, last = wanted
    length = last - first + 1
    headers = {
        "Content-Length": str(length),
        "Content-Range": f"bytes {first}-{last}/{size}",
        "Accept-Ranges": "bytes",
    }
    return FileContentResponse(path, start=first, length=length, status_code=206, headers=headers)
