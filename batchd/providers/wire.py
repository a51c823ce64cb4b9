"""Reading what Batch APIs answer: times, error bodies, batch and file objects, and which
failures may be tried again. Shared by every wire dialect; no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import ijson
import orjson

from batchd.backoff import is_retryable_status, retry_after_s
from batchd.models import RESULTS_KEPT, RemoteFile, RemoteStatus
from batchd.providers.errors import ProviderError


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


def kept_until(start: datetime | None, dialect: str, seconds: Any = None) -> datetime | None:
    """When results made at `start` stop being kept: `seconds` later when the wire gave a
    number of seconds, else after the dialect's documented retention (models.RESULTS_KEPT)."""
    if start is None:
        return None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 < seconds < 10**9:
        return start + timedelta(seconds=seconds)
    return start + RESULTS_KEPT[dialect]


def error_text(value: Any) -> str | None:
    """An `error` value that is either text or an object with a message → readable text."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        message = value.get("message")
        details = [f"{key}={value[key]}" for key in ("type", "code", "param", "status") if value.get(key)]
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


def is_wanted(obj: Mapping[str, Any], ids: frozenset[str]) -> bool:
    """Whether a listed batch object is one of `ids`: a look at its raw `id` only, before any parsing."""
    batch_id = obj.get("id")
    return isinstance(batch_id, str) and batch_id in ids


def created_before(obj: Mapping[str, Any], moment: float) -> bool:
    """Whether a listed batch object was created before `moment` (unix seconds); False when it
    does not say. Read straight from the raw object (unix seconds or RFC 3339 on the wire), so
    that a page's unwanted batches are never parsed."""
    value = obj.get("created_at")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value < moment
    created = parse_time(value)
    return created is not None and created.timestamp() < moment


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


#: The words of a "queue full" refusal in the providers' error messages (Together's queued-token
#: limit, Anthropic's processing-queue limit): a 429 saying so is a full queue, not a rate limit.
_QUEUE_WORDS = ("queue", "enqueued")


def is_queue_full(status: int, payload: Any) -> bool:
    """Whether a create's refusal says the account's queue of batch work is full: OpenAI's code
    `token_limit_exceeded` (any status), Gemini's `RESOURCE_EXHAUSTED`, or a 429 whose message
    speaks of the queue (Together, Anthropic)."""
    error = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(error, Mapping) and (
        error.get("code") == "token_limit_exceeded" or error.get("status") == "RESOURCE_EXHAUSTED"
    ):
        return True
    if status != 429:
        return False
    message = (parse_error_message(payload) or "").lower()
    return any(word in message for word in _QUEUE_WORDS)


def create_refusal(response: httpx.Response, what: str) -> ProviderError:
    """A batch create answered with a non-success status → ProviderError, classified.

    429 and other 4xx (but 408) mean the provider refused before acting; 408,
    5xx and anything unexpected mean it may have acted (outcome unknown).
    """
    error = error_from_response(response, what)
    code = response.status_code
    if is_queue_full(code, json_or_none(response)):
        return ProviderError(
            error.message, status_code=code, retryable=True, retry_after=error.retry_after, queue_full=True
        )
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


class ArrayItems:
    """The objects of a JSON array body, parsed as its bytes arrive (ijson's push parser).

    `feed` each chunk and take the objects completed so far; `close` at the end. A body that
    is not one array of objects, or not JSON, is a ProviderError naming `what`.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._done: list[Any] = ijson.sendable_list()
        # Floats as floats (not Decimal): the wire parsers compare them with plain numbers.
        self._parser = ijson.items_coro(self._done, "item", use_float=True)
        self._started = False

    def feed(self, chunk: bytes) -> list[Mapping[str, Any]]:
        if not self._started:
            head = chunk.lstrip()
            if not head:
                return []
            if not head.startswith(b"["):
                raise ProviderError(f"{self._what}: expected a JSON array")
            self._started = True
        try:
            self._parser.send(chunk)
        except ijson.JSONError as exc:
            raise ProviderError(f"{self._what}: a body that is not JSON ({exc})") from exc
        return self._take()

    def close(self) -> list[Mapping[str, Any]]:
        if not self._started:
            raise ProviderError(f"{self._what}: expected a JSON array, got an empty body")
        try:
            self._parser.close()
        except ijson.JSONError as exc:
            raise ProviderError(f"{self._what}: a body that is not JSON ({exc})") from exc
        return self._take()

    def _take(self) -> list[Mapping[str, Any]]:
        items = list(self._done)
        del self._done[:]
        for item in items:
            if not isinstance(item, Mapping):
                raise ProviderError(f"{self._what}: expected a JSON array of objects")
        return items
