"""The Together dialect of the Batch API, over an httpx.AsyncClient the caller owns.

Wire facts are in PROVIDERS.md; the official `together` SDK is the reference.
The daemon reaches the embedded local backend through this same code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import anyio
import httpx
import structlog

from batchd import metrics
from batchd.models import PROVIDER_LIMITS, Limits, RemoteBatch, RemoteStatus
from batchd.providers.base import ProviderError
from batchd.retry import RetryPolicy, is_retryable_status, retry_after_s, with_retries

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: Read and write files in pieces of this size: memory must not grow with file size.
CHUNK_SIZE = 1024 * 1024

DEFAULT_RETRY = RetryPolicy()


def normalise_base_url(url: str) -> str:
    """`https://api.together.ai/v1/` → `https://api.together.ai`: every path adds /v1 (DESIGN §6)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    return url


# ---------------------------------------------------------------------------
# wire parsing (pure)


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 string (`Z` included) or unix seconds → an aware UTC datetime, else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        # Together's times are UTC even when the offset is left out.
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _error_text(value: Any) -> str | None:
    """An `error` value that is either text or an object with a message → readable text."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        message = value.get("message")
        details = [f"{key}={value[key]}" for key in ("type", "code", "param") if value.get(key)]
        if isinstance(message, str) and message:
            return f"{message} ({', '.join(details)})" if details else message
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def parse_error_message(payload: Any) -> str | None:
    """The readable message of an error body.

    Batch endpoints answer `{"error": "text"}`; file and other endpoints
    `{"error": {"message", "type", "param", "code"}}`.
    """
    if not isinstance(payload, Mapping):
        return None
    if "error" in payload:
        return _error_text(payload["error"])
    message = payload.get("message")
    return message if isinstance(message, str) and message else None


def parse_batch_job(obj: Mapping[str, Any]) -> RemoteBatch:
    """A Together BatchJob as sent on the wire → RemoteBatch (raises ProviderError if malformed)."""
    batch_id = obj.get("id")
    status = obj.get("status")
    if not isinstance(batch_id, str) or not batch_id or not isinstance(status, str):
        raise ProviderError(f"malformed BatchJob: id={batch_id!r} status={status!r}")
    try:
        remote_status = RemoteStatus.parse(status)
    except ValueError as exc:
        raise ProviderError(f"BatchJob {batch_id}: unknown status {status!r}") from exc
    progress = obj.get("progress")
    return RemoteBatch(
        id=batch_id,
        status=remote_status,
        input_file_id=str(obj.get("input_file_id") or ""),
        endpoint=str(obj.get("endpoint") or ""),
        created_at=parse_time(obj.get("created_at")),
        # An empty string means "no file" on the wire.
        output_file_id=obj.get("output_file_id") or None,
        error_file_id=obj.get("error_file_id") or None,
        error=_error_text(obj.get("error")),
        progress=float(progress) if isinstance(progress, int | float) else None,
        raw=dict(obj),
    )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def error_from_response(response: httpx.Response, what: str) -> ProviderError:
    """A non-success answer → ProviderError, retryable per its status, with its Retry-After."""
    code = response.status_code
    message = parse_error_message(_json_or_none(response))
    if message is None:
        message = response.text[:500].strip() or response.reason_phrase
    return ProviderError(
        f"{what}: HTTP {code}: {message}",
        status_code=code,
        retryable=is_retryable_status(code),
        retry_after=retry_after_s(response),
    )


def transport_error(exc: httpx.TransportError, what: str) -> ProviderError:
    """Network trouble and timeouts are worth another try."""
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}", retryable=True)


def _body_json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ProviderError(f"{what}: HTTP {response.status_code} with a body that is not JSON") from exc


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 10-99/100` → (10, 100); `bytes */100` → (None, 100); unknown parts → None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    start: int | None = None
    if span != "*":
        first, _, _ = span.partition("-")
        start = int(first) if first.isdigit() else None
    return start, int(total) if total.isdigit() else None


async def _file_chunks(path: Path, size: int) -> AsyncGenerator[bytes, None]:
    """The first `size` bytes of `path`, read piece by piece (matches the Content-Length sent)."""
    left = size
    async with await anyio.open_file(path, "rb") as f:
        while left > 0:
            chunk = await f.read(min(CHUNK_SIZE, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


# ---------------------------------------------------------------------------
# the provider


class TogetherProvider:
    """Together's Batch API (and batchd's emulator of it) seen as a `Provider`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        kind: str = "together",
        limits: Limits | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.kind = kind
        self.limits = limits if limits is not None else PROVIDER_LIMITS[kind]
        self.base_url = normalise_base_url(base_url)
        self._http = http
        self._api_key = api_key
        self._retry = retry
        self._sleep = sleep

    def __repr__(self) -> str:
        # Never the key.
        return f"TogetherProvider(kind={self.kind!r}, base_url={self.base_url!r})"

    # -- plumbing ----------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _auth(self) -> dict[str, str]:
        # Per request and to API URLs only, so a presigned storage URL never sees it.
        return {"Authorization": f"Bearer {self._api_key}"}

    async def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        started = time.monotonic()
        try:
            response = await self._http.request(method, self._url(path), headers=self._auth(), **kwargs)
        except httpx.TransportError as exc:
            metrics.api_call(what, None, time.monotonic() - started)
            raise transport_error(exc, what) from exc
        metrics.api_call(what, response.status_code, time.monotonic() - started)
        return response

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(call, policy=self._retry, what=what, sleep=self._sleep)

    async def _call_job(self, method: str, path: str, what: str) -> RemoteBatch:
        """One idempotent call that answers a BatchJob, retried."""

        async def once() -> RemoteBatch:
            response = await self._request(method, path, what=what)
            if response.status_code != 200:
                raise error_from_response(response, what)
            body = _body_json(response, what)
            if not isinstance(body, Mapping):
                raise ProviderError(f"{what}: expected a BatchJob object")
            return parse_batch_job(body)

        return await self._retried(once, what)

    # -- files -------------------------------------------------------------

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        """Upload a batch input file in Together's three steps; return its file id.

        A file with the same checksum already on the account (409) is reused.
        """
        bound = log.bind(filename=filename, sha256=sha256)
        found = await self._retried(lambda: self._upload_start(filename, sha256), "together.upload.start")
        if isinstance(found, str):
            bound.info("provider.upload", file_id=found, reused=True)
            return found
        location, file_id = found
        size = await self._retried(lambda: self._upload_put(location, path), "together.upload.put")
        await self._retried(lambda: self._upload_preprocess(file_id), "together.upload.preprocess")
        bound.info("provider.upload", file_id=file_id, reused=False, bytes=size)
        return file_id

    async def _upload_start(self, filename: str, sha256: str) -> tuple[str, str] | str:
        """Step 1: announce the file. (presigned URL, file id), or the existing file's id."""
        what = "together.upload.start"
        # (None, value) makes httpx send plain multipart form fields and no file part.
        fields = {
            "purpose": (None, "batch-api"),
            "file_name": (None, filename),
            "file_type": (None, "jsonl"),
            "checksum": (None, sha256),
        }
        # Together answers 302; following it would PUT nothing, with our auth header, to storage.
        response = await self._request("POST", "/v1/files", what=what, files=fields, follow_redirects=False)
        if response.status_code == 409:
            body = _json_or_none(response)
            file_id = body.get("file_id") if isinstance(body, Mapping) else None
            if not isinstance(file_id, str) or not file_id:
                raise ProviderError(f"{what}: HTTP 409 without a file_id", status_code=409)
            return file_id
        if response.status_code != 302:
            raise error_from_response(response, what)
        location = response.headers.get("location")
        file_id = response.headers.get("x-together-file-id")
        if not location or not file_id:
            raise ProviderError(f"{what}: 302 without Location or X-Together-File-Id", status_code=302)
        # A relative Location is resolved against the API URL that sent it.
        return str(response.url.join(location)), file_id

    async def _upload_put(self, location: str, path: Path) -> int:
        """Step 2: the raw bytes to the presigned URL, streamed, without our key. Returns the size."""
        what = "together.upload.put"
        size = (await anyio.Path(path).stat()).st_size
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        started = time.monotonic()
        try:
            # aclosing: an interrupted PUT must close the file now, not whenever the generator is collected.
            async with aclosing(_file_chunks(path, size)) as chunks:
                response = await self._http.put(location, content=chunks, headers=headers, follow_redirects=False)
        except httpx.TransportError as exc:
            metrics.api_call(what, None, time.monotonic() - started)
            raise transport_error(exc, what) from exc
        metrics.api_call(what, response.status_code, time.monotonic() - started)
        if not response.is_success:
            raise error_from_response(response, what)
        return size

    async def _upload_preprocess(self, file_id: str) -> None:
        """Step 3: ask Together to process the uploaded bytes."""
        what = "together.upload.preprocess"
        response = await self._request("POST", f"/v1/files/{quote(file_id, safe='')}/preprocess", what=what)
        if not response.is_success:
            raise error_from_response(response, what)

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content into `dest`, resuming a prefix already there; return its size."""

        async def once() -> int:
            return await self._download_once(file_id, dest)

        size = await self._retried(once, "together.download")
        log.info("provider.download", file_id=file_id, bytes=size)
        return size

    async def _download_once(self, file_id: str, dest: Path) -> int:
        what = "together.download"
        target = anyio.Path(dest)
        have = (await target.stat()).st_size if await target.exists() else 0
        # Identity encoding: the bytes counted against Content-Length are the file's bytes.
        headers = {**self._auth(), "Accept-Encoding": "identity"}
        if have > 0:
            headers["Range"] = f"bytes={have}-"
        url = self._url(f"/v1/files/{quote(file_id, safe='')}/content")
        started, answered = time.monotonic(), False
        try:
            # Together may send the content from storage; httpx drops our key on a cross-origin hop.
            async with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                metrics.api_call(what, response.status_code, time.monotonic() - started)
                answered = True
                return await self._receive(response, dest, have, what)
        except httpx.TransportError as exc:
            if not answered:  # a body cut short was counted with its status already
                metrics.api_call(what, None, time.monotonic() - started)
            raise transport_error(exc, what) from exc

    async def _receive(self, response: httpx.Response, dest: Path, have: int, what: str) -> int:
        """Write one download answer into `dest`; return the file's full size."""
        code = response.status_code
        start, total = _parse_content_range(response.headers.get("content-range"))
        mode: Literal["ab", "wb"]
        if code == 416 and have > 0:
            if total == have:
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

    # -- batches -----------------------------------------------------------

    async def create_batch(
        self, *, input_file_id: str, endpoint: str, completion_window: str, job_id: str
    ) -> RemoteBatch:
        """Create a batch. Never retried here: see the classification below.

        `job_id` is unused: Together batches carry no metadata, so the caller
        reconciles a lost answer by listing and matching the input file.
        """
        what = "together.create"
        payload = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        started = time.monotonic()
        try:
            response = await self._http.post(self._url("/v1/batches"), json=payload, headers=self._auth())
        except httpx.TransportError as exc:
            metrics.api_call(what, None, time.monotonic() - started)
            # The request may have reached Together and created the batch.
            raise ProviderError(f"{what}: {type(exc).__name__}: {exc}", retryable=True, outcome_unknown=True) from exc
        code = response.status_code
        metrics.api_call(what, code, time.monotonic() - started)
        if code in (200, 201):
            body = _json_or_none(response)
            if not isinstance(body, Mapping):
                # Created, but we cannot tell which batch: reconcile.
                raise ProviderError(
                    f"{what}: HTTP {code} with an unreadable body",
                    status_code=code,
                    retryable=True,
                    outcome_unknown=True,
                )
            job = body.get("job")
            if not isinstance(job, Mapping):
                warning = body.get("warning") or "no job in the answer"
                raise ProviderError(f"{what}: {warning}", status_code=code)
            batch = parse_batch_job(job)
            log.info(
                "provider.create",
                remote_batch_id=batch.id,
                input_file_id=input_file_id,
                job_id=job_id,
                warning=body.get("warning"),
            )
            return batch
        error = error_from_response(response, what)
        if code == 429 or (400 <= code <= 499 and code != 408):
            # Refused before acting: 429 may be repeated as is, other 4xx not at all.
            raise error
        # 408, 5xx or anything unexpected: Together may have acted.
        raise ProviderError(
            error.message,
            status_code=code,
            retryable=True,
            outcome_unknown=True,
            retry_after=error.retry_after,
        )

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        """The batch's current state (retried)."""
        return await self._call_job("GET", f"/v1/batches/{quote(batch_id, safe='')}", "together.get")

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Ask Together to cancel the batch; it may stay `cancelling` for a while (retried)."""
        batch = await self._call_job("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel", "together.cancel")
        log.info("provider.cancel", remote_batch_id=batch.id, status=batch.status.value)
        return batch

    async def list_batches(self) -> list[RemoteBatch]:
        """Every batch on the account: Together answers one bare array, no pagination (retried)."""
        what = "together.list"

        async def once() -> list[RemoteBatch]:
            response = await self._request("GET", "/v1/batches", what=what)
            if response.status_code != 200:
                raise error_from_response(response, what)
            body = _body_json(response, what)
            if not isinstance(body, list) or not all(isinstance(item, Mapping) for item in body):
                raise ProviderError(f"{what}: expected a JSON array of BatchJob objects")
            return [parse_batch_job(item) for item in body]

        return await self._retried(once, what)


async def _truncate(dest: Path) -> None:
    async with await anyio.open_file(dest, "wb"):
        pass


async def _fsync(dest: Path) -> None:
    async with await anyio.open_file(dest, "rb+") as f:
        await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
