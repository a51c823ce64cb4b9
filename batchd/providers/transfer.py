"""Files on the wire, streamed from and to disk: multipart uploads with an exact length, and the
resumable download (Range, length and Content-Encoding checked, every byte fsynced as it lands).

Memory does not grow with file size: bodies move in CHUNK_SIZE pieces.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Literal

import anyio
import httpx
import structlog

from batchd.providers.errors import ProviderError
from batchd.providers.wire import error_from_response, parse_content_range

log = structlog.get_logger("batchd.providers")

#: Read and write files in pieces of this size: memory must not grow with file size.
CHUNK_SIZE = 1024 * 1024


def _read_if_small(path: Path, limit: int) -> tuple[int, bytes | None]:
    """Blocking: the file's size, and its bytes when it holds `limit` bytes at most."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size, (f.read(size) if size <= limit else None)


async def file_body(path: Path) -> tuple[int, bytes | AsyncGenerator[bytes, None]]:
    """A file as a request body: (its size, its bytes) when it fits in one piece, read in one
    worker-thread call (a small upload costs one hop, not one per open, stat, read and close);
    else (its size, `file_chunks`, to be closed by the caller)."""
    size, content = await anyio.to_thread.run_sync(_read_if_small, path, CHUNK_SIZE)
    if content is not None and len(content) == size:
        return size, content
    return size, file_chunks(path, size)


async def file_chunks(path: Path, size: int) -> AsyncGenerator[bytes, None]:
    """The first `size` bytes of `path`, read piece by piece (matches the Content-Length sent)."""
    left = size
    async with await anyio.open_file(path, "rb") as f:
        while left > 0:
            chunk = await f.read(min(CHUNK_SIZE, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def _form_param(value: str) -> str:
    # What browsers (HTML5) do to a quoted name or filename in Content-Disposition.
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


class MultipartUpload:
    """A multipart/form-data body of plain fields and one file part, streamed from disk.

    httpx's own multipart encoder streams a file object too, but with blocking
    `read()` calls inside the event loop; this one reads with anyio and sends an
    exact Content-Length (no chunked encoding), so a server that wants the
    length up front gets it.
    """

    def __init__(
        self,
        fields: Mapping[str, str],
        *,
        file_field: str,
        path: Path,
        filename: str,
        size: int,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.boundary = secrets.token_hex(16)
        self.path = path
        self.size = size
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_form_param(name)}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
            for name, value in fields.items()
        )
        self._head = (
            head
            + (
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_form_param(file_field)}"; '
                f'filename="{_form_param(filename)}"\r\nContent-Type: {content_type}\r\n\r\n'
            ).encode()
        )
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def headers(self) -> dict[str, str]:
        length = len(self._head) + self.size + len(self._tail)
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}", "Content-Length": str(length)}

    async def body(self) -> AsyncGenerator[bytes, None]:
        """The whole body; a fresh iterator per attempt (a retry streams the file again)."""
        yield self._head
        async with aclosing(file_chunks(self.path, self.size)) as chunks:
            async for chunk in chunks:
                yield chunk
        yield self._tail


async def receive_download(response: httpx.Response, dest: Path, have: int, what: str) -> int:
    """Write one download answer into `dest`; return the file's full size."""
    code = response.status_code
    start, total = parse_content_range(response.headers.get("content-range"))
    mode: Literal["ab", "wb"]
    if code == 416 and have > 0:
        if total == have:
            # Counted as a 4xx in /metrics (it is one); said here, so nobody hunts for an error.
            log.info("provider.download_already_complete", what=what, bytes=have, status=code)
            await _fsync(dest)
            return have
        # Our prefix does not fit the remote file: start over on the next try.
        await _truncate(dest)
        raise ProviderError(f"{what}: HTTP 416 for a {have}-byte prefix", status_code=416, retryable=True)
    if code == 206:
        if start != have:
            await _truncate(dest)
            raise ProviderError(f"{what}: 206 from byte {start}, asked for {have}", retryable=True)
        offset, mode = have, "ab"
    elif code == 200:
        # The server ignored Range (or there was none): the body is the whole file.
        offset, mode = 0, "wb"
    else:
        await response.aread()
        raise error_from_response(response, what)
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ProviderError(f"{what}: unexpected Content-Encoding {encoding!r}")

    length = response.headers.get("content-length")
    expected = offset + int(length) if length and length.isdigit() else total
    received = 0
    async with await anyio.open_file(dest, mode) as f:
        try:
            # Identity encoding (checked above): these are the file's bytes as counted by the server.
            # No chunk_size: httpx would hold back a partial chunk and lose it if the body breaks off.
            async for chunk in response.aiter_bytes():
                await f.write(chunk)
                received += len(chunk)
        finally:
            # Keep whatever arrived: the next attempt resumes from it.
            await f.flush()
            await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
    size = offset + received
    if expected is not None and size < expected:
        raise ProviderError(f"{what}: body ended at byte {size} of {expected}", retryable=True)
    if expected is not None and size > expected:
        await _truncate(dest)
        raise ProviderError(f"{what}: {size} bytes received, {expected} announced", retryable=True)
    return size


async def _truncate(dest: Path) -> None:
    async with await anyio.open_file(dest, "wb"):
        pass


async def _fsync(dest: Path) -> None:
    async with await anyio.open_file(dest, "rb+") as f:
        await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
