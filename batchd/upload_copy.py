"""The upload copy: the file batchd uploads for a dropped batch file, and its custom_ids read back.

One request per line, `\\n` ends, no BOM, no blank line; `model` from a spec
rewrites `body.model` in this copy, never in the user's file (DESIGN §3).
results.py reads the custom_ids back (`iter_custom_ids`) to order a merge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from batchd import jsonl

__all__ = ["UploadCopy", "iter_custom_ids", "leading_custom_id", "write_upload_copy"]


def _leading(key: str) -> tuple[bytes, bytes]:
    """The two spellings of a line that begins with its `key`: Python's json.dumps and orjson's."""
    return (b'{"' + key.encode() + b'": "', b'{"' + key.encode() + b'":"')


_LEADING_KEYS = {key: _leading(key) for key in ("custom_id", "key")}


@dataclass(frozen=True)
class UploadCopy:
    """The file batchd uploads, as written by `write_upload_copy`."""

    #: hex sha256 of the copy's bytes
    sha256: str
    size_bytes: int
    request_count: int


def _rewrite_model(content: bytes, model: str) -> bytes:
    """Return the line with `body.model` set to `model`; untouched when it already is."""
    request = json.loads(content)
    body = request.get("body") if isinstance(request, dict) else None
    if not isinstance(body, dict) or body.get("model") == model:
        return content
    body["model"] = model
    return jsonl.dumps_line(request)


def write_upload_copy(
    src: Path | IO[bytes], dest: Path, *, model: str | None = None, durable: bool = True
) -> UploadCopy:
    """Write the copy batchd uploads: one request per line, ``\\n`` ends, no BOM, no blank lines.

    Lines are copied byte for byte, except that when `model` is given each
    line's ``body.model`` is set to it (only those lines are re-serialised,
    compactly). `src` (a path, or a stream read to its end) is never modified.
    Meant for a file `validate_file` accepted: its lines are valid JSON objects
    of bounded length. Without `durable`, the caller makes it durable (durable_files.make_durable).
    """
    # Imported here, not above: a merge's helper process imports this module for
    # `iter_custom_ids` alone, and starts in a third of the time without durable_files.
    from batchd.durable_files import atomic_file

    digest = hashlib.sha256()
    size = 0
    count = 0
    with ExitStack() as files:
        stream = files.enter_context(src.open("rb")) if isinstance(src, Path) else src
        out = files.enter_context(atomic_file(dest, durable=durable))
        for line in jsonl.read_lines(stream):
            assert line.content is not None  # no cap given: every line comes whole
            content = _rewrite_model(line.content, model) if model is not None else line.content
            for chunk in (content, b"\n"):
                out.write(chunk)
                digest.update(chunk)
            size += len(content) + 1
            count += 1
    return UploadCopy(sha256=digest.hexdigest(), size_bytes=size, request_count=count)


def leading_custom_id(raw: bytes, key: str = "custom_id") -> str | None:
    """The custom_id (`key`: Gemini's `key`) of a request line that begins with it, read without
    parsing the line.

    None when not sure, and the caller parses the line: custom_id is not the line's first key
    (in one of the two usual spellings), the line holds a backslash after the key (an escape:
    in the value, or spelling the key anew later), or the rest of the line holds another
    `"custom_id"` (a nested key, or a duplicate key, whose value a parser would take). Meant
    for lines known to be JSON objects: the rest of the line is not checked.
    """
    spellings = _LEADING_KEYS.get(key) or _leading(key)
    for spelling in spellings:
        if raw.startswith(spelling):
            start = len(spelling)
            break
    else:
        return None
    end = raw.find(b'"', start)
    # A backslash is found at memchr speed; most lines have none, and those are parsed.
    if end < 0 or raw.find(b"\\", start) >= 0 or raw.find(b'"' + key.encode() + b'"', end) >= 0:
        return None
    try:
        return raw[start:end].decode()
    except UnicodeDecodeError:
        return None


def iter_custom_ids(path: Path, key: str = "custom_id") -> Iterator[str]:
    """Yield the custom_id (`key`: the dialect's id field) of every request of an upload copy,
    in line order.

    An upload copy is batchd's own normalised file (one JSON object a line, `\n`
    ends, no blank line), so each raw line is read as it is: this runs over
    every request of every merge. Most lines begin with their custom_id and
    are not parsed (`leading_custom_id`); the others are.
    """
    with path.open("rb", buffering=1 << 20) as stream:
        for number, raw in enumerate(stream, start=1):
            custom_id = leading_custom_id(raw, key)
            if custom_id is not None:
                yield custom_id
                continue
            request = jsonl.loads(raw)
            custom_id = request.get(key) if isinstance(request, dict) else None
            if not isinstance(custom_id, str):
                raise ValueError(f"{path}: line {number} has no string {key}")
            yield custom_id
