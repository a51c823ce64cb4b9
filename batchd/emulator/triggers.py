"""Deterministic test triggers carried inside a request line's `body`.

The user documentation is the docstring of `batchd.emulator`. This module
only parses the `"batchd_emulator"` object and builds the error shapes the
triggers produce; the worker decides when to apply them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The key of the trigger object inside a request's `body`; removed before the engine sees the body.
TRIGGER_KEY = "batchd_emulator"

_KNOWN_KEYS = frozenset({"error", "status", "fail_once", "expire_batch", "expire_once", "fail_batch", "pending_once"})


class TriggerError(ValueError):
    """The trigger object is malformed; the batch fails validation with this message."""


@dataclass(frozen=True)
class Trigger:
    """What a request line asks the emulator to do instead of (or before) answering normally."""

    #: answer with an error line carrying this code
    error: str | None = None
    #: answer with a response line of this (non-2xx) status
    status: int | None = None
    #: the first time ever, answer like `status`; afterwards normally
    fail_once: int | None = None
    #: stop the batch at this line: EXPIRED
    expire_batch: bool = False
    #: like expire_batch, but only the first time the emulator ever plans this very line
    expire_once: bool = False
    #: stop the batch at this line: FAILED
    fail_batch: bool = False
    #: the first time the emulator ever plans this very line, its batch never starts running
    pending_once: bool = False

    @property
    def stops_batch(self) -> bool:
        """Whether this line ends the batch before it is answered."""
        return self.expire_batch or self.fail_batch


def _status(value: Any, key: str) -> int:
    # bool is an int subclass; `true` is not a status.
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise TriggerError(f"{TRIGGER_KEY}.{key} must be an HTTP status from 400 to 599")
    return value


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise TriggerError(f"{TRIGGER_KEY}.{key} must be true or false")
    return value


def split_trigger(body: Mapping[str, Any]) -> tuple[Trigger | None, dict[str, Any]]:
    """Return the request's trigger (None without one) and the body the engine must see.

    Raises TriggerError for an object with unknown keys or bad values, so a
    typo in a test fails loudly instead of being ignored.
    """
    clean = {k: v for k, v in body.items() if k != TRIGGER_KEY}
    if TRIGGER_KEY not in body:
        return None, clean
    raw = body[TRIGGER_KEY]
    if not isinstance(raw, dict):
        raise TriggerError(f"{TRIGGER_KEY} must be an object")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise TriggerError(f"{TRIGGER_KEY} has unknown keys: {', '.join(unknown)}")
    error = raw.get("error")
    if error is not None and (not isinstance(error, str) or not error):
        raise TriggerError(f"{TRIGGER_KEY}.error must be a non-empty string")
    trigger = Trigger(
        error=error,
        status=_status(raw["status"], "status") if "status" in raw else None,
        fail_once=_status(raw["fail_once"], "fail_once") if "fail_once" in raw else None,
        expire_batch=_flag(raw.get("expire_batch", False), "expire_batch"),
        expire_once=_flag(raw.get("expire_once", False), "expire_once"),
        fail_batch=_flag(raw.get("fail_batch", False), "fail_batch"),
        pending_once=_flag(raw.get("pending_once", False), "pending_once"),
    )
    return trigger, clean


def fail_once_key(custom_id: str, clean_body: Mapping[str, Any]) -> str:
    """The identity of a request for `fail_once`: its custom_id and the sha256 of its body."""
    canonical = json.dumps(clean_body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{custom_id}\x00{hashlib.sha256(canonical.encode()).hexdigest()}"


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def openai_error_body(status: int, message: str, *, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body `{"error": {"message", "type", "param", "code"}}`."""
    kind = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
