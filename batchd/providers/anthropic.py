"""Anthropic's Message Batches API, over an httpx.AsyncClient the caller owns.

Wire facts are in PROVIDERS.md; the official `anthropic` SDK is the reference. What differs
from the OpenAI-format dialects, and how it fits the `Provider` protocol:

* There is no file upload: the requests travel inline in the create body. `upload_file`
  makes no call and answers a reference to the content (`inline:<sha256>`); `create_batch`
  streams the body from `input_path` (the upload copy or a shard), a line at a time, never
  the whole file in memory. The request lines are Anthropic's own (`{"custom_id", "params"}`),
  validated before (request_rules.AnthropicRules), so they are sent as they are.
* A batch is `in_progress`, `canceling` or `ended`; `ended` becomes COMPLETED, CANCELLED
  when a cancel was asked for, or EXPIRED when its counts say requests expired unrun (its 24
  hours ran out). What happened to each request is in its result line (`succeeded`,
  `errored`, `canceled`, `expired`); an `expired` one is no answer: the request gets the
  round's unanswered line (`batch_expired`), and a follow-up round.
* The results come from the batch's `results_url` (never a guessed path), named as the
  batch's output "file" so that the daemon downloads them as it downloads any output file;
  the key is only ever sent to the API's own origin.
* A batch carries no metadata and creating is not idempotent: the daemon's reconcile for
  this dialect matches by request count and creation time (daemon/submit.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import structlog

from batchd.jsonl import strip_eol
from batchd.models import BatchEndpoint, RemoteBatch, RemoteFile, RemoteStatus
from batchd.providers.errors import ProviderError
from batchd.providers.http import HttpProvider
from batchd.providers.wire import kept_until, parse_time

log = structlog.get_logger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: The API version batchd speaks (the header every request carries).
API_VERSION = "2023-06-01"
BATCHES = "/v1/messages/batches"
#: The largest page `GET /v1/messages/batches` serves.
PAGE_LIMIT = 1000
#: The prefix of the reference `upload_file` answers: nothing is stored at the provider.
INLINE_PREFIX = "inline:"
#: `request_counts` keys, in the order they are summed for a total.
COUNT_KEYS = ("processing", "succeeded", "errored", "canceled", "expired")
#: Bytes of request lines read per chunk of the streamed create body.
_READ_BYTES = 1 << 20


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {
        key: count for key in COUNT_KEYS if isinstance(count := value.get(key), int) and not isinstance(count, bool)
    }


def _status(obj: Mapping[str, Any], batch_id: str) -> RemoteStatus:
    processing = obj.get("processing_status")
    if processing == "in_progress":
        return RemoteStatus.IN_PROGRESS
    if processing == "canceling":
        return RemoteStatus.CANCELLING
    if processing == "ended":
        # Each request's result says what happened to it; the batch only ended, was cancelled, or
        # ran out of its 24 hours with requests never run (their `expired` results: no answers).
        if obj.get("cancel_initiated_at"):
            return RemoteStatus.CANCELLED
        counts = obj.get("request_counts")
        expired = counts.get("expired") if isinstance(counts, Mapping) else None
        if isinstance(expired, int) and not isinstance(expired, bool) and expired > 0:
            return RemoteStatus.EXPIRED
        return RemoteStatus.COMPLETED
    raise ProviderError(f"MessageBatch {batch_id}: unknown processing_status {processing!r}")


def parse_batch(obj: Mapping[str, Any]) -> RemoteBatch:
    """A MessageBatch as sent on the wire → RemoteBatch (raises ProviderError if malformed).

    `request_counts` become batchd's `total` / `completed` / `failed` (failed: errored,
    canceled and expired together), with Anthropic's own counts kept beside them.
    """
    batch_id = obj.get("id")
    if not isinstance(batch_id, str) or not batch_id:
        raise ProviderError(f"malformed MessageBatch: id={batch_id!r}")
    counts = _counts(obj.get("request_counts"))
    summary = {
        "total": sum(counts.values()),
        "completed": counts.get("succeeded", 0),
        "failed": sum(counts.get(key, 0) for key in ("errored", "canceled", "expired")),
    }
    results_url = obj.get("results_url")
    status = _status(obj, batch_id)
    created = parse_time(obj.get("created_at"))
    return RemoteBatch(
        id=batch_id,
        status=status,
        input_file_id="",
        endpoint=BatchEndpoint.MESSAGES,
        created_at=created,
        output_file_id=results_url if isinstance(results_url, str) and results_url else None,
        request_counts={**counts, **summary} if counts else None,
        # Anthropic keeps the results 29 days from the batch's creation.
        results_expire_at=kept_until(created, "anthropic") if status.terminal else None,
        raw=dict(obj),
    )


def request_total(batch: RemoteBatch) -> int | None:
    """How many requests a listed batch holds (None when the wire did not say)."""
    return None if batch.request_counts is None else batch.request_counts.get("total")


async def requests_body(path: Path) -> AsyncIterator[bytes]:
    """`{"requests": [line, line, …]}` from a file of request lines, a chunk at a time.

    The lines are already JSON objects (validated), so they are joined as bytes, never parsed.
    """
    yield b'{"requests":['
    first = True
    pending = b""
    async with await anyio.open_file(path, "rb") as f:
        while True:
            chunk = await f.read(_READ_BYTES)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop() if chunk else b""
            out = bytearray()
            for raw in lines:
                line = strip_eol(raw).strip()
                if not line:
                    continue
                if not first:
                    out += b","
                out += line
                first = False
            if out:
                yield bytes(out)
            if not chunk:
                break
    yield b"]}"


class AnthropicProvider(HttpProvider):
    """Anthropic's Message Batches API (and batchd's emulator of it under `/anthropic`) as a `Provider`."""

    dialect = "anthropic"
    default_base_url = DEFAULT_BASE_URL
    #: no input file, no metadata: a lost create is found by request count and creation time
    identifies_creates = False
    #: the requests travel inline and the results live in the batch: `delete_batch` deletes them
    uploads_files = False

    def _auth(self) -> dict[str, str]:
        return {"x-api-key": self._api_key, "anthropic-version": API_VERSION}

    def _content_url(self, file_id: str) -> str:
        """The results come at the batch's `results_url`; the key goes to the API's origin only."""
        if _origin(file_id) != _origin(self.base_url):
            raise ProviderError(
                f"anthropic.download: results_url {file_id!r} is not at the API's origin {self.base_url}"
            )
        return file_id

    # -- files (none: the requests are inline) ------------------------------

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        """No upload: a reference to the content, which `create_batch` sends inline."""
        return (await self.upload(path, filename=filename, sha256=sha256)).id

    async def upload(self, path: Path, *, filename: str, sha256: str) -> RemoteFile:
        size = (await anyio.Path(path).stat()).st_size
        return RemoteFile(id=f"{INLINE_PREFIX}{sha256}", filename=filename, bytes=size, purpose="inline")

    async def delete_file(self, file_id: str) -> None:
        """Nothing to delete: Anthropic stores no file of batchd's (see `delete_batch`)."""
        raise ProviderError("anthropic: there are no files to delete; an ended batch is deleted with its results")

    # -- batches -----------------------------------------------------------

    async def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch and its results (retried); one already gone counts as deleted.
        Anthropic refuses a batch that has not ended."""
        await self._delete(f"{BATCHES}/{quote(batch_id, safe='')}", "anthropic.delete_batch")
        log.info("provider.delete_batch", remote_batch_id=batch_id)

    async def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        job_id: str | None = None,
        input_path: Path | None = None,
        model: str | None = None,
    ) -> RemoteBatch:
        """Create a batch from the request lines at `input_path`, streamed inline; never retried.

        A lost answer raises ProviderError(outcome_unknown=True): the daemon reconciles by
        listing (this dialect has no metadata: see daemon/submit.py).
        """
        what = "anthropic.create"
        if input_path is None:
            raise ProviderError(f"{what}: the requests travel inline, and no input_path was given")
        _, body = await self._post_create(BATCHES, requests_body(input_path), what)
        batch = parse_batch(body)
        log.info("provider.create", remote_batch_id=batch.id, requests=request_total(batch), job_id=job_id)
        return batch

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        """The batch's current state (retried)."""
        return await self._batch_answer("GET", f"{BATCHES}/{quote(batch_id, safe='')}", "anthropic.get", parse_batch)

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Ask Anthropic to cancel the batch: `canceling`, then `ended` (retried)."""
        path = f"{BATCHES}/{quote(batch_id, safe='')}/cancel"
        batch = await self._batch_answer("POST", path, "anthropic.cancel", parse_batch)
        log.info("provider.cancel", remote_batch_id=batch.id, status=batch.status.value)
        return batch

    async def list_batches(
        self, *, wanted: Collection[str] | None = None, since: datetime | None = None
    ) -> list[RemoteBatch]:
        """The account's batches, newest first, following `after_id` (each page retried); paging
        stops early as `HttpProvider._list_newest_first` says."""
        what = "anthropic.list"
        return await self._list_newest_first(
            BATCHES, what, cursor="after_id", limit=PAGE_LIMIT, parse=parse_batch, wanted=wanted, since=since
        )


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
