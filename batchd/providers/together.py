"""The Together dialect of the Batch API, over an httpx.AsyncClient the caller owns.

Wire facts are in PROVIDERS.md; the official `together` SDK is the reference.
The daemon reaches the embedded local backend through this same code.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from contextlib import aclosing
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import structlog

from batchd.models import RemoteBatch, RemoteFile
from batchd.providers.errors import ProviderError
from batchd.providers.http import HttpProvider
from batchd.providers.transfer import file_body
from batchd.providers.wire import (
    batch_identity,
    error_from_response,
    error_text,
    is_wanted,
    json_or_none,
    kept_until,
    optional_id,
    parse_time,
    remote_file,
    transport_error,
)

log = structlog.get_logger(__name__)


def normalise_base_url(url: str) -> str:
    """`https://api.together.ai/v1/` → `https://api.together.ai`: every path adds /v1 (DESIGN §6)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    return url


# ---------------------------------------------------------------------------
# wire parsing (pure)


def parse_batch_job(obj: Mapping[str, Any]) -> RemoteBatch:
    """A Together BatchJob as sent on the wire → RemoteBatch (raises ProviderError if malformed)."""
    batch_id, remote_status = batch_identity(obj, "BatchJob")
    progress = obj.get("progress")
    ended = parse_time(obj.get("completed_at")) if remote_status.terminal else None
    return RemoteBatch(
        id=batch_id,
        status=remote_status,
        input_file_id=str(obj.get("input_file_id") or ""),
        endpoint=str(obj.get("endpoint") or ""),
        created_at=parse_time(obj.get("created_at")),
        output_file_id=optional_id(obj.get("output_file_id")),
        error_file_id=optional_id(obj.get("error_file_id")),
        error=error_text(obj.get("error")),
        progress=float(progress) if isinstance(progress, int | float) and not isinstance(progress, bool) else None,
        # Together documents no retention: assumed (models.RESULTS_KEPT), from `completed_at`.
        results_expire_at=kept_until(ended, "together"),
        raw=dict(obj),
    )


# ---------------------------------------------------------------------------
# the provider


class TogetherProvider(HttpProvider):
    """Together's Batch API (and batchd's emulator of it) seen as a `Provider`."""

    dialect = "together"
    normalise_base_url = staticmethod(normalise_base_url)

    def _content_path(self, file_id: str) -> str:
        return f"{self._file_path(file_id)}/content"

    def _file_path(self, file_id: str) -> str:
        return f"/v1/files/{quote(file_id, safe='')}"

    async def _call_job(self, method: str, path: str, what: str) -> RemoteBatch:
        """One idempotent call that answers a BatchJob, retried."""
        body = await self._get_json(method, path, what)
        if not isinstance(body, Mapping):
            raise ProviderError(f"{what}: expected a BatchJob object")
        return parse_batch_job(body)

    # -- files -------------------------------------------------------------

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        """Upload a batch input file in Together's three steps; return its file id.

        A file with the same checksum already on the account (409) is reused.
        """
        return (await self.upload(path, filename=filename, sha256=sha256)).id

    async def upload(self, path: Path, *, filename: str, sha256: str) -> RemoteFile:
        """`upload_file`, answering what Together says about the stored file."""
        bound = log.bind(filename=filename, sha256=sha256)
        found = await self._retried(lambda: self._upload_start(filename, sha256), "together.upload.start")
        if isinstance(found, str):
            bound.info("provider.upload", file_id=found, reused=True)
            size = (await anyio.Path(path).stat()).st_size
            return remote_file(None, fallback_id=found, filename=filename, size=size, purpose="batch-api")
        location, file_id = found
        sent = await self._retried(lambda: self._upload_put(location, path), "together.upload.put")
        answer = await self._retried(lambda: self._upload_preprocess(file_id), "together.upload.preprocess")
        bound.info("provider.upload", file_id=file_id, reused=False, bytes=sent)
        return remote_file(answer, fallback_id=file_id, filename=filename, size=sent, purpose="batch-api")

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
            body = json_or_none(response)
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
        size, body = await file_body(path)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        started = time.monotonic()
        try:
            if isinstance(body, bytes):
                response = await self._http.put(location, content=body, headers=headers, follow_redirects=False)
            else:
                # aclosing: an interrupted PUT must close the file now, not whenever the generator is collected.
                async with aclosing(body) as chunks:
                    response = await self._http.put(location, content=chunks, headers=headers, follow_redirects=False)
        except httpx.TransportError as exc:
            self._count(what, None, started)
            raise transport_error(exc, what) from exc
        self._count(what, response.status_code, started)
        if not response.is_success:
            raise error_from_response(response, what)
        return size

    async def _upload_preprocess(self, file_id: str) -> Any:
        """Step 3: ask Together to process the uploaded bytes; its FileResponse (None if unreadable)."""
        what = "together.upload.preprocess"
        response = await self._request("POST", f"/v1/files/{quote(file_id, safe='')}/preprocess", what=what)
        if not response.is_success:
            raise error_from_response(response, what)
        return json_or_none(response)

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
        """Create a batch. Never retried here (`HttpProvider._post_create` classifies failures).

        `job_id` is only logged: Together batches carry no metadata, so the
        caller reconciles a lost answer by listing and matching the input file.
        """
        what = "together.create"
        payload = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": completion_window}
        code, body = await self._post_create("/v1/batches", payload, what)
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

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        """The batch's current state (retried)."""
        return await self._call_job("GET", f"/v1/batches/{quote(batch_id, safe='')}", "together.get")

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Ask Together to cancel the batch; it may stay `cancelling` for a while (retried)."""
        batch = await self._call_job("POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel", "together.cancel")
        log.info("provider.cancel", remote_batch_id=batch.id, status=batch.status.value)
        return batch

    async def list_batches(
        self, *, wanted: Collection[str] | None = None, since: datetime | None = None
    ) -> list[RemoteBatch]:
        """The account's batches: Together answers one bare array, no pagination (retried).

        One call whatever is asked, so `since` has nothing to bound. With `wanted`, only
        those items are parsed and returned (an unwanted item that cannot be read is skipped).
        """
        what = "together.list"
        if wanted is not None and not wanted:
            return []
        ids = frozenset(wanted) if wanted is not None else None

        def take(item: Mapping[str, Any]) -> RemoteBatch | None:
            if ids is None:
                return parse_batch_job(item)
            return replace(parse_batch_job(item), raw={}) if is_wanted(item, ids) else None

        # Streamed: the whole account's array is never in memory at once, only the wanted batches.
        return await self._get_array_items("/v1/batches", what, take)
