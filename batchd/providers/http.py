"""What every wire dialect shares: the HTTP client, auth, retries, metrics, and the resumable
download (its body is `transfer.py`'s; reading answers is `wire.py`'s). One implementation,
used by together.py and openai.py.

Dialects subclass `HttpProvider` and add their own paths and shapes; the
daemon and the client both reach a Batch API only through those subclasses.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import structlog

from batchd import chaos, metrics
from batchd.backoff import RetryPolicy
from batchd.models import PROVIDER_LIMITS, Limits, RemoteBatch
from batchd.providers.errors import ProviderError
from batchd.providers.retry import with_retries
from batchd.providers.transfer import receive_download
from batchd.providers.wire import (
    ArrayItems,
    body_json,
    create_refusal,
    created_before,
    error_from_response,
    is_wanted,
    json_or_none,
    transport_error,
)

T = TypeVar("T")

log = structlog.get_logger("batchd.providers")

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


class HttpProvider:
    """Auth, retries and the resumable download over an `httpx.AsyncClient` the caller owns.

    Subclasses set `dialect` (names calls in errors and logs) and implement
    `_content_path`; everything a Batch API does the same way lives here.
    """

    #: "together" | "openai": the wire dialect, whatever `kind` the daemon calls it
    dialect = ""
    #: the base URL when none is given (empty: one must be)
    default_base_url = ""
    #: a listed batch names its input file (and, with metadata, batchd's job): see Provider
    identifies_creates = True
    #: requests go up as a file, results come back as files (see Provider)
    uploads_files = True

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

    def _label(self, what: str) -> str:
        """A call as /metrics names it, by the provider's kind: the local backend speaks
        Together's dialect, but its calls are not calls to Together."""
        dialect, dot, call = what.partition(".")
        return f"{self.kind}.{call}" if dot and dialect == self.dialect else what

    def _count(self, what: str, status: int | None, started: float) -> None:
        metrics.api_call(self._label(what), status, time.monotonic() - started)

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _auth(self) -> dict[str, str]:
        # Per request and to API URLs only, so a presigned storage URL never sees it.
        return {"Authorization": f"Bearer {self._api_key}"}

    async def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        headers = {**self._auth(), **kwargs.pop("headers", {})}
        started = time.monotonic()
        try:
            if chaos.strikes("provider", what):
                raise httpx.ConnectError("connection refused (injected)")
            response = await self._http.request(method, self._url(path), headers=headers, **kwargs)
        except httpx.TransportError as exc:
            self._count(what, None, started)
            raise transport_error(exc, what) from exc
        self._count(what, response.status_code, started)
        return response

    async def _get_array_items(self, path: str, what: str, take: Callable[[Mapping[str, Any]], T | None]) -> list[T]:
        """GET a 200 answer whose body is one JSON array of objects, retried; what `take` makes
        of each object (None: left out), made as each arrives. The body is parsed as it streams
        in (ijson), so an account's list of 100,000 batches is never in memory whole, as bytes
        or as objects; only what is taken is."""

        def taken(items: list[Mapping[str, Any]]) -> Iterator[T]:
            return (made for made in map(take, items) if made is not None)

        async def once() -> list[T]:
            started = time.monotonic()
            kept: list[T] = []
            try:
                if chaos.strikes("provider", what):
                    raise httpx.ConnectError("connection refused (injected)")
                async with self._http.stream("GET", self._url(path), headers=self._auth()) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self._count(what, response.status_code, started)
                        raise error_from_response(response, what)
                    array = ArrayItems(what)
                    async for chunk in response.aiter_bytes():
                        kept.extend(taken(array.feed(chunk)))
                    kept.extend(taken(array.close()))
            except httpx.TransportError as exc:
                self._count(what, None, started)
                raise transport_error(exc, what) from exc
            self._count(what, 200, started)
            return kept

        return await self._retried(once, what)

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await with_retries(call, policy=self._retry, what=what, sleep=self._sleep, label=self._label(what))

    async def _get_json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """One idempotent call answering 200 with JSON, retried; returns the parsed body."""

        async def once() -> Any:
            response = await self._request(method, path, what=what, **kwargs)
            if response.status_code != 200:
                raise error_from_response(response, what)
            return body_json(response, what)

        return await self._retried(once, what)

    async def _batch_answer(
        self, method: str, path: str, what: str, parse: Callable[[Mapping[str, Any]], RemoteBatch]
    ) -> RemoteBatch:
        """One idempotent call (retried) answering a batch object: that batch, parsed."""
        body = await self._get_json(method, path, what)
        if not isinstance(body, Mapping):
            raise ProviderError(f"{what}: expected a batch object")
        return parse(body)

    async def _list_newest_first(
        self,
        path: str,
        what: str,
        *,
        cursor: str,
        limit: int,
        parse: Callable[[Mapping[str, Any]], RemoteBatch],
        wanted: Collection[str] | None,
        since: datetime | None,
    ) -> list[RemoteBatch]:
        """A list whose pages come newest first (`{"data", "has_more", "last_id"}`), following the
        `cursor` query parameter (OpenAI `after`, Anthropic `after_id`), each page retried.

        Paging stops once every `wanted` batch is found, or after the first page that reaches a
        batch created before `since`: every later page holds only older ones. Without either,
        every page is read (the client's listing). With `wanted`, only those are parsed, and
        they come without their wire objects (see Provider.list_batches).
        """
        ids = frozenset(wanted) if wanted is not None else None
        if ids is not None and not ids:
            return []
        oldest = since.timestamp() if since is not None else None
        batches: list[RemoteBatch] = []
        seen: set[str] = set()
        after: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": limit}
            if after is not None:
                params[cursor] = after
            body = await self._get_json("GET", path, what, params=params)
            data = body.get("data") if isinstance(body, Mapping) else None
            if not isinstance(data, list) or not all(isinstance(item, Mapping) for item in data):
                raise ProviderError(f"{what}: expected a list object with a `data` array of batch objects")
            for item in data:
                # The id is looked at first: an unwanted batch is never parsed.
                if ids is not None and not is_wanted(item, ids):
                    continue
                batch = parse(item) if ids is None else replace(parse(item), raw={})
                if batch.id not in seen:
                    seen.add(batch.id)
                    batches.append(batch)
            if ids is not None and ids <= seen:
                return batches
            if oldest is not None and any(created_before(item, oldest) for item in data):
                return batches
            if body.get("has_more") is not True or not data:
                return batches
            last = body.get("last_id")
            following = last if isinstance(last, str) and last else data[-1].get("id")
            if not isinstance(following, str) or not following:
                raise ProviderError(f"{what}: a page with more to come names no cursor (no last_id, no id)")
            if following == after:
                # A cursor that does not move would page forever.
                raise ProviderError(f"{what}: the page after {after!r} ends at the same cursor")
            after = following

    async def _post_create(
        self, path: str, payload: Mapping[str, Any] | AsyncIterable[bytes], what: str
    ) -> tuple[int, Mapping[str, Any]]:
        """POST a batch create once (never retried); the answer's status and JSON object.
        `payload` is a JSON object, or the bytes of a JSON body streamed as they come.

        A lost or unreadable answer raises ProviderError(outcome_unknown=True):
        the provider may have created the batch, so the caller reconciles by
        listing before it tries again.
        """
        started = time.monotonic()
        if isinstance(payload, Mapping):
            body: dict[str, Any] = {"json": payload}
        else:
            body = {"content": payload, "headers": {"Content-Type": "application/json"}}
        headers = {**self._auth(), **body.pop("headers", {})}
        try:
            response = await self._http.post(self._url(path), headers=headers, **body)
        except httpx.TransportError as exc:
            self._count(what, None, started)
            # The request may have reached the provider and created the batch.
            raise ProviderError(f"{what}: {type(exc).__name__}: {exc}", retryable=True, outcome_unknown=True) from exc
        code = response.status_code
        self._count(what, code, started)
        if code not in (200, 201):
            raise create_refusal(response, what)
        body = json_or_none(response)
        if not isinstance(body, Mapping):
            # Created, but we cannot tell which batch: reconcile.
            raise ProviderError(
                f"{what}: HTTP {code} with an unreadable body", status_code=code, retryable=True, outcome_unknown=True
            )
        return code, body

    # -- deletes -------------------------------------------------------------

    def _file_path(self, file_id: str) -> str:
        """Where a file is deleted (each dialect with files says)."""
        raise NotImplementedError

    async def delete_file(self, file_id: str) -> None:
        """Delete a file (retried while the answer is passing); one already gone counts as deleted."""
        await self._delete(self._file_path(file_id), self._what("delete_file"))
        log.info("provider.delete_file", file_id=file_id)

    async def delete_batch(self, batch_id: str) -> None:
        """A dialect with files deletes those, never its batches (see Provider)."""
        raise ProviderError(f"{self.dialect}: batchd deletes this provider's files, not its batches")

    async def _delete(self, path: str, what: str) -> None:
        """DELETE `path`: 200 or 204, and 404 (gone already: a repeat after a crash) are success;
        a passing refusal (429, 5xx, the network) is retried, any other raises at once."""

        async def once() -> None:
            response = await self._request("DELETE", path, what=what)
            if response.status_code not in (200, 204, 404):
                raise error_from_response(response, what)

        await self._retried(once, what)

    # -- download ----------------------------------------------------------

    def _content_path(self, file_id: str) -> str:
        raise NotImplementedError

    def _content_url(self, file_id: str) -> str:
        """Where a file's content is fetched (a dialect whose results come at a URL of their own overrides it)."""
        return self._url(self._content_path(file_id))

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
        url = self._content_url(file_id)
        started, answered = time.monotonic(), False
        try:
            if chaos.strikes("provider", what):
                raise httpx.ReadError("connection reset (injected)")
            # The content may come from storage; httpx drops our key on a cross-origin hop.
            async with self._http.stream("GET", url, headers=headers, follow_redirects=True) as response:
                self._count(what, response.status_code, started)
                answered = True
                return await receive_download(response, dest, have, what)
        except httpx.TransportError as exc:
            if not answered:  # a body cut short was counted with its status already
                self._count(what, None, started)
            raise transport_error(exc, what) from exc
