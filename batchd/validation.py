"""Streaming checks of a JSONL batch file, with line-numbered problems (DESIGN §3).

A file is read in binary, one line at a time, so memory does not grow with its
size; the only thing kept is the set of ``custom_id`` values needed for the
uniqueness check, and that set stops growing once the file is over the request
limit (the file is rejected anyway). Blank lines (whitespace only) are skipped,
CRLF line ends and a UTF-8 BOM at the start of the file are accepted.

Every problem carries a stable rule name. They are part of what users read in
``NAME.errors.txt`` and in ``batchd validate --json``, so never rename one:

rule                 meaning
-------------------  -------------------------------------------------------------------
encoding             the line is not valid UTF-8
json                 the line is not valid JSON (NaN and Infinity count as invalid)
object               the line is JSON but not an object
custom_id            custom_id missing, not a string, or not 1 to 64 characters
duplicate_custom_id  the custom_id was already used; the message names that line
method               method is not "POST"
url                  url is not a supported endpoint (models.SUPPORTED_ENDPOINTS)
mixed_url            url differs from the batch's endpoint (the first supported url);
                     the message names it and its line
body                 body missing or not an object
model                body.model missing or not a non-empty string
messages             chat: body.messages missing or not a non-empty list
prompt               completions: body.prompt missing (or null)
input                embeddings: body.input missing (or null)
stream               body.stream is true (a batch cannot stream)
empty                the file holds no request at all (whole file)
too_many_requests    more requests than the provider takes in one batch (whole file)
too_large            more bytes than the provider takes in one batch (whole file), or
                     one line alone longer than that (that line)

The size limit is checked against the bytes batchd would upload (request lines
with ``\\n`` ends, no BOM, no blank lines), which is what the provider counts.

The module also writes that upload copy (`write_upload_copy`) and reads
custom_ids back from it (`iter_custom_ids`) for results.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from batchd import jsonl
from batchd.durable_files import atomic_file
from batchd.jsonl import strip_eol
from batchd.models import SUPPORTED_ENDPOINTS, BatchEndpoint, Limits

__all__ = [
    "RULES",
    "Problem",
    "Report",
    "UploadCopy",
    "format_report",
    "iter_custom_ids",
    "validate_file",
    "write_upload_copy",
]

#: Every rule name a Problem can carry (see the module docstring). Published: extend only.
RULES: tuple[str, ...] = (
    "encoding",
    "json",
    "object",
    "custom_id",
    "duplicate_custom_id",
    "method",
    "url",
    "mixed_url",
    "body",
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "empty",
    "too_large",
)
#: Custom ids kept in memory before the uniqueness check spills to a scratch file.
_SEEN_IN_MEMORY = 100_000

_BOM = b"\xef\xbb\xbf"
_MAX_CUSTOM_ID = 64
# Read size used to skip the rest of an over-long line without holding it.
_SKIP_CHUNK = 1 << 20
# Longest user value quoted in a message, so one bad line cannot bloat the report.
_SHOW_MAX = 80


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a batch file."""

    #: 1-based line number; None for a problem of the whole file
    line: int | None
    #: stable short name of the rule (see the module docstring)
    rule: str
    #: what is wrong, for a person
    message: str

    def __str__(self) -> str:
        where = "file" if self.line is None else f"line {self.line}"
        return f"{where}: {self.rule}: {self.message}"


@dataclass(frozen=True)
class Report:
    """The outcome of `validate_file`."""

    #: the file name as dropped
    source: str
    #: whole-file problems first, then line problems in line order; at most `max_reported`
    problems: tuple[Problem, ...]
    #: every problem found, including those left out of `problems`
    problem_count: int
    #: non-blank lines, valid or not
    request_count: int
    #: the batch's endpoint: the first supported `url` in the file
    endpoint: str | None
    #: the file's size on disk, as dropped
    size_bytes: int
    #: the model every request names, when they all name the same one
    model: str | None = None

    @property
    def ok(self) -> bool:
        """True when the file may be submitted."""
        return self.problem_count == 0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (for ``batchd validate --json``)."""
        return {
            "source": self.source,
            "ok": self.ok,
            "problem_count": self.problem_count,
            "request_count": self.request_count,
            "endpoint": self.endpoint,
            "size_bytes": self.size_bytes,
            "model": self.model,
            "problems": [{"line": p.line, "rule": p.rule, "message": p.message} for p in self.problems],
        }


@dataclass(frozen=True)
class UploadCopy:
    """The file batchd uploads, as written by `write_upload_copy`."""

    #: hex sha256 of the copy's bytes
    sha256: str
    size_bytes: int
    request_count: int


class _Line(NamedTuple):
    number: int
    #: the line without its end (and without the BOM on line 1); None when over-long
    content: bytes | None
    #: how many bytes the line adds to the upload copy (content plus "\n")
    upload_bytes: int


def _read_lines(stream: IO[bytes], cap: int | None = None) -> Iterator[_Line]:
    """Yield the non-blank lines of `stream`; lines longer than `cap` bytes come without content."""
    number = 0
    while True:
        raw = stream.readline(cap) if cap is not None else stream.readline()
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if cap is not None and len(raw) >= cap and not raw.endswith(b"\n"):
            # Such a line cannot fit in any batch: count its length, never hold it.
            length = len(raw)
            while True:
                more = stream.readline(_SKIP_CHUNK)
                length += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield _Line(number, None, length)
            continue
        content = strip_eol(raw)
        if content.strip():
            yield _Line(number, content, len(content) + 1)


def _show(value: Any) -> str:
    """A user's value quoted as JSON (control characters escaped), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…"


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; providers do not.
    raise ValueError(f"{name} is not a JSON value")


def _parse(text: str) -> tuple[Any, str | None]:
    """Parse one line; return (value, None) or (None, the json problem's message)."""
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}: column {exc.colno})"
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        return None, f"not valid JSON ({exc})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


class _Checker:
    """The per-line rules, with the little state they share across lines."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.endpoint: str | None = None
        self.endpoint_line = 0
        self.seen = _SeenIds()
        self.requests = 0
        #: the one model every request names, "" once two differ (None before the first)
        self.model: str | None = None

    def check(self, number: int, content: bytes) -> list[Problem]:
        self.requests += 1
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = content[exc.start]
            where = f"byte 0x{bad:02x} at byte {exc.start + 1} of the line"
            return [Problem(number, "encoding", f"not valid UTF-8 ({where})")]
        value, error = _parse(text)
        if error is not None:
            return [Problem(number, "json", error)]
        if not isinstance(value, dict):
            return [Problem(number, "object", f"a request must be a JSON object, got {_kind(value)}")]
        found: list[Problem] = []
        self._custom_id(number, value, found)
        self._method(number, value, found)
        url = self._url(number, value, found)
        self._body(number, value, url, found)
        return found

    def _custom_id(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "custom_id" not in request:
            found.append(Problem(number, "custom_id", "custom_id is missing"))
            return
        custom_id = request["custom_id"]
        if not isinstance(custom_id, str):
            found.append(Problem(number, "custom_id", f"custom_id must be a string, got {_kind(custom_id)}"))
            return
        if not 1 <= len(custom_id) <= _MAX_CUSTOM_ID:
            message = f"custom_id must be 1 to {_MAX_CUSTOM_ID} characters, got {len(custom_id)}"
            found.append(Problem(number, "custom_id", message))
            return
        earlier = self.seen.add(custom_id, number)
        if earlier is not None:
            message = f"custom_id {_show(custom_id)} is already used on line {earlier}"
            found.append(Problem(number, "duplicate_custom_id", message))

    def _method(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "method" not in request:
            found.append(Problem(number, "method", 'method is missing (it must be "POST")'))
        elif request["method"] != "POST":
            found.append(Problem(number, "method", f'method must be "POST", got {_show(request["method"])}'))

    def _url(self, number: int, request: dict[str, Any], found: list[Problem]) -> str | None:
        """Check `url`; return it when it is a supported endpoint."""
        supported = ", ".join(SUPPORTED_ENDPOINTS)
        if "url" not in request:
            found.append(Problem(number, "url", f"url is missing (supported: {supported})"))
            return None
        url = request["url"]
        if not isinstance(url, str) or url not in SUPPORTED_ENDPOINTS:
            message = f"url {_show(url)} is not a supported endpoint (supported: {supported})"
            found.append(Problem(number, "url", message))
            return None
        if self.endpoint is None:
            self.endpoint, self.endpoint_line = url, number
        elif url != self.endpoint:
            message = (
                f"url {_show(url)} differs from {_show(self.endpoint)} (line {self.endpoint_line}); "
                "every request of a batch must use the same endpoint"
            )
            found.append(Problem(number, "mixed_url", message))
        return url

    def _body(self, number: int, request: dict[str, Any], url: str | None, found: list[Problem]) -> None:
        if "body" not in request:
            found.append(Problem(number, "body", "body is missing"))
            return
        body = request["body"]
        if not isinstance(body, dict):
            found.append(Problem(number, "body", f"body must be a JSON object, got {_kind(body)}"))
            return
        model = body.get("model")
        if "model" not in body:
            found.append(Problem(number, "model", "body.model is missing"))
        elif not isinstance(model, str) or not model:
            found.append(Problem(number, "model", f"body.model must be a non-empty string, got {_show(model)}"))
        elif self.model is None:
            self.model = model
        elif self.model != model:
            self.model = ""
        if url == BatchEndpoint.CHAT_COMPLETIONS:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                got = "nothing" if "messages" not in body else _show(messages)
                message = f"body.messages must be a non-empty list for {url}, got {got}"
                found.append(Problem(number, "messages", message))
        elif url == BatchEndpoint.COMPLETIONS and body.get("prompt") is None:
            found.append(Problem(number, "prompt", f"body.prompt is required for {url}"))
        elif url == BatchEndpoint.EMBEDDINGS and body.get("input") is None:
            found.append(Problem(number, "input", f"body.input is required for {url}"))
        if body.get("stream") is True:
            found.append(Problem(number, "stream", "body.stream must not be true: batch requests cannot stream"))


class _SeenIds:
    """custom_id → first line, for the uniqueness check, in bounded memory.

    The first _SEEN_IN_MEMORY ids live in a dict; past that they go to a private
    scratch SQLite file (not the Store: a throwaway index, deleted on close), so
    a file of millions of requests is checked without holding every id.
    """

    def __init__(self) -> None:
        self._memory: dict[str, int] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._db: sqlite3.Connection | None = None

    def add(self, custom_id: str, line: int) -> int | None:
        """Remember `custom_id` at `line`; return the earlier line if it was seen before."""
        earlier = self._memory.get(custom_id)
        if earlier is not None:
            return earlier
        if self._db is None and len(self._memory) < _SEEN_IN_MEMORY:
            self._memory[custom_id] = line
            return None
        db = self._open()
        try:
            db.execute("INSERT INTO seen VALUES (?, ?)", (custom_id, line))
        except sqlite3.IntegrityError:
            row = db.execute("SELECT line FROM seen WHERE id = ?", (custom_id,)).fetchone()
            return int(row[0])
        return None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self._dir = tempfile.TemporaryDirectory(prefix="batchd-ids-")
            self._db = sqlite3.connect(Path(self._dir.name) / "seen.db", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=OFF")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
            self._db.execute("BEGIN")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def validate_file(path: Path, *, source: str, limits: Limits, max_reported: int = 100) -> Report:
    """Check every line of the batch file at `path` against DESIGN §3.

    `source` is the name the file was dropped under (it appears in the report).
    `problems` keeps whole-file problems first, then line problems in line
    order, at most `max_reported` of them; `problem_count` counts them all.
    """
    checker = _Checker(limits)
    line_problems: list[Problem] = []
    line_problem_count = 0
    with path.open("rb") as stream, contextlib.closing(checker.seen):
        size_bytes = os.fstat(stream.fileno()).st_size
        # A line longer than a whole batch may hold is never read into memory.
        for line in _read_lines(stream, cap=limits.max_bytes + 1):
            if line.content is None:
                checker.requests += 1
                found = [
                    Problem(
                        line.number,
                        "too_large",
                        f"this line alone is longer than the limit per batch ({limits.max_bytes:,} bytes)",
                    )
                ]
            else:
                found = checker.check(line.number, line.content)
            line_problem_count += len(found)
            room = max_reported - len(line_problems)
            if room > 0:
                line_problems.extend(found[:room])

    file_problems: list[Problem] = []
    if checker.requests == 0:
        file_problems.append(Problem(None, "empty", "the file holds no request (it is empty or only blank)"))

    return Report(
        source=source,
        problems=tuple((file_problems + line_problems)[:max_reported]),
        problem_count=len(file_problems) + line_problem_count,
        request_count=checker.requests,
        endpoint=checker.endpoint,
        size_bytes=size_bytes,
        model=checker.model or None,
    )


def format_report(report: Report) -> str:
    """The text of ``NAME.errors.txt``: the file, then each problem as ``line N: rule: message``."""
    name = _show(report.source)
    if report.ok:
        endpoint = f" for {report.endpoint}" if report.endpoint else ""
        return f"{name}: no problems; {report.request_count:,} requests{endpoint}.\n"
    noun = "problem" if report.problem_count == 1 else "problems"
    lines = [
        f"batchd did not accept {name}: {report.problem_count:,} {noun}.",
        'Each problem reads  line NUMBER: RULE: WHAT IS WRONG  ("file" when it concerns the whole file).',
        "",
    ]
    lines.extend(str(problem) for problem in report.problems)
    left_out = report.problem_count - len(report.problems)
    if left_out > 0:
        lines.append(f"… and {left_out:,} more problems ({report.problem_count:,} in all)")
    lines += ["", "Nothing was submitted. Fix the file and drop it into the inbox again."]
    return "\n".join(lines) + "\n"


def _rewrite_model(content: bytes, model: str) -> bytes:
    """Return the line with `body.model` set to `model`; untouched when it already is."""
    request = json.loads(content)
    body = request.get("body") if isinstance(request, dict) else None
    if not isinstance(body, dict) or body.get("model") == model:
        return content
    body["model"] = model
    text = json.dumps(request, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate written as \\udXXX in the source: keep it escaped.
        return json.dumps(request, separators=(",", ":")).encode("ascii")


def write_upload_copy(src: Path, dest: Path, *, model: str | None = None) -> UploadCopy:
    """Write the copy batchd uploads: one request per line, ``\\n`` ends, no BOM, no blank lines.

    Lines are copied byte for byte, except that when `model` is given each
    line's ``body.model`` is set to it (only those lines are re-serialised,
    compactly). `src` is never modified. Meant for a file `validate_file`
    accepted: its lines are valid JSON objects of bounded length.
    """
    digest = hashlib.sha256()
    size = 0
    count = 0
    with src.open("rb") as stream, atomic_file(dest) as out:
        for line in _read_lines(stream):
            assert line.content is not None  # no cap given: every line comes whole
            content = _rewrite_model(line.content, model) if model is not None else line.content
            for chunk in (content, b"\n"):
                out.write(chunk)
                digest.update(chunk)
            size += len(content) + 1
            count += 1
    return UploadCopy(sha256=digest.hexdigest(), size_bytes=size, request_count=count)


def iter_custom_ids(path: Path) -> Iterator[str]:
    """Yield the custom_id of every request of an upload copy, in line order.

    An upload copy is batchd's own normalised file (one JSON object a line, `\n`
    ends, no blank line), so each raw line is parsed as it is: this runs over
    every request of every merge.
    """
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            request = jsonl.loads(raw)
            custom_id = request.get("custom_id") if isinstance(request, dict) else None
            if not isinstance(custom_id, str):
                raise ValueError(f"{path}: line {number} has no string custom_id")
            yield custom_id
