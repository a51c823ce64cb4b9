"""Streaming helpers of the batch worker: reading input lines, collecting answers, writing result files.

Nothing here holds a whole file in memory: inputs are read in blocks, answers
are appended to a spool file as they come (fsynced in small groups, so a
restart resumes a batch where it stopped), and the result files are written
from the spool through a small index (hash, offset, length per answer).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import anyio
import anyio.to_thread
from anyio.abc import AsyncResource

from batchd.emulator.answers import usage_of

_BOM = b"\xef\xbb\xbf"
_READ_BLOCK = 256 * 1024
#: How long a spool write waits for more answers to write with it (the price of durability, shared).
GROUP_WINDOW_S = 0.005
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


@dataclass
class SpoolSummary:
    """What a spool holds: the answered requests (by custom_id hash) and their counts."""

    answered: set[str] = field(default_factory=set)
    #: answers for the output file (2xx)
    completed: int = 0
    #: answers for the error file
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def _parse_record(raw: bytes) -> tuple[str, bool, dict[str, Any]] | None:
    """(hash, ok, line) of a complete spool record; None for a torn or foreign one."""
    if len(raw) < _PREFIX + 2 or raw[:2] not in (b"o ", b"e ") or raw[66:67] != b" " or not raw.endswith(b"\n"):
        return None
    try:
        line = json.loads(raw[_PREFIX:])
    except ValueError:
        return None
    if not isinstance(line, dict):
        return None
    return raw[2:66].decode("ascii", errors="replace"), raw[:1] == b"o", line


def recover_spool(path: Path) -> SpoolSummary:
    """Read what an earlier run recorded and cut off a torn last record (a crash mid-write).

    Blocking: run it in a worker thread. A record is kept only when it is a
    whole, parseable line; everything from the first bad one on is dropped,
    and those requests are simply asked again.
    """
    summary = SpoolSummary()
    if not path.exists():
        return summary
    good_end = 0
    with path.open("r+b") as f:
        for raw in f:
            parsed = _parse_record(raw)
            if parsed is None:
                break
            good_end += len(raw)
            key, ok, line = parsed
            if key in summary.answered:
                continue
            summary.answered.add(key)
            if ok:
                summary.completed += 1
                response = line.get("response")
                body = response.get("body") if isinstance(response, dict) else None
                if isinstance(body, dict):
                    used_in, used_out = usage_of(body)
                    summary.input_tokens += used_in
                    summary.output_tokens += used_out
            else:
                summary.failed += 1
        if f.seek(0, os.SEEK_END) != good_end:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return summary


def spool_record(ok: bool, custom_id: str, line: dict[str, Any], key: str | None = None) -> bytes:
    """One spool record: `o`/`e`, the custom_id hash (the sort key; `key` when already known), the result line."""
    return (b"o " if ok else b"e ") + (key or custom_id_hash(custom_id)).encode() + b" " + dump_line(line)


class Spool(AsyncResource):
    """A running batch's answers, appended in completion order and fsynced as they come.

    Opening recovers what an earlier run of the same batch recorded
    (`summary`), so a restart resumes the batch without asking those
    requests again. `append()` returns once its record is on disk: the
    appends that arrive within `window_s` of each other, or while an fsync
    runs, are written and fsynced together (group commit), so a kill loses
    at most the answers still waiting.
    """

    def __init__(self, path: Path, *, window_s: float | None = None) -> None:
        self._path = path
        self._window = GROUP_WINDOW_S if window_s is None else window_s
        self._file: BinaryIO | None = None
        self.summary = SpoolSummary()
        self._pending: list[bytes] = []
        #: groups are numbered; every record joins the group being collected
        self._collecting = 0
        #: groups below this number are on disk
        self._synced = 0
        self._writing = False
        self._changed = anyio.Event()
        self._broken: BaseException | None = None

    async def __aenter__(self) -> Self:
        self.summary = await anyio.to_thread.run_sync(recover_spool, self._path)
        self._file = await anyio.to_thread.run_sync(self._path.open, "ab")
        return self

    async def append(
        self, answers: Sequence[tuple[bool, str, dict[str, Any]]], *, keys: Sequence[str] | None = None
    ) -> None:
        """Record answers `(ok, custom_id, line)` (`ok`: for the output file); return once they are durable.

        `keys` are their custom_id hashes when the caller has them already (each is hashed once).
        """
        if keys is None:
            keys = [custom_id_hash(custom_id) for _, custom_id, _ in answers]
        self._pending.extend(
            spool_record(ok, custom_id, line, key) for (ok, custom_id, line), key in zip(answers, keys, strict=True)
        )
        group = self._collecting
        while self._synced <= group:
            if self._broken is not None:
                raise RuntimeError(f"the spool {self._path} could not be written") from self._broken
            if self._writing:
                await self._changed.wait()
                continue
            await self._write_pending()
        self.summary.answered.update(keys)

    async def _write_pending(self) -> None:
        self._writing = True
        try:
            # Let the answers arriving meanwhile join this write: a thread hop and an fsync cost
            # about as much CPU as answering a request from a fast upstream.
            await anyio.sleep(self._window)
        except BaseException:
            self._writing = False
            self._wake()
            raise
        data, self._pending = b"".join(self._pending), []
        group = self._collecting
        self._collecting += 1
        try:
            # Shielded: once taken from the queue, the records must reach the disk.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write_sync, data)
            self._synced = group + 1
        except Exception as exc:
            self._broken = exc
            raise
        finally:
            self._writing = False
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _write_sync(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def aclose(self) -> None:
        """Write what is still pending (appends cancelled while waiting) and close."""
        with anyio.CancelScope(shield=True):
            if self._file is None:
                return
            if self._pending and self._broken is None:
                data, self._pending = b"".join(self._pending), []
                await anyio.to_thread.run_sync(self._write_sync, data)
            await anyio.to_thread.run_sync(self._file.close)
            self._file = None


@dataclass(frozen=True)
class WrittenResults:
    """What `write_sorted_results` wrote."""

    output_lines: int
    output_bytes: int
    error_lines: int
    error_bytes: int


def write_sorted_results(spool: Path, output: Path, errors: Path | None) -> WrittenResults:
    """Split the spool into the output and error files, each sorted by sha256 of custom_id; with
    `errors` None, every line goes to `output` (Gemini's one responses file).

    Blocking: run it in a worker thread. The files are fsynced; the caller installs or deletes them.
    """
    index: list[tuple[bytes, int, int, bool]] = []
    if spool.exists():
        with spool.open("rb") as f:
            offset = 0
            for raw in f:
                # A torn last record (a crash mid-write, never recovered) is not an answer.
                if not raw.endswith(b"\n") or raw[:2] not in (b"o ", b"e "):
                    break
                index.append((raw[2:66], offset + _PREFIX, len(raw) - _PREFIX, raw[:1] == b"o"))
                offset += len(raw)
    index.sort()
    counts = [0, 0, 0, 0]
    previous: bytes | None = None
    with output.open("wb") as out, errors.open("wb") if errors is not None else nullcontext(out) as err:
        src = spool.open("rb") if index else None
        try:
            for key, start, length, ok in index:
                assert src is not None
                # A request recorded twice (never expected) is written once.
                if key == previous:
                    continue
                previous = key
                src.seek(start)
                data = src.read(length)
                (out if ok else err).write(data)
                slot = 0 if ok else 2
                counts[slot] += 1
                counts[slot + 1] += length
        finally:
            if src is not None:
                src.close()
        for written in {out, err}:
            written.flush()
            os.fsync(written.fileno())
    return WrittenResults(*counts)
