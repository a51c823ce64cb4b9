"""The OpenAI dialect of the Batch API, over an httpx.AsyncClient the caller owns.

Wire facts are in PROVIDERS.md; the official `openai` SDK is the reference.
Unlike Together's, OpenAI's base URL includes `/v1` (`https://api.openai.com/v1`),
so paths here start below it (`/files`, `/batches`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from contextlib import aclosing
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import structlog

from batchd.models import RemoteBatch, RemoteFile, RemoteStatus
from batchd.providers.http import HttpProvider
from batchd.providers.transfer import MultipartUpload
from batchd.providers.wire import (
    batch_identity,
    body_json,
    error_from_response,
    kept_until,
    optional_id,
    parse_time,
    remote_file,
)

log = structlog.get_logger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: The metadata key that names batchd's job on a remote batch (the daemon reconciles by it).
JOB_ID_KEY = "batchd_job_id"
#: The largest page `GET /batches` serves.
PAGE_LIMIT = 100
#: `RemoteBatch.error` names at most this many of a batch's errors.
MAX_ERRORS_SHOWN = 10


def normalise_base_url(url: str) -> str:
    """`https://api.openai.com/v1/` → `https://api.openai.com/v1`: the base keeps its /v1."""
    return url.strip().rstrip("/")


# ---------------------------------------------------------------------------
# wire parsing (pure)


def errors_text(value: Any) -> str | None:
    """A Batch's `errors` list object → one readable line per error, naming input lines.

    `{"object": "list", "data": [{"code", "line", "message", "param"}]}` →
    `line 3: custom_id is missing (code=missing_required_parameter, param=custom_id); …`
    """
    if not isinstance(value, Mapping):
        return None
    data = value.get("data")
    if not isinstance(data, list) or not data:
        return None
    parts: list[str] = []
    for item in data[:MAX_ERRORS_SHOWN]:
        if not isinstance(item, Mapping):
            parts.append(json.dumps(item, default=str))
            continue
        message = item.get("message") if isinstance(item.get("message"), str) and item.get("message") else "error"
        details = [f"{key}={item[key]}" for key in ("code", "param") if item.get(key)]
        text = f"{message} ({', '.join(details)})" if details else str(message)
        line = item.get("line")
        parts.append(f"line {line}: {text}" if isinstance(line, int) and not isinstance(line, bool) else text)
    if len(data) > MAX_ERRORS_SHOWN:
        parts.append(f"and {len(data) - MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)


def _request_counts(value: Any) -> dict[str, int] | None:
    if not isinstance(value, Mapping):
        return None
    counts = {
        key: count
        for key in ("total", "completed", "failed")
        if isinstance(count := value.get(key), int) and not isinstance(count, bool)
    }
    return counts or None


def _metadata(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    return {str(key): str(item) for key, item in value.items() if item is not None}


#: Where an ended Batch says when it ended, by status (its result files are made then).
_END_TIMES = ("completed_at", "failed_at", "expired_at", "cancelled_at")


def results_expire_at(obj: Mapping[str, Any], status: RemoteStatus) -> datetime | None:
    """When an ended batch's result files expire: `output_expires_after.seconds` after they were
    made (the batch's end), when the batch shows the policy it was created with; else OpenAI's
    default retention of files (models.RESULTS_KEPT)."""
    if not status.terminal:
        return None
    ended = next((t for key in _END_TIMES if (t := parse_time(obj.get(key))) is not None), None)
    policy = obj.get("output_expires_after")
    seconds = policy.get("seconds") if isinstance(policy, Mapping) else None
    return kept_until(ended, "openai", seconds)


def parse_batch(obj: Mapping[str, Any]) -> RemoteBatch:
    """An OpenAI Batch as sent on the wire → RemoteBatch (raises ProviderError if malformed)."""
    batch_id, remote_status = batch_identity(obj, "Batch")
    return RemoteBatch(
        id=batch_id,
        status=remote_status,
        input_file_id=str(obj.get("input_file_id") or ""),
        endpoint=str(obj.get("endpoint") or ""),
        created_at=parse_time(obj.get("created_at")),
        output_file_id=optional_id(obj.get("output_file_id")),
        error_file_id=optional_id(obj.get("error_file_id")),
        error=errors_text(obj.get("errors")),
        request_counts=_request_counts(obj.get("request_counts")),
        metadata=_metadata(obj.get("metadata")),
        results_expire_at=results_expire_at(obj, remote_status),
        queue_full=remote_status is RemoteStatus.FAILED and _queue_full(obj.get("errors")),
        raw=dict(obj),
    )


def _queue_full(errors: Any) -> bool:
    """Whether a failed Batch's `errors` say the organization's enqueued-token limit was reached
    (OpenAI accepts such a batch, then fails it before running any of it)."""
    data = errors.get("data") if isinstance(errors, Mapping) else None
    return isinstance(data, list) and any(
        isinstance(item, Mapping) and item.get("code") == "token_limit_exceeded" for item in data
    )


# ---------------------------------------------------------------------------
# the provider


class OpenAIProvider(HttpProvider):
    """OpenAI's Batch API (and batchd's emulator of it under `/openai/v1`) seen as a `Provider`."""

    dialect = "openai"
    default_base_url = DEFAULT_BASE_URL
    normalise_base_url = staticmethod(normalise_base_url)

    def _content_path(self, file_id: str) -> str:
        return f"{self._file_path(file_id)}/content"

    def _file_path(self, file_id: str) -> str:
        return f"/files/{quote(file_id, safe='')}"

    # -- files -------------------------------------------------------------

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        """Upload a batch input file (one multipart POST, streamed from disk); return its file id."""
        return (await self.upload(path, filename=filename, sha256=sha256)).id

    async def upload(self, path: Path, *, filename: str, sha256: str) -> RemoteFile:
        """`upload_file`, answering OpenAI's FileObject.

        Retried like any idempotent call. OpenAI does not deduplicate by
        checksum (`sha256` is only logged), so a retry after a lost answer can
        leave an unused file on the account, never a second batch.
        """
        what = "openai.upload"
        size = (await anyio.Path(path).stat()).st_size
        upload = MultipartUpload({"purpose": "batch"}, file_field="file", path=path, filename=filename, size=size)

        async def once() -> Any:
            # A fresh body per attempt; aclosing: an interrupted POST closes the file now, not at collection.
            async with aclosing(upload.body()) as body:
                response = await self._request(
                    "POST", "/files", what=what, content=body, headers=upload.headers, follow_redirects=False
                )
            if response.status_code != 200:
                raise error_from_response(response, what)
            return body_json(response, what)

        answer = await self._retried(once, what)
        stored = remote_file(answer, fallback_id="", filename=filename, size=size, purpose="batch")
        log.info("provider.upload", file_id=stored.id, filename=filename, sha256=sha256, bytes=size)
        return stored

    # -- batches -----------------------------------------------------------

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
        """Create a batch carrying `metadata.batchd_job_id`; never retried here.

        A lost answer (network, 408, 5xx, unreadable body) raises
        ProviderError(outcome_unknown=True): the daemon then lists the batches
        and adopts the one whose metadata names its job.
        """
        what = "openai.create"
        payload: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        if job_id is not None:
            payload["metadata"] = {JOB_ID_KEY: job_id}
        _, body = await self._post_create("/batches", payload, what)
        batch = parse_batch(body)
        log.info("provider.create", remote_batch_id=batch.id, input_file_id=input_file_id, job_id=job_id)
        return batch

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        """The batch's current state (retried)."""
        return await self._batch_answer("GET", f"/batches/{quote(batch_id, safe='')}", "openai.get", parse_batch)

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Ask OpenAI to cancel the batch; it stays `cancelling` for up to ~10 minutes (retried)."""
        path = f"/batches/{quote(batch_id, safe='')}/cancel"
        batch = await self._batch_answer("POST", path, "openai.cancel", parse_batch)
        log.info("provider.cancel", remote_batch_id=batch.id, status=batch.status.value)
        return batch

    async def list_batches(
        self, *, wanted: Collection[str] | None = None, since: datetime | None = None
    ) -> list[RemoteBatch]:
        """The account's batches, newest first, following the `after` cursor (each page retried);
        paging stops early as `HttpProvider._list_newest_first` says."""
        return await self._list_newest_first(
            "/batches", "openai.list", cursor="after", limit=PAGE_LIMIT, parse=parse_batch, wanted=wanted, since=since
        )
