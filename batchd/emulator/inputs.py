"""Checking a batch's input file as the real services do before they run it.

A line that breaks a rule fails the whole batch (Together shows the message; OpenAI lists
every field in `errors`); the file is streamed, and the first stop trigger (a test's
`fail_batch` or `expire_batch`) decides how far the batch runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from batchd.emulator.bodies import BadJson, parse_json
from batchd.emulator.spool import RequestLines
from batchd.emulator.state import BatchStatus, EmulatorState, StoredBatch
from batchd.emulator.triggers import TRIGGER_KEY, Trigger, TriggerError, split_trigger
from batchd.models import PROVIDER_LIMITS, Limits

#: Longest custom_id both services accept. A Gemini batch's lines carry the `key`s of its input as
#: their custom_ids, and Gemini documents no length for those: no limit there.
MAX_CUSTOM_ID = 64


def limits_for(dialect: str) -> Limits:
    """The per-batch limits of the dialect that created a batch (Together: 100 MB, OpenAI: 200 MB,
    Anthropic: 256 MB, Gemini: 2 GB)."""
    return PROVIDER_LIMITS.get(dialect, PROVIDER_LIMITS["together"])


@dataclass(frozen=True)
class InputProblem:
    """Why a batch FAILED: Together shows `message`; OpenAI's `errors` list shows every field."""

    message: str
    code: str
    line: int | None = None
    param: str | None = None


class LineProblem(ValueError):
    """A request line breaks a rule."""

    def __init__(self, lineno: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(f"line {lineno}: {message}")
        self.problem = InputProblem(f"line {lineno}: {message}", code, lineno, param)


@dataclass(frozen=True)
class InputPlan:
    """What validation learned about a batch's input file."""

    #: requests in the file
    total: int
    #: requests to answer before a stop trigger (== total without one)
    limit: int
    #: the status a stop trigger ends the batch in
    stop: BatchStatus | None = None
    #: the line number of the stop trigger
    stop_line: int = 0
    #: why the input is invalid (the batch FAILS); None when valid
    problem: InputProblem | None = None
    #: a `pending_once` line seen for the first time: the batch stays before running until cancelled
    hold: bool = False


def _invalid(message: str, code: str, param: str | None = None) -> InputPlan:
    return InputPlan(0, 0, problem=InputProblem(message, code, None, param))


def check_line(lineno: int, raw: bytes, endpoint: str, max_custom_id: int | None = MAX_CUSTOM_ID) -> tuple[str, Any]:
    """Return (custom_id, trigger or None) of a valid request line; raise LineProblem otherwise."""
    try:
        obj = parse_json(raw)
    except BadJson as exc:
        raise LineProblem(lineno, str(exc), "invalid_json_line") from None
    if not isinstance(obj, dict):
        raise LineProblem(lineno, "not a JSON object", "invalid_json_line")
    custom_id = obj.get("custom_id")
    too_long = isinstance(custom_id, str) and max_custom_id is not None and len(custom_id) > max_custom_id
    if not isinstance(custom_id, str) or not custom_id or too_long:
        message = f"custom_id must be a string of 1 to {max_custom_id or 'any number of'} characters"
        raise LineProblem(lineno, message, "invalid_custom_id", "custom_id")
    if obj.get("method", "POST") != "POST":
        raise LineProblem(lineno, "method must be POST", "invalid_method", "method")
    if obj.get("url") != endpoint:
        message = f"url {obj.get('url')!r} is not the batch endpoint {endpoint!r}"
        raise LineProblem(lineno, message, "mismatched_endpoint", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineProblem(lineno, "body must be a JSON object", "invalid_body", "body")
    try:
        trigger, _ = split_trigger(body)
    except TriggerError as exc:
        raise LineProblem(lineno, str(exc), "invalid_trigger", f"body.{TRIGGER_KEY}") from None
    return custom_id, trigger


async def plan_input(state: EmulatorState, batch: StoredBatch) -> InputPlan:
    """Check every line of the input (streamed) and find the first stop trigger."""
    limits = limits_for(batch.dialect)
    max_custom_id = None if batch.dialect == "gemini" else MAX_CUSTOM_ID
    if batch.file_size_bytes > limits.max_bytes:
        return _invalid(f"input file is larger than {limits.max_bytes} bytes", "file_too_large", "input_file_id")
    seen: set[str] = set()
    limit: int | None = None
    stop: BatchStatus | None = None
    stop_line = 0
    #: the `pending_once` lines, remembered only once the whole input is found valid
    pending: list[str] = []
    async with RequestLines(state.content_path(batch.input_file_id)) as lines:
        while block := await lines.next_lines():
            for lineno, raw in block:
                try:
                    custom_id, trigger = check_line(lineno, raw, batch.endpoint, max_custom_id)
                except LineProblem as exc:
                    return InputPlan(0, 0, problem=exc.problem)
                if custom_id in seen:
                    problem = InputProblem(
                        f"line {lineno}: duplicate custom_id {custom_id!r}",
                        "duplicate_custom_id",
                        lineno,
                        "custom_id",
                    )
                    return InputPlan(0, 0, problem=problem)
                seen.add(custom_id)
                if trigger is not None and trigger.pending_once:
                    pending.append(_line_key("pending_once", raw))
                if limit is None and trigger is not None and await _stops_here(state, trigger, raw):
                    limit = len(seen) - 1
                    stop = (
                        BatchStatus.FAILED if trigger.fail_batch and not trigger.expire_batch else BatchStatus.EXPIRED
                    )
                    stop_line = lineno
            await anyio.lowlevel.checkpoint()
    if not seen:
        return _invalid("the input file holds no requests", "empty_file", "input_file_id")
    if len(seen) > limits.max_requests:
        message = f"the input file holds more than {limits.max_requests} requests"
        return _invalid(message, "too_many_requests_in_batch", "input_file_id")
    total = len(seen)
    # Every such line is remembered (none is left for a later batch to be held by), in order.
    firsts = [await state.first_failure(key) for key in pending]
    return InputPlan(total, total if limit is None else limit, stop, stop_line, hold=any(firsts))


def _line_key(trigger: str, raw: bytes) -> str:
    """The identity of a request line for a trigger that acts once: the trigger and the line's bytes."""
    return f"{trigger}\x00{hashlib.sha256(raw.strip()).hexdigest()}"


async def _stops_here(state: EmulatorState, trigger: Trigger, raw: bytes) -> bool:
    """Whether the batch ends at this line (expire_once: only the first time this line is seen)."""
    if trigger.expire_batch or trigger.fail_batch:
        return True
    if trigger.expire_once:
        return await state.first_failure(_line_key("expire_once", raw))
    return False
