"""What every wire dialect shares: auth, retries, error classification, streamed bodies,
and the resumable download. One implementation, used by together.py and openai.py.

Dialects subclass `HttpProvider` and add their own paths and shapes; the
daemon and the client both reach a Batch API only through those subclasses.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import httpx
import orjson
import structlog

from batchd import metrics
from batchd.backoff import RetryPolicy, is_retryable_status, retry_after_s
from batchd.models import PROVIDER_LIMITS, Limits, RemoteFile, RemoteStatus
from batchd.providers.errors import ProviderError
from batchd.providers.retry import with_retries

T = TypeVar("T")

log = structlog.get_logger("batchd.providers")

#: Read and write files in pieces of this size: memory must not grow with file size.
CHUNK_SIZE = 1024 * 1024

DEFAULT_RETRY = RetryPolicy()

#: Provider API calls: uploads and downloads of 100 MB files need a generous read timeout.
API_TIMEOUT = httpx.Timeout(120.0, connect=15.0)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The one TLS context of the process: httpx's own trust store (SSL_CERT_FILE, SSL_CERT_DIR, else certifi).

    httpx builds a context per transport, and each loads the whole CA bundle (about 1 MB of
    heap); a daemon has eight transports, a client four.
    """
    return httpx.create_ssl_context()


def http_client(**options: Any) -> httpx.AsyncClient:
    """An httpx client for batchd's calls (`options` as httpx.AsyncClient's).

    Loopback addresses go past any proxy named in the environment: a server whose
    http_proxy points at a corporate proxy must still reach its own embedded backend
    (and a receiver on the same host) directly.
    """
    context = tls_context()
    direct = httpx.AsyncHTTPTransport(verify=context)
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        f"all://{host}": direct for host in ("127.0.0.1", "localhost", "[::1]")
    }
    return httpx.AsyncClient(verify=context, mounts=mounts, **options)


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


def error_text(value: Any) -> str | None:
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

    Together's batch endpoints answer `{"error": "text"}`; every other endpoint
    (and all of OpenAI) `{"error": {"message", "type", "param", "code"}}`.
    """
    if not isinstance(payload, Mapping):
        return None
    if "error" in payload:
        return error_text(payload["error"])
    message = payload.get("message")
    return message if isinstance(message, str) and message else None


def batch_identity(obj: Mapping[str, Any], noun: str) -> tuple[str, RemoteStatus]:
    """A batch object's id and normalised status (raises ProviderError when either is missing or odd)."""
    batch_id = obj.get("id")
    status = obj.get("status")
    if not isinstance(batch_id, str) or not batch_id or not isinstance(status, str):
        raise ProviderError(f"malformed {noun}: id={batch_id!r} status={status!r}")
    try:
        return batch_id, RemoteStatus.parse(status)
    except ValueError as exc:
        raise ProviderError(f"{noun} {batch_id}: unknown status {status!r}") from exc


def optional_id(value: Any) -> str | None:
    """A file id from the wire; an empty string (OpenAI) or null means "no file"."""
    return value if isinstance(value, str) and value else None


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def body_json(response: httpx.Response, what: str) -> Any:
    """The JSON body of a success answer; a body that is not JSON is a ProviderError."""
    try:
        # orjson straight from the bytes: a sweep's list of 10,000 batches is 4 MB, which
        # response.json() would first decode into a str of its own.
        return orjson.loads(response.content)
    except ValueError as exc:
        raise ProviderError(f"{what}: HTTP {response.status_code} with a body that is not JSON") from exc


def error_from_response(response: httpx.Response, what: str) -> ProviderError:
    """A non-success answer → ProviderError, retryable per its status, with its Retry-After."""
    code = response.status_code
    message = parse_error_message(json_or_none(response))
    if message is None:
        message = response.text[:500].strip() or response.reason_phrase
    return ProviderError(
        f"{what}: HTTP {code}: {message}",
        status_code=code,
        retryable=is_retryable_status(code),
        retry_after=retry_after_s(response.headers, now=datetime.now(UTC)),
    )


def transport_error(exc: httpx.TransportError, what: str) -> ProviderError:
    """Network trouble and timeouts are worth another try."""
    return ProviderError(f"{what}: {type(exc).__name__}: {exc}", retryable=True)


def create_refusal(response: httpx.Response, what: str) -> ProviderError:
    """A batch create answered with a non-success status → ProviderError, classified.

    429 and other 4xx (but 408) mean the provider refused before acting; 408,
    5xx and anything unexpected mean it may have acted (outcome unknown).
    """
    error = error_from_response(response, what)
    code = response.status_code
    if code == 429 or (400 <= code <= 499 and code != 408):
        # Refused before acting: 429 may be repeated as is, other 4xx not at all.
        return error
    return ProviderError(
        error.message,
        status_code=code,
        retryable=True,
        outcome_unknown=True,
        retry_after=error.retry_after,
    )


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 10-99/100` → (10, 100); `bytes */100` → (None, 100); unknown parts → None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    start: int | None = None
    if span != "*":
        first, _, _ = span.partition("-")
        start = int(first) if first.isdigit() else None
    return start, int(total) if total.isdigit() else None


# ---------------------------------------------------------------------------
# streamed request bodies


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


# ---------------------------------------------------------------------------
# the shared provider plumbing


class HttpProvider:
    """Auth, retries and the resumable download over an `httpx.AsyncClient` the caller owns.

    Subclasses set `dialect` (names calls in errors and logs) and implement
    `_content_path`; everything a Batch API does the same way lives here.
    """

    #: "together" | "openai": the wire dialect, whatever `kind` the daemon calls it
    dialect = ""
    #: the base URL when none is given (empty: one must be)
    default_base_url = ""

    @staticmethod
    def normalise_base_url(url: str) -> str:
        """The dialect's form of a base URL (Together drops a trailing /v1; OpenAI keeps it)."""
        return url.strip().rstrip("/")

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str | None = None,
        kind: str | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.kind = kind or self.dialect
        self.limits = limits if limits is not None else PROVIDER_LIMITS[self.kind]
        self.base_url = self.normalise_base_url(base_url or self.default_base_url)
        self._http = http
        self._api_key = api_key
        self._retry = retry
        self._sleep = sleep

    def __repr__(self) -> str:
        # Never the key.
        return f"{type(self).__name__}(kind={self.kind!r}, base_url={self.base_url!r})"

    def _what(self, call: str) -> str:
        return f"{self.dialect}.{call}"

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _auth(self) -> dict[str, str]:
        # Per request and to API URLs only, so a presigned storage URL never sees it.
        return {"Authorization": f"Bearer {self._api_key}"}

    async def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._auth(), **kwargs.pop("headers", {})}
        started = time.monotonic()
        try:
            response = await self._http.request(method, self._url(path), headers=headers, **kwargs)
        except httpx.TransportError as exc:
            metrics.api_call(what, None, time.monotonic() - started)
            raise transport_error(exc, what) from exc
        metrics.api_call(what, response.status_code, time.monotonic() - started)
        return response

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(call, policy=self._retry, what=what, sleep=self._sleep)

    async def _get_json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """One idempotent call answering 200 with JSON, retried; returns the parsed body."""

        async def once() -> Any:
            response = await self._request(method, path, what=what, **kwargs)
            if response.status_code != 200:
                raise error_from_response(response, what)
            return body_json(response, what)

        return await self._retried(once, what)

    async def _post_create(self, path: str, payload: Mapping[str, Any], what: str) -> tuple[int, Mapping[str, Any]]:
        """POST a batch create once (never retried); the answer's status and JSON object.

        A lost or unreadable answer raises ProviderError(outcome_unknown=True):
        the provider may have created the batch, so the caller reconciles by
        listing before it tries again.
        """
        started = time.monotonic()
        try:
            response = await self._http.post(self._url(path), json=payload, headers=self._auth())
        except httpx.TransportError as exc:
            metrics.api_call(what, None, time.monotonic() - started)
            # The request may have reached the provider and created the batch.
            raise ProviderError(f"{what}: {type(exc).__name__}: {exc}", retryable=True, outcome_unknown=True) from exc
        code = response.status_code
        metrics.api_call(what, code, time.monotonic() - started)
        if code not in (200, 201):
            raise create_refusal(response, what)
        body = json_or_none(response)
        if not isinstance(body, Mapping):
            # Created, but we cannot tell which batch: reconcile.
            raise ProviderError(
                f"{what}: HTTP {code} with an unreadable body", status_code=code, retryable=True, outcome_unknown=True
            )
        return code, body

    # -- download ----------------------------------------------------------

    def _content_path(self, file_id: str) -> str:
        raise NotImplementedError

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content into `dest`, resuming a prefix already there; return its size."""
        what = self._what("download")

        async def once() -> int:
            return await self._download_once(file_id, dest, what)

        size = await self._retried(once, what)
        log.info("provider.download", file_id=file_id, bytes=size)
        return size

    async def _download_once(self, file_id: str, dest: Path, what: str) -> int:
        target = anyio.Path(dest)
        have = (await target.stat()).st_size if await target.exists() else 0
        # Identity encoding: the bytes counted against Content-Length are the file's bytes.
        headers = {**self._auth(), "Accept-Encoding": "identity"}
        if have > 0:
            headers["Range"] = f"bytes={have}-"
        url = self._url(self._content_path(file_id))
        started, answered = time.monotonic(), False
        try:
            # The content may come from storage; httpx drops our key on a cross-origin hop.
            async with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                metrics.api_call(what, response.status_code, time.monotonic() - started)
                answered = True
                return await _receive(response, dest, have, what)
        except httpx.TransportError as exc:
            if not answered:  # a body cut short was counted with its status already
                metrics.api_call(what, None, time.monotonic() - started)
            raise transport_error(exc, what) from exc


async def _receive(response: httpx.Response, dest: Path, have: int, what: str) -> int:
    """Write one download answer into `dest`; return the file's full size."""
    code = response.status_code
    start, total = parse_content_range(response.headers.get("content-range"))
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


async def _truncate(dest: Path) -> None:
    async with await anyio.open_file(dest, "wb"):
        pass


async def _fsync(dest: Path) -> None:
    async with await anyio.open_file(dest, "rb+") as f:
        await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())


def remote_file(obj: Any, *, fallback_id: str, filename: str, size: int, purpose: str) -> RemoteFile:
    """A file object from an upload answer (either dialect) → RemoteFile; missing facts from what we sent."""
    raw: Mapping[str, Any] = obj if isinstance(obj, Mapping) else {}
    file_id = optional_id(raw.get("id")) or fallback_id
    if not file_id:
        raise ProviderError(f"file object without an id: {json.dumps(raw, default=str)[:200]}")
    size_on_wire = raw.get("bytes")
    return RemoteFile(
        id=file_id,
        filename=str(raw.get("filename") or filename),
        bytes=size_on_wire if isinstance(size_on_wire, int) and not isinstance(size_on_wire, bool) else size,
        purpose=str(raw.get("purpose") or purpose),
        created_at=parse_time(raw.get("created_at")),
        raw=dict(raw),
    )
