"""Streaming helpers of the batch worker: reading input lines, collecting answers, writing result files.

Nothing here holds a whole file in memory: inputs are read in blocks, answers
are appended to a spool file as they come, and the result files are written
from the spool through a small index (hash, offset, length per answer).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import AsyncResource

_BOM = b"\xef\xbb\xbf"
_READ_BLOCK = 256 * 1024
_SPOOL_FLUSH_BYTES = 1024 * 1024
# b"o " or b"e ", 64 hex digits, one space: then the JSON line.
_PREFIX = 67


class RequestLines:
    """The non-blank lines of a JSONL file with their 1-based line numbers, block by block.

    Lines are split on LF only; CR, surrounding blanks and a UTF-8 BOM on the
    first line are stripped. Use as `async with RequestLines(path) as lines:`.
    """

    def __init__(self, path: Path, *, block_size: int = _READ_BLOCK) -> None:
        self._path = path
        self._block_size = block_size
        self._file: anyio.AsyncFile[bytes] | None = None
        self._rest = b""
        self._lineno = 0
        self._eof = False

    async def __aenter__(self) -> Self:
        self._file = await anyio.open_file(self._path, "rb")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            await self._file.aclose()  # shielded by anyio: the descriptor is never leaked
            self._file = None

    async def next_lines(self) -> list[tuple[int, bytes]]:
        """The next non-blank lines (at least one), or an empty list at the end of the file."""
        assert self._file is not None, "use RequestLines as an async context manager"
        while not self._eof:
            data = await self._file.read(self._block_size)
            if not data:
                self._eof = True
                tail, self._rest = self._rest, b""
                return self._keep([tail]) if tail else []
            parts = (self._rest + data).split(b"\n")
            self._rest = parts.pop()
            lines = self._keep(parts)
            if lines:
                return lines
        return []

    def _keep(self, raw_lines: list[bytes]) -> list[tuple[int, bytes]]:
        kept: list[tuple[int, bytes]] = []
        for raw in raw_lines:
            self._lineno += 1
            line = raw.removeprefix(_BOM) if self._lineno == 1 else raw
            line = line.strip()
            if line:
                kept.append((self._lineno, line))
        return kept


def custom_id_hash(custom_id: str) -> str:
    """The sort key of result lines: Together does not keep input order, and neither do we."""
    return hashlib.sha256(custom_id.encode()).hexdigest()


def dump_line(line: dict[str, Any]) -> bytes:
    """One JSONL line, UTF-8, newline-terminated."""
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


class SpoolWriter(AsyncResource):
    """Collects a running batch's answers in completion order, buffered, in a spool file.

    Opening truncates the spool: a batch picked up again after a restart is
    answered from scratch.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: anyio.AsyncFile[bytes] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._lock = anyio.Lock()

    async def __aenter__(self) -> Self:
        self._file = await anyio.open_file(self._path, "wb")
        return self

    def append(self, ok: bool, custom_id: str, line: dict[str, Any]) -> None:
        """Add one answer: `ok` for the output file, else for the error file."""
        record = (b"o " if ok else b"e ") + custom_id_hash(custom_id).encode() + b" " + dump_line(line)
        self._buffer.append(record)
        self._buffered += len(record)

    @property
    def full(self) -> bool:
        """Whether enough is buffered to be worth a write."""
        return self._buffered >= _SPOOL_FLUSH_BYTES

    async def flush(self) -> None:
        """Write out what is buffered."""
        async with self._lock:
            if not self._buffer or self._file is None:
                return
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            await self._file.write(data)

    async def aclose(self) -> None:
        """Flush and close; shielded so that cancellation never leaks the descriptor."""
        with anyio.CancelScope(shield=True):
            if self._file is not None:
                await self.flush()
                await self._file.aclose()
                self._file = None


@dataclass(frozen=True)
class WrittenResults:
    """What `write_sorted_results` wrote."""

    output_lines: int
    output_bytes: int
    error_lines: int
    error_bytes: int


def write_sorted_results(spool: Path, output: Path, errors: Path) -> WrittenResults:
    """Split the spool into the output and error files, each sorted by sha256 of custom_id.

    Blocking: run it in a worker thread. Both files are fsynced; the caller
    installs or deletes them.
    """
    index: list[tuple[bytes, int, int, bool]] = []
    if spool.exists():
        with spool.open("rb") as f:
            offset = 0
            for raw in f:
                index.append((raw[2:66], offset + _PREFIX, len(raw) - _PREFIX, raw[:1] == b"o"))
                offset += len(raw)
    index.sort()
    counts = [0, 0, 0, 0]
    with output.open("wb") as out, errors.open("wb") as err:
        src = spool.open("rb") if index else None
        try:
            for _key, start, length, ok in index:
                assert src is not None
                src.seek(start)
                data = src.read(length)
                (out if ok else err).write(data)
                slot = 0 if ok else 2
                counts[slot] += 1
                counts[slot + 1] += length
        finally:
            if src is not None:
                src.close()
        for written in (out, err):
            written.flush()
            os.fsync(written.fileno())
    return WrittenResults(*counts)
