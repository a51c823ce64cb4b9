"""Google's Gemini Batch Mode, over an httpx.AsyncClient the caller owns.

Wire facts are in PROVIDERS.md; the official `google-genai` SDK is the reference. What differs
from the OpenAI-format dialects, and how it fits the `Provider` protocol:

* The key travels as `x-goog-api-key`; paths are under `/v1beta` (a base URL given with
  `/v1beta` or `/v1` is accepted and the version stripped).
* The input file goes up through the Files API's resumable protocol: a start call answers an
  upload URL, and the bytes go there in one `upload, finalize` request. That URL authorises
  itself, so the key is never sent to it (it may name another host).
* The model is named by the create call (`models/{model}:batchGenerateContent`), not by the
  lines; batchd's job id goes in `display_name` (`batchd-<job id>`), the only field a listed
  batch carries for it, so a lost create is found again by its input file and that name.
* A batch comes as an operation (`{"name", "metadata": {…the batch…}, "done", "response"}`)
  or as the batch itself; both are read. States arrive as `BATCH_STATE_*` or `JOB_STATE_*`,
  counts as strings. A SUCCEEDED batch may hold error lines: each line decides (the merge).
* Ids are Google's resource names (`batches/…`, `files/…`), used as they are in paths; a name
  that is not of that form is refused before it reaches a URL.
* Gemini keeps a file (an upload, a batch's responses file) 48 h, uploads against a 20 GB
  project quota: `delete_file` deletes one (`files/…`), as the provider's `delete_files` says.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import structlog

from batchd import chaos
from batchd.models import BatchEndpoint, RemoteBatch, RemoteFile, RemoteStatus
from batchd.providers.errors import ProviderError
from batchd.providers.http import HttpProvider
from batchd.providers.wire import body_json, error_from_response, kept_until, parse_time, transport_error

log = structlog.get_logger(__name__)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
VERSION = "v1beta"
#: `display_name` of a batch batchd creates: this prefix, then the job's id.
DISPLAY_PREFIX = "batchd-"
#: The metadata key a parsed batch names batchd's job under (as OpenAI's metadata does).
JOB_ID_KEY = "batchd_job_id"
#: The page size asked of `GET batches` (the API may answer fewer).
PAGE_SIZE = 1000
#: Bytes of the input file read per chunk of the upload body.
_READ_BYTES = 1 << 20
_BATCH_NAME = re.compile(r"batches/[A-Za-z0-9_-]{1,128}")
_FILE_NAME = re.compile(r"files/[A-Za-z0-9_-]{1,128}")
#: A batch's state without its prefix → batchd's status. PENDING: not running yet.
_STATES = {
    "PENDING": RemoteStatus.VALIDATING,
    "RUNNING": RemoteStatus.IN_PROGRESS,
    "SUCCEEDED": RemoteStatus.COMPLETED,
    "FAILED": RemoteStatus.FAILED,
    "CANCELLED": RemoteStatus.CANCELLED,
    "EXPIRED": RemoteStatus.EXPIRED,
}


def resource_name(value: Any, pattern: re.Pattern[str], what: str) -> str:
    """A resource name from the wire or a caller, checked to be of its form (it goes into paths)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProviderError(f"{what}: {value!r} is not a Gemini resource name ({pattern.pattern})")
    return value


def _first(obj: Mapping[str, Any], *keys: str) -> Any:
    """The value of the first key present: the wire's lowerCamel names, then proto's snake ones."""
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _count(value: Any) -> int | None:
    """A count as the wire sends it: a string of digits (int64 in JSON), or a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _state(value: Any, name: str) -> RemoteStatus:
    if isinstance(value, str):
        for prefix in ("BATCH_STATE_", "JOB_STATE_"):
            if value.startswith(prefix) and value[len(prefix) :] in _STATES:
                return _STATES[value[len(prefix) :]]
    raise ProviderError(f"Gemini batch {name}: unknown state {value!r}")


def _the_batch(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch inside an operation (its `metadata`), or the object itself when it is the batch."""
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping) and "state" in metadata:
        return metadata
    return obj


def _counts(stats: Mapping[str, Any]) -> dict[str, int] | None:
    """`batchStats` → total / completed / failed / pending. Google's JSON leaves a zero count
    out (proto3), so once the batch has stats, a count it does not name is 0."""
    if not stats:
        return None
    counts = {
        key: count
        for key, wire in (
            ("total", ("requestCount", "request_count")),
            ("completed", ("successfulRequestCount", "successful_request_count")),
            ("failed", ("failedRequestCount", "failed_request_count")),
            ("pending", ("pendingRequestCount", "pending_request_count")),
        )
        if (count := _count(_first(stats, *wire) or 0)) is not None
    }
    return counts or None


def _responses_file(obj: Mapping[str, Any], batch: Mapping[str, Any]) -> str | None:
    """Where the results are: the operation's `response`, the batch's `output`, or an SDK's `dest`."""
    for holder in (obj.get("response"), batch.get("output"), batch.get("dest")):
        found = _first(_mapping(holder), "responsesFile", "responses_file", "fileName", "file_name")
        if isinstance(found, str) and found:
            return found
    return None


def parse_batch(obj: Mapping[str, Any]) -> RemoteBatch:
    """A Gemini batch (an operation, or the batch itself) → RemoteBatch (ProviderError if malformed)."""
    name = obj.get("name")
    if not isinstance(name, str) or not _BATCH_NAME.fullmatch(name):
        raise ProviderError(f"malformed Gemini batch: name={name!r}")
    batch = _the_batch(obj)
    display = _first(batch, "displayName", "display_name")
    job_id = display[len(DISPLAY_PREFIX) :] if isinstance(display, str) and display.startswith(DISPLAY_PREFIX) else ""
    source = _first(_mapping(_first(batch, "inputConfig", "input_config", "src")), "fileName", "file_name")
    error = obj.get("error")
    status = _state(batch.get("state"), name)
    # The responses file is made as the batch ends, and Gemini deletes every file 48 h after.
    ended = parse_time(_first(batch, "endTime", "end_time", "updateTime", "update_time")) if status.terminal else None
    return RemoteBatch(
        id=name,
        status=status,
        input_file_id=source if isinstance(source, str) else "",
        endpoint=BatchEndpoint.GENERATE_CONTENT,
        created_at=parse_time(_first(batch, "createTime", "create_time")),
        output_file_id=_responses_file(obj, batch),
        error=str(error.get("message") or error) if isinstance(error, Mapping) else None,
        request_counts=_counts(_mapping(_first(batch, "batchStats", "batch_stats"))),
        metadata={JOB_ID_KEY: job_id} if job_id else None,
        results_expire_at=kept_until(ended, "gemini"),
        raw=dict(obj),
    )


def parse_file(obj: Any, *, filename: str, size: int) -> RemoteFile:
    """The upload answer `{"file": {…}}` → RemoteFile."""
    stored = _mapping(_mapping(obj).get("file"))
    name = resource_name(stored.get("name"), _FILE_NAME, "gemini.upload")
    return RemoteFile(
        id=name,
        filename=str(_first(stored, "displayName", "display_name") or filename),
        bytes=_count(_first(stored, "sizeBytes", "size_bytes")) or size,
        purpose="batch",
        created_at=parse_time(_first(stored, "createTime", "create_time")),
        raw=dict(stored),
    )


def model_path(model: str) -> str:
    """`gemini-2.5-flash` or `models/gemini-2.5-flash` → the create call's path."""
    bare = model.removeprefix("models/")
    if not bare or "/" in bare:
        raise ProviderError(f"gemini.create: {model!r} is not a model name")
    return f"/{VERSION}/models/{quote(bare, safe='')}:batchGenerateContent"


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        while chunk := await f.read(_READ_BYTES):
            yield chunk


class GeminiProvider(HttpProvider):
    """Gemini Batch Mode (and batchd's emulator of it under `/gemini`) as a `Provider`."""

    dialect = "gemini"
    default_base_url = DEFAULT_BASE_URL

    @staticmethod
    def normalise_base_url(url: str) -> str:
        """The API's origin: a trailing `/v1beta` or `/v1` is dropped (paths add the version)."""
        base = url.strip().rstrip("/")
        for version in ("/v1beta", "/v1"):
            base = base.removesuffix(version)
        return base

    def _auth(self) -> dict[str, str]:
        return {"x-goog-api-key": self._api_key}

    def _content_path(self, file_id: str) -> str:
        name = resource_name(file_id, _FILE_NAME, "gemini.download")
        return f"/download/{VERSION}/{name}:download?alt=media"

    # -- files ---------------------------------------------------------------

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        return (await self.upload(path, filename=filename, sha256=sha256)).id

    async def upload(self, path: Path, *, filename: str, sha256: str) -> RemoteFile:
        """The resumable upload: start a session, then send the bytes there in one go (retried whole).

        Gemini does not deduplicate uploads: a retry after a lost answer can leave an unused
        file, which Gemini deletes after 48 h; never a second batch.
        """
        what = "gemini.upload"
        size = (await anyio.Path(path).stat()).st_size

        async def once() -> Any:
            start = await self._request(
                "POST", f"/upload/{VERSION}/files", what=what, json={"file": {"display_name": filename}},
                headers={
                    "X-Goog-Upload-Protocol": "resumable",
                    "X-Goog-Upload-Command": "start",
                    "X-Goog-Upload-Header-Content-Length": str(size),
                    "X-Goog-Upload-Header-Content-Type": "application/jsonl",
                },
            )  # fmt: skip
            if start.status_code != 200:
                raise error_from_response(start, what)
            session = start.headers.get("X-Goog-Upload-URL", "")
            if not session.startswith(("https://", "http://")):
                raise ProviderError(f"{what}: the start call answered no upload URL", retryable=True)
            return await self._send_bytes(session, path, size, what)

        stored = parse_file(await self._retried(once, what), filename=filename, size=size)
        log.info("provider.upload", file_id=stored.id, filename=filename, sha256=sha256, bytes=size)
        return stored

    async def _send_bytes(self, session: str, path: Path, size: int, what: str) -> Any:
        """The upload's bytes to its session URL, without the key (the URL carries its own grant)."""
        headers = {
            "X-Goog-Upload-Command": "upload, finalize",
            "X-Goog-Upload-Offset": "0",
            "Content-Length": str(size),
            "Content-Type": "application/jsonl",
        }
        started = time.monotonic()
        try:
            if chaos.strikes("provider", what):
                raise httpx.ConnectError("connection refused (injected)")
            response = await self._http.post(session, content=_file_chunks(path), headers=headers)
        except httpx.TransportError as exc:
            self._count(what, None, started)
            raise transport_error(exc, what) from exc
        self._count(what, response.status_code, started)
        if response.status_code != 200:
            raise error_from_response(response, what)
        return body_json(response, what)

    def _file_path(self, file_id: str) -> str:
        return f"/{VERSION}/{resource_name(file_id, _FILE_NAME, 'gemini.delete_file')}"

    # -- batches -------------------------------------------------------------

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
        """Create a batch of the uploaded file for `model`, named after the job; never retried.

        A lost answer raises ProviderError(outcome_unknown=True): the daemon lists the batches
        and adopts the one made from this file for this job (`display_name`).
        """
        what = "gemini.create"
        if not model:
            raise ProviderError(f"{what}: Gemini names the model in the create call, and none was given")
        name = resource_name(input_file_id, _FILE_NAME, what)
        batch: dict[str, Any] = {"input_config": {"file_name": name}}
        batch["display_name"] = f"{DISPLAY_PREFIX}{job_id}" if job_id else "batchd"
        _, body = await self._post_create(model_path(model), {"batch": batch}, what)
        created = parse_batch(body)
        log.info("provider.create", remote_batch_id=created.id, model=model, job_id=job_id)
        return created

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        name = resource_name(batch_id, _BATCH_NAME, "gemini.get")
        return await self._batch_answer("GET", f"/{VERSION}/{name}", "gemini.get", parse_batch)

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Ask Gemini to cancel (it answers nothing of the batch), then read the batch (both retried)."""
        name = resource_name(batch_id, _BATCH_NAME, "gemini.cancel")
        await self._get_json("POST", f"/{VERSION}/{name}:cancel", "gemini.cancel")
        batch = await self.get_batch(name)
        log.info("provider.cancel", remote_batch_id=batch.id, status=batch.status.value)
        return batch

    async def list_batches(
        self, *, wanted: Collection[str] | None = None, since: datetime | None = None
    ) -> list[RemoteBatch]:
        """The account's batches, following `nextPageToken` (each page retried).

        Gemini does not document the list's order, so `since` never stops the paging (a lost
        create must not be missed); paging stops once every `wanted` batch is found.
        """
        what = "gemini.list"
        ids = frozenset(wanted) if wanted is not None else None
        if ids is not None and not ids:
            return []
        found: dict[str, RemoteBatch] = {}
        token: str | None = None
        while True:
            params: dict[str, str | int] = {"pageSize": PAGE_SIZE}
            if token:
                params["pageToken"] = token
            body = await self._get_json("GET", f"/{VERSION}/batches", what, params=params)
            page = _mapping(body)
            items = _first(page, "operations", "batches")
            if items is None:
                items = []
            if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
                raise ProviderError(f"{what}: expected `operations` (or `batches`) to be a list of objects")
            for item in items:
                if ids is not None:
                    # The name is looked at first: an unwanted batch is never parsed.
                    if item.get("name") not in ids:
                        continue
                    # Without its wire object: a sweep may want 100,000 of them.
                    found[item["name"]] = replace(parse_batch(item), raw={})
                else:
                    batch = parse_batch(item)
                    found.setdefault(batch.id, batch)
            if ids is not None and ids <= found.keys():
                return list(found.values())
            following = page.get("nextPageToken")
            if not isinstance(following, str) or not following or not items:
                return list(found.values())
            if following == token:
                raise ProviderError(f"{what}: the page after {token!r} names the same page token")
            token = following
