"""JSONL lines: fast JSON for batchd's hot loops, line ends, and the request lines of a dropped file.

orjson parses a result line about three times faster than the standard
library. A line orjson refuses but `json` accepts (NaN, integers past 64
bits) still parses, through `json`, so nothing a provider sends is lost.
`read_lines` streams a dropped file's non-blank lines for validation and for
the upload copy alike, so both agree on what a line is.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator
from itertools import accumulate, count
from typing import IO, Any, NamedTuple

import orjson

#: The deepest nesting of arrays and objects a request line may have (`{}` is 1, as
#: `nesting_depth` counts): validation refuses deeper lines (with their line numbers) and the
#: emulator answers them 400, so a file that passes validation never fails later in a parser
#: with a smaller limit (orjson stops at 1024).
MAX_JSON_DEPTH = 64

_BOM = b"\xef\xbb\xbf"
# Read size of a capped line: pieces this long are held until the line ends or passes the cap.
_CHUNK = 1 << 20
# nesting_depth keeps quotes and brackets only, then weighs an opening bracket 2, a closing one 0.
_NOT_QUOTE_OR_BRACKET = bytes(b for b in range(256) if b not in b'"[]{}')
_BRACKET_WEIGHT = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def loads(data: bytes | str) -> Any:
    """Parse one JSON document."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (for scratch data batchd reads back itself)."""
    return orjson.dumps(value)


def dumps_line(value: Any) -> bytes:
    """Compact UTF-8 JSON for a line batchd rewrites in a user's request (it stays readable as
    theirs was); a lone surrogate, which UTF-8 cannot hold, is kept escaped (`\\udXXX`)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def strip_eol(raw: bytes) -> bytes:
    """A line without its `\\n` and the `\\r` of a CRLF (never part of JSON)."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


class Line(NamedTuple):
    """One non-blank line of a dropped file."""

    number: int
    #: the line without its end (and without the BOM on line 1); None when over-long
    content: bytes | None
    #: how many bytes the line adds to the upload copy (content plus "\n")
    upload_bytes: int


def read_lines(stream: IO[bytes], cap: int | None = None) -> Iterator[Line]:
    """Yield the non-blank lines of `stream`; a line whose content is longer than `cap` bytes comes
    without it, and at most about `cap` bytes of it are ever held.

    A UTF-8 BOM at the start and CRLF line ends are accepted; whitespace-only lines are skipped.
    """
    number = 0
    # Room for the line's own end: a line of exactly `cap` bytes and "\r\n" is held whole.
    held = _CHUNK if cap is None else min(_CHUNK, cap + 2)
    while True:
        first = stream.readline(held)
        if not first:
            return
        raw: bytes | None = first
        length = len(first)
        if length == held and not first.endswith(b"\n"):
            # A long line (rare): read on a piece at a time.
            raw, length = _read_capped(stream, first, None if cap is None else cap + 2)
        number += 1
        if raw is not None and number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        content = None if raw is None else strip_eol(raw)
        if content is None or (cap is not None and len(content) > cap):
            # Such a line cannot be sent: count its length, never hold it.
            yield Line(number, None, length)
        elif content and not content.isspace():  # (strip() would copy every line)
            yield Line(number, content, len(content) + 1)


def _read_capped(stream: IO[bytes], first: bytes, cap: int | None) -> tuple[bytes | None, int]:
    """The rest of a raw line begun with `first`: the whole line and its length, or (None, its
    length) when longer than `cap` bytes.

    Read a piece at a time so that a line over `cap` (a multi-GB file with no line end) costs
    at most `cap` bytes of memory: `readline(cap)` would gather its pieces and then join them.
    """
    pieces: list[bytes] | None = [first]
    length = len(first)
    while True:
        piece = stream.readline(_CHUNK)
        length += len(piece)
        if pieces is not None:
            if cap is not None and length > cap:
                pieces = None  # over: stop holding it, keep counting to its end
            else:
                pieces.append(piece)
        if not piece or piece.endswith(b"\n"):
            break
    if pieces is None:
        return None, length
    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), length


def nesting_depth(text: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (`{}` is 1; a scalar 0).

    Brackets inside strings are not counted. Meant for valid JSON; on anything else the
    answer is a guess. Cheap to call only when `text` holds more than MAX_JSON_DEPTH
    opening brackets: fewer cannot nest deeper.
    """
    if b"\\" in text:
        # In JSON a backslash always starts an escape, and `\\` pairs from the left: without
        # them, what is left of an escaped quote is `\"`. Neither bounds a string.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Between the quotes left, every other piece is inside a string.
    weights = b"".join(text.translate(None, _NOT_QUOTE_OR_BRACKET).split(b'"')[::2]).translate(_BRACKET_WEIGHT)
    # The depth after the n-th bracket is the sum of the first n weights, minus n.
    return max(map(operator.sub, accumulate(weights), count(1)), default=0)
