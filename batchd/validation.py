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
too_deep             arrays and objects nested deeper than jsonl.MAX_JSON_DEPTH (64), which
                     the backends accept (the emulator answers such a request 400)
lone_surrogate       a string (a key, a value, the custom_id) holds a \\ud800-\\udfff escape
                     that is not half of a pair: it cannot be written back as UTF-8 JSON
object               the line is JSON but not an object
custom_id            custom_id missing, not a string, or not 1 to 64 characters (Anthropic:
                     1 to 64 of A-Z a-z 0-9 _ -)
duplicate_custom_id  the custom_id was already used; the message names that line
method               method is not "POST"
url                  url is not a supported endpoint (models.SUPPORTED_ENDPOINTS)
mixed_url            url differs from the batch's endpoint (the first supported url);
                     the message names it and its line
body                 body missing or not an object
model                body.model (Anthropic: params.model) missing or not a non-empty string
messages             chat: body.messages missing or not a non-empty list (Anthropic:
                     params.messages, always)
prompt               completions: body.prompt missing (or null)
input                embeddings: body.input missing (or null)
stream               body.stream (params.stream) is true (a batch cannot stream)
params               Anthropic: params missing or not an object
max_tokens           Anthropic: params.max_tokens missing or not an integer of at least 1
key                  Gemini: key missing, or not a non-empty string (it plays custom_id's role)
duplicate_key        Gemini: the key was already used; the message names that line
request              Gemini: request missing or not an object (a GenerateContentRequest)
contents             Gemini: request.contents missing or not a non-empty list
empty                the file holds no request at all (whole file)
too_many_requests    more requests than the provider takes in one batch (whole file)
too_large            more bytes than the provider takes in one batch (whole file), or
                     one line alone longer than the limit per request (that line):
                     Limits.max_request_bytes, 32 MB unless [provider] max_request_bytes
                     says otherwise (or the limit per batch, if that is smaller)

Which rules a line meets depends on the provider's kind (`dialect`): Anthropic takes
its own lines (`{"custom_id", "params"}`), Gemini its own (`{"key", "request"}`, the
model named by the spec or the provider, not by the lines), every other kind OpenAI's
batch format.

The size limit is checked against the bytes batchd would upload (request lines
with ``\\n`` ends, no BOM, no blank lines), which is what the provider counts.
A line over the limit per request is counted and skipped, never held whole: memory
while validating stays within about that limit, whatever the line or the file.

This module streams a file and holds the whole-file rules; the per-line rules
are in request_rules.py (pure: a line's bytes in, its problems out), and the
upload copy is written by upload_copy.py.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchd.jsonl import read_lines
from batchd.models import Limits
from batchd.request_rules import LineRules, Problem, rules_for, show_value
from batchd.store.scratch import FirstLines
from batchd.text import counted

__all__ = [
    "RULES",
    "Problem",
    "Report",
    "format_report",
    "validate_file",
    "validate_stream",
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
    "too_deep",
    "lone_surrogate",
    "params",
    "max_tokens",
    "key",
    "duplicate_key",
    "request",
    "contents",
)
#: Custom ids kept in memory before the uniqueness check spills to a scratch file.
_SEEN_IN_MEMORY = 100_000


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
    #: the tokens the requests enqueue at the provider, estimated (batchd/tokens.py)
    prompt_tokens: int = 0
    output_tokens: int = 0

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
            "estimated_tokens": {"prompt": self.prompt_tokens, "output": self.output_tokens},
            "problems": [{"line": p.line, "rule": p.rule, "message": p.message} for p in self.problems],
        }


def validate_file(
    path: Path, *, source: str, limits: Limits, max_reported: int = 100, dialect: str = "openai"
) -> Report:
    """Check every line of the batch file at `path` against DESIGN §3.

    `source` is the name the file was dropped under (it appears in the report).
    `problems` keeps whole-file problems first, then line problems in line
    order, at most `max_reported` of them; `problem_count` counts them all.
    """
    with path.open("rb") as stream:
        size_bytes = os.fstat(stream.fileno()).st_size
        return validate_stream(
            stream, source=source, limits=limits, size_bytes=size_bytes, max_reported=max_reported, dialect=dialect
        )


def validate_stream(
    stream: IO[bytes],
    *,
    source: str,
    limits: Limits,
    size_bytes: int,
    max_reported: int = 100,
    scratch_dir: Path | None = None,
    dialect: str = "openai",
) -> Report:
    """`validate_file` for a stream read to its end (the daemon's snapshot of a claimed file).

    `size_bytes` is what the report gives as the file's size on disk. Past 100,000 requests the
    uniqueness check keeps its ids in a scratch file under `scratch_dir` (the daemon's own
    state: it writes nowhere else), else in the system's temporary folder (`batchd validate`).
    `dialect` is the provider's kind: it decides the format of the lines (`rules_for`).
    """
    seen = FirstLines(in_memory=_SEEN_IN_MEMORY, spill_dir=scratch_dir)
    rules: LineRules = rules_for(dialect, seen)
    requests = 0
    line_problems: list[Problem] = []
    line_problem_count = 0
    # A line over the limit per request (or per batch, if that is smaller) is never held whole.
    cap, per = (
        (limits.max_request_bytes, "request")
        if limits.max_request_bytes <= limits.max_bytes
        else (limits.max_bytes, "batch")
    )
    with contextlib.closing(seen):
        for line in read_lines(stream, cap=cap):
            requests += 1
            if line.content is None:
                message = f"this line alone is longer than the limit per {per} ({cap:,} bytes)"
                found = [Problem(line.number, "too_large", message)]
            else:
                found = rules.check(line.number, line.content)
            if found:
                line_problem_count += len(found)
                room = max_reported - len(line_problems)
                if room > 0:
                    line_problems.extend(found[:room])

    file_problems: list[Problem] = []
    if requests == 0:
        file_problems.append(Problem(None, "empty", "the file holds no request (it is empty or only blank)"))

    return Report(
        source=source,
        problems=tuple((file_problems + line_problems)[:max_reported]),
        problem_count=len(file_problems) + line_problem_count,
        request_count=requests,
        endpoint=rules.endpoint,
        size_bytes=size_bytes,
        model=rules.model or None,
        prompt_tokens=rules.tokens.prompt,
        output_tokens=rules.tokens.output,
    )


def format_report(report: Report) -> str:
    """The text of ``NAME.errors.txt``: the file, then each problem as ``line N: rule: message``."""
    name = show_value(report.source)
    if report.ok:
        endpoint = f" for {report.endpoint}" if report.endpoint else ""
        return f"{name}: no problems; {counted(report.request_count, 'request')}{endpoint}.\n"
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
