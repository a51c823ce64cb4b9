"""The seed's client API: `Client` and `AsyncClient` over batchd's own providers.

Usage follows Together's SDK (the seed document)::

    from batchd import Client

    client = Client()  # TOGETHER_API_KEY, TOGETHER_BASE_URL
    batch_file = client.files.upload(file="batch.jsonl", purpose="batch-api")
    batch = client.batches.create_batch(file_id=batch_file.id, endpoint="/v1/chat/completions")
    batch = client.batches.get_batch(batch.id)
    if batch.status == "COMPLETED":
        client.files.retrieve_content(id=batch.output_file_id, output="results.jsonl")

`provider="openai"` speaks OpenAI's dialect instead (`OPENAI_API_KEY`,
`OPENAI_BASE_URL`). There is one wire implementation per dialect: the
client drives the same `TogetherProvider` / `OpenAIProvider` objects as the
daemon, and `Client` is `AsyncClient` run on a private event loop (a daemon
thread behind an anyio blocking portal), so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from batchd import logs
from batchd.backoff import RetryPolicy
from batchd.models import BatchJob, BatchJobStatus, RemoteBatch, RemoteStatus
from batchd.providers.base import Provider
from batchd.providers.http import API_TIMEOUT
from batchd.providers.http import http_client as new_http_client
from batchd.providers.openai import OpenAIProvider
from batchd.providers.together import TogetherProvider
from batchd.providers.transfer import CHUNK_SIZE
from batchd.providers.wire import parse_time

T = TypeVar("T")

ProviderName = Literal["together", "openai"]
StrPath = str | os.PathLike[str]

#: Per dialect: the API key variable, the base URL variable, the default base URL.
ENVIRONMENT: Mapping[str, tuple[str, str, str]] = {
    "together": ("TOGETHER_API_KEY", "TOGETHER_BASE_URL", "https://api.together.ai"),
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
}

#: Purposes `files.upload` accepts: both dialects' words for a batch input file.
BATCH_PURPOSES = ("batch-api", "batch")

#: Retries after a failed idempotent call (creates are never retried blindly).
DEFAULT_MAX_RETRIES = 4


# ---------------------------------------------------------------------------
# the client's records


@dataclass(frozen=True, kw_only=True)
class FileResponse:
    """An uploaded file, modelled on the Together SDK's FileResponse."""

    id: str
    object: str = "file"
    #: unix seconds; None when the provider did not say (a reused Together file)
    created_at: int | None
    filename: str
    bytes: int
    #: the provider's word: "batch-api" (Together) or "batch" (OpenAI)
    purpose: str
    file_type: str = "jsonl"
    line_count: int | None = None
    processed: bool | None = None


@dataclass(frozen=True, kw_only=True)
class FileObject:
    """A file downloaded to the local disk (what `files.retrieve_content` answers)."""

    object: str = "local"
    id: str
    #: the path the content was written to
    filename: str
    size: int


def _unix(value: Any) -> int | None:
    parsed = parse_time(value)
    return int(parsed.timestamp()) if parsed is not None else None


_TIME_FIELDS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

_FINISHED_FIELD = {
    RemoteStatus.FAILED: "failed_at",
    RemoteStatus.EXPIRED: "expired_at",
    RemoteStatus.CANCELLED: "cancelled_at",
}


def batch_job(remote: RemoteBatch) -> BatchJob:
    """A provider's batch (either dialect) → the seed's BatchJob: unix seconds, lower-case status."""
    raw = remote.raw
    times: dict[str, int | None] = {name: _unix(raw.get(name)) for name in _TIME_FIELDS}
    created_at = int(remote.created_at.timestamp()) if remote.created_at is not None else None
    # Together names its deadline job_deadline and reports one finish time, completed_at,
    # whatever the batch ended as: show it under the field of the status it ended in.
    deadline = _unix(raw.get("job_deadline"))
    if times["expires_at"] is None:
        times["expires_at"] = deadline
    finished = _FINISHED_FIELD.get(remote.status)
    if finished is not None and times[finished] is None and times["completed_at"] is not None:
        times[finished], times["completed_at"] = times["completed_at"], None

    window = raw.get("completion_window")
    if not isinstance(window, str) or not window:
        window = "24h"
        if deadline is not None and created_at is not None and deadline > created_at:
            window = f"{round((deadline - created_at) / 3600)}h"

    errors = raw.get("errors")
    if isinstance(errors, Mapping):
        errors_out: dict[str, Any] | None = dict(errors)
    elif remote.error is not None:
        errors_out = {"object": "list", "data": [{"code": None, "line": None, "message": remote.error, "param": None}]}
    else:
        errors_out = None

    return BatchJob(
        id=remote.id,
        object="batch",
        endpoint=remote.endpoint,
        errors=errors_out,
        input_file_id=remote.input_file_id,
        completion_window=window,
        status=BatchJobStatus(remote.status.value),
        output_file_id=remote.output_file_id,
        error_file_id=remote.error_file_id,
        created_at=created_at if created_at is not None else 0,
        request_counts=dict(remote.request_counts) if remote.request_counts is not None else None,
        progress=remote.progress,
        metadata=dict(remote.metadata) if remote.metadata is not None else None,
        **times,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# the async client


class AsyncFiles:
    """`client.files`: upload a batch input file, download a result file."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    async def upload(self, file: StrPath, purpose: str = "batch-api") -> FileResponse:
        """Upload a JSONL batch input file, streamed from disk.

        `purpose` is "batch-api" (Together's word) or "batch" (OpenAI's); either
        is sent as the provider's own word.
        """
        if purpose not in BATCH_PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(BATCH_PURPOSES)}, not {purpose!r}")
        path = Path(file)
        # Together's upload announces the checksum first (and reuses a file it already has).
        sha256 = await anyio.to_thread.run_sync(_sha256, path)
        stored = await self._provider.upload(path, filename=path.name, sha256=sha256)
        raw = stored.raw
        line_count = raw.get("LineCount")
        processed = raw.get("Processed")
        file_type = raw.get("FileType")
        return FileResponse(
            id=stored.id,
            created_at=int(stored.created_at.timestamp()) if stored.created_at is not None else None,
            filename=stored.filename,
            bytes=stored.bytes,
            purpose=stored.purpose,
            file_type=file_type if isinstance(file_type, str) and file_type else "jsonl",
            line_count=line_count if isinstance(line_count, int) and not isinstance(line_count, bool) else None,
            processed=processed if isinstance(processed, bool) else None,
        )

    async def retrieve_content(self, id: str, *, output: StrPath | None = None) -> FileObject:
        """Stream a file's content to `output` (default `<id>.jsonl`), replacing what was there.

        The bytes go to a temporary file beside `output` (an interrupted body is
        resumed with `Range`) and are renamed into place only when complete.
        """
        dest = Path(output) if output is not None else Path(f"{id}.jsonl")
        part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            size = await self._provider.download_file(id, part)
            await anyio.Path(part).replace(dest)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.Path(part).unlink(missing_ok=True)
        return FileObject(id=id, filename=str(dest), size=size)


class AsyncBatches:
    """`client.batches`: the seed's batch operations."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    async def create_batch(self, file_id: str, endpoint: str, *, completion_window: str = "24h") -> BatchJob:
        """Create a batch over an uploaded file.

        Never retried blindly: if the answer is lost, the ProviderError says
        `outcome_unknown` and `list_batches()` shows whether the batch exists.
        """
        remote = await self._provider.create_batch(
            input_file_id=file_id, endpoint=endpoint, completion_window=completion_window
        )
        return batch_job(remote)

    async def get_batch(self, id: str) -> BatchJob:
        """A batch's status and details."""
        return batch_job(await self._provider.get_batch(id))

    async def list_batches(self) -> list[BatchJob]:
        """Every batch on the account (all pages)."""
        return [batch_job(remote) for remote in await self._provider.list_batches()]

    async def cancel_batch(self, id: str) -> BatchJob:
        """Ask the provider to cancel a batch; answered requests stay in its results."""
        return batch_job(await self._provider.cancel_batch(id))


def _settings(provider: str, api_key: str | None, base_url: str | None) -> tuple[str, str]:
    if provider not in ENVIRONMENT:
        raise ValueError(f"provider must be one of {', '.join(ENVIRONMENT)}, not {provider!r}")
    key_env, url_env, default_url = ENVIRONMENT[provider]
    key = api_key if api_key is not None else os.environ.get(key_env)
    if not key:
        raise ValueError(f"no API key: pass api_key= or set {key_env}")
    url = base_url if base_url is not None else (os.environ.get(url_env) or default_url)
    return key, url


class AsyncClient:
    """The seed's client, with coroutines: `await client.batches.get_batch(id)`.

    `api_key` and `base_url` default to `TOGETHER_API_KEY` / `TOGETHER_BASE_URL`
    (`OPENAI_API_KEY` / `OPENAI_BASE_URL` with `provider="openai"`). Close it
    with `await client.close()` or use `async with`. An `http_client` passed in
    stays the caller's to close.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        provider: ProviderName = "together",
        *,
        timeout: float | httpx.Timeout = API_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        logs.for_library()
        key, url = _settings(provider, api_key, base_url)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else new_http_client(timeout=timeout)
        retry = RetryPolicy(attempts=max(0, max_retries) + 1)
        wire: TogetherProvider | OpenAIProvider
        if provider == "openai":
            wire = OpenAIProvider(self._http, base_url=url, api_key=key, retry=retry)
        else:
            wire = TogetherProvider(self._http, base_url=url, api_key=key, retry=retry)
        self._provider: Provider = wire
        self.provider: ProviderName = provider
        self.base_url = wire.base_url
        self.files = AsyncFiles(wire)
        self.batches = AsyncBatches(wire)

    def __repr__(self) -> str:
        # Never the key.
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={self.base_url!r})"

    async def close(self) -> None:
        """Close the connections (a passed-in http_client is left open)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------------
# the sync client: the async one on a private event loop


class _Loop:
    """An event loop on a daemon thread (an anyio blocking portal) that runs coroutines for a caller.

    A daemon thread, so a script that never closes its client still exits.
    """

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal(name="batchd-client"))

    def run(self, call: Callable[[], Awaitable[T]]) -> T:
        future = self._portal.start_task_soon(call)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt while waiting: the call is cancelled in the loop, not left running.
            future.cancel()
            raise

    def close(self, client: AsyncClient) -> None:
        try:
            self.run(client.close)
        finally:
            self._stack.close()


class Files:
    """`client.files` of the sync client (each call runs `AsyncFiles`' coroutine)."""

    def __init__(self, loop: _Loop, files: AsyncFiles) -> None:
        self._loop = loop
        self._files = files

    def upload(self, file: StrPath, purpose: str = "batch-api") -> FileResponse:
        """Upload a JSONL batch input file, streamed from disk (see `AsyncFiles.upload`)."""
        return self._loop.run(partial(self._files.upload, file, purpose))

    def retrieve_content(self, id: str, *, output: StrPath | None = None) -> FileObject:
        """Stream a file's content to `output` (see `AsyncFiles.retrieve_content`)."""
        return self._loop.run(partial(self._files.retrieve_content, id, output=output))


class Batches:
    """`client.batches` of the sync client (each call runs `AsyncBatches`' coroutine)."""

    def __init__(self, loop: _Loop, batches: AsyncBatches) -> None:
        self._loop = loop
        self._batches = batches

    def create_batch(self, file_id: str, endpoint: str, *, completion_window: str = "24h") -> BatchJob:
        """Create a batch over an uploaded file (see `AsyncBatches.create_batch`)."""
        return self._loop.run(
            partial(self._batches.create_batch, file_id, endpoint, completion_window=completion_window)
        )

    def get_batch(self, id: str) -> BatchJob:
        """A batch's status and details."""
        return self._loop.run(partial(self._batches.get_batch, id))

    def list_batches(self) -> list[BatchJob]:
        """Every batch on the account (all pages)."""
        return self._loop.run(self._batches.list_batches)

    def cancel_batch(self, id: str) -> BatchJob:
        """Ask the provider to cancel a batch."""
        return self._loop.run(partial(self._batches.cancel_batch, id))


class Client:
    """The seed's client: `client.files.upload(...)`, `client.batches.create_batch(...)`.

    Same arguments and environment as `AsyncClient`, whose coroutines it runs
    on a private event loop in a daemon thread. Close it with `close()` or use
    `with`; one that is dropped unclosed is closed when collected or at exit.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        provider: ProviderName = "together",
        *,
        timeout: float | httpx.Timeout = API_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        inner = AsyncClient(api_key, base_url, provider, timeout=timeout, max_retries=max_retries)
        loop = _Loop()
        # The finalizer holds the loop and the async client, never self.
        self._close = weakref.finalize(self, loop.close, inner)
        self.provider: ProviderName = provider
        self.base_url = inner.base_url
        self.files = Files(loop, inner.files)
        self.batches = Batches(loop, inner.batches)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connections and stop the private event loop (again: nothing happens)."""
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
