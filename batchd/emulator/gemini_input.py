"""A Gemini batch's requests as the emulator's own request lines, and its inline responses back.

The create call turns the client's input, the lines of an uploaded file (`{"key", "request"}`)
or the inline requests (`{"request", "metadata"}`), into an input file of the emulator's lines
(`{"custom_id", "method": "POST", "url": "generateContent", "body": request}`), which the worker
runs like any other batch's. Each request gets the batch's model unless it names one (the lines
do not; a GenerateContentRequest may). The custom_id of a file line is its key; of an inline
request, its position ("0", "1", …), with its `metadata` kept beside it for the inline responses.

A request Gemini would not run (a line that is not a JSON object, without a key or with a key an
earlier line had, without a request or without contents) does not refuse the batch: its error
line (Google's shape, 400 INVALID_ARGUMENT) goes into the batch's spool at once, and the worker
takes it as answered. Only an input without any request, or with more than the dialect's limit,
refuses the create.

An inline batch's answers are shown in the batch itself (`inline_responses`): read from its
responses file and put back in the order of its requests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchd.emulator.bodies import BadJson, parse_json
from batchd.emulator.gemini_content import generate_content_problem
from batchd.emulator.google_errors import google_error_body
from batchd.emulator.spool import spool_record
from batchd.jsonl import Line, loads, read_lines
from batchd.models import MAX_REQUEST_BYTES, BatchEndpoint

#: The custom_id of a line without a usable key starts with this: no key a client means has it.
INVALID_ID_PREFIX = "\x00invalid-line-"


class CreateProblem(ValueError):
    """The input cannot make a batch at all: the create is answered 400 with this message."""


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote."""

    #: requests, the invalid ones included (each gets one result line)
    total: int
    #: of those, the ones answered with an error line at once
    invalid: int


def _encoded(line: dict[str, Any]) -> bytes | None:
    """The line as JSON bytes; None when it holds text that is not valid Unicode (a lone surrogate)."""
    try:
        return orjson.dumps(line) + b"\n"
    except orjson.JSONEncodeError:
        pass
    try:
        # What orjson refuses and json writes: integers past 64 bits.
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except (UnicodeEncodeError, ValueError):
        return None


class _Writer:
    """Writes the emulator's request lines and the spool records of the invalid ones."""

    def __init__(self, lines: BinaryIO, spool: BinaryIO, model: str, max_requests: int) -> None:
        self._lines = lines
        self._spool = spool
        self._model = model
        self._max_requests = max_requests
        self.total = 0
        self.invalid = 0

    def request(self, custom_id: str, request: dict[str, Any], metadata: Any = None) -> str | None:
        """Write a runnable request; return why it cannot be written (then nothing was)."""
        body = request if request.get("model") else {**request, "model": self._model}
        line: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "url": BatchEndpoint.GENERATE_CONTENT}
        line["body"] = body
        if metadata is not None:
            line["metadata"] = metadata
        data = _encoded(line)
        if data is None:
            return "the request holds text that is not valid Unicode (a lone surrogate)"
        self._count()
        self._lines.write(data)
        return None

    def error(self, custom_id: str, key: str | None, message: str, metadata: Any = None) -> None:
        """Write a request that only gets an error line (with `key`, when it has a usable one)."""
        self._count()
        self.invalid += 1
        result: dict[str, Any] = {} if key is None else {"key": key}
        result.update(google_error_body(400, message))
        # In the input too, so that it counts and the batch's lines stay one per request.
        placeholder = {"custom_id": custom_id, "method": "POST", "url": BatchEndpoint.GENERATE_CONTENT, "body": {}}
        if metadata is not None:
            placeholder["metadata"] = metadata
        data = _encoded(placeholder)
        if data is None:
            # Metadata that cannot be written back (a lone surrogate): the response goes without it.
            del placeholder["metadata"]
            data = orjson.dumps(placeholder) + b"\n"
        self._lines.write(data)
        self._spool.write(spool_record(False, custom_id, result))

    def _count(self) -> None:
        self.total += 1
        if self.total > self._max_requests:
            raise CreateProblem(f"a batch holds at most {self._max_requests} requests")

    def done(self) -> Converted:
        """Make both files durable; the conversion's counts."""
        if self.total == 0:
            raise CreateProblem("the batch holds no request")
        for written in (self._lines, self._spool):
            written.flush()
            os.fsync(written.fileno())
        return Converted(self.total, self.invalid)


def _usable_key(value: Any) -> str | None:
    """The key of a line, if it is one Gemini takes (a non-empty string) and can be written back."""
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def convert_file(source: Path, lines: Path, spool: Path, model: str, max_requests: int) -> Converted:
    """Convert an uploaded file of `{"key", "request"}` lines; raise CreateProblem when it holds no
    request or too many. Blocking (run it in a worker thread); streamed, a line at a time."""
    seen: set[str] = set()
    with source.open("rb") as src, lines.open("wb") as out, spool.open("wb") as answers:
        writer = _Writer(out, answers, model, max_requests)
        for line in read_lines(src, MAX_REQUEST_BYTES):
            where = f"line {line.number}"
            obj, problem = _parsed(line, where)
            key = None if obj is None else _usable_key(obj.get("key"))
            if key is None or key in seen:
                if problem is None:
                    problem = f"{where}: key must be a non-empty string"
                    if key is not None:
                        problem = f"{where}: key {key!r} was used by an earlier line"
                writer.error(_placeholder_id(line.number, seen), key, problem)
                continue
            assert obj is not None
            seen.add(key)
            request = obj.get("request")
            problem = generate_content_problem(request)
            if problem is None:
                assert isinstance(request, dict)
                problem = writer.request(key, request)
            if problem is not None:
                writer.error(key, key, f"{where}: {problem}")
        return writer.done()


def _parsed(line: Line, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """The line's object, or why it is not one."""
    if line.content is None:
        return None, f"{where} is longer than {MAX_REQUEST_BYTES} bytes"
    try:
        obj = parse_json(line.content)
    except BadJson as exc:
        return None, f"{where}: {exc}"
    if not isinstance(obj, dict):
        return None, f"{where}: not a JSON object"
    return obj, None


def _placeholder_id(number: int, seen: set[str]) -> str:
    """A custom_id no key of the batch has, for a line without a usable key of its own."""
    custom_id = f"{INVALID_ID_PREFIX}{number}"
    while custom_id in seen:
        custom_id += "'"
    seen.add(custom_id)
    return custom_id


def convert_inline(requests: Iterable[Any], lines: Path, spool: Path, model: str, max_requests: int) -> Converted:
    """Convert inline requests (`{"request", "metadata"}`); raise CreateProblem when there is none
    or too many. Blocking (run it in a worker thread)."""
    with lines.open("wb") as out, spool.open("wb") as answers:
        writer = _Writer(out, answers, model, max_requests)
        for index, item in enumerate(requests):
            custom_id = str(index)
            where = f"requests[{index}]"
            if not isinstance(item, dict):
                writer.error(custom_id, custom_id, f"{where} must be an object with a request")
                continue
            request, metadata = item.get("request"), item.get("metadata")
            problem = generate_content_problem(request)
            if problem is None:
                assert isinstance(request, dict)
                problem = writer.request(custom_id, request, metadata)
            if problem is not None:
                writer.error(custom_id, custom_id, f"{where}: {problem}", metadata)
        return writer.done()


def inline_responses(lines: Path, results: Path) -> list[dict[str, Any]]:
    """An inline batch's `inlinedResponses`: one per request answered, in the order of the requests,
    each with the request's `metadata` (when it had one). Blocking (run it in a worker thread)."""
    answered: dict[str, dict[str, Any]] = {}
    with results.open("rb") as f:
        for line in read_lines(f):
            if line.content is not None:
                result = loads(line.content)
                answered[str(result.get("key"))] = result
    responses: list[dict[str, Any]] = []
    with lines.open("rb") as f:
        for line in read_lines(f):
            if line.content is None:
                continue
            request = loads(line.content)
            result = answered.get(request["custom_id"])
            if result is None:
                continue  # never run (the batch was cancelled first)
            response: dict[str, Any] = {kind: result[kind] for kind in ("response", "error") if kind in result}
            if request.get("metadata") is not None:
                response["metadata"] = request["metadata"]
            responses.append(response)
    return responses
