"""Merging a job's results into its outbox folder: ordering and accounting (DESIGN §4).

`merge_results` joins the provider's result files (in any order, over several
rounds) back onto the input file's order without holding either in memory: a
scratch index on disk (`store.scratch.MergeIndex`) maps each custom_id to its input position and to
where its best answer sits (file, byte offset, length); one ordered pass then
copies answer lines by offset. Memory stays flat whatever the file sizes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from batchd import chaos, jsonl
from batchd.durable_files import fsync_dir, open_temp, temp_name
from batchd.jsonl import strip_eol
from batchd.store.scratch import AnswerRow, MergeIndex
from batchd.upload_copy import iter_custom_ids

__all__ = [
    "UNANSWERED_CODES",
    "MergeResult",
    "merge_results",
    "truncated_tail",
]

log = structlog.get_logger("batchd.results")

#: Why a request got no answer; the `error.code` of its synthesized line in errors.jsonl.
UNANSWERED_CODES: Mapping[str, str] = {
    "batch_expired": "the batch's completion window ended before this request was answered",
    "batch_cancelled": "the batch was cancelled before this request was answered",
    "batch_failed": "the provider failed the batch before this request was answered",
    "not_submitted": "this request was never submitted to the provider",
    "not_returned": "the provider's batch ended without returning a result for this request",
}

# Individual log events per kind of dropped answer; the summary event counts them all.
_LOG_CAP = 100
_ROWS_PER_BATCH = 50_000


@dataclass(frozen=True)
class MergeResult:
    """What `merge_results` wrote."""

    #: requests in the input
    total: int
    #: lines written to output.jsonl
    completed: int
    #: lines written to errors.jsonl
    failed: int
    #: sums of the integer fields of `response.body.usage` over output.jsonl's lines
    usage: dict[str, int] = field(default_factory=dict)
    #: second (and later) successes for one custom_id: dropped
    duplicates: int = 0
    #: answers whose custom_id is not in the input, or that carry no readable custom_id: dropped
    unknown: int = 0
    #: requests the provider never answered: synthesized lines in errors.jsonl (part of `failed`)
    unanswered: int = 0


def _success(answer: Mapping[str, Any]) -> bool:
    response = answer.get("response")
    if not isinstance(response, dict):
        return False
    status = response.get("status_code")
    return isinstance(status, int) and not isinstance(status, bool) and 200 <= status < 300


def _usage_of(answer: Mapping[str, Any]) -> str | None:
    """The integer fields of `response.body.usage`, as compact JSON; None when there are none."""
    response = answer.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    ints = {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}
    return jsonl.dumps(ints).decode() if ints else None


@dataclass
class _Unreadable:
    count: int = 0


def _scan_answers(answers: Sequence[Path], unreadable: _Unreadable) -> Iterator[AnswerRow]:
    """One row per non-blank answer line, in file order then line order.

    The hot loop of a merge (one pass over up to gigabytes): it parses each raw
    line once and does little else in Python.
    """
    for index, path in enumerate(answers):
        offset = 0
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                start, offset = offset, offset + len(raw)
                try:
                    answer = jsonl.loads(raw)
                except (ValueError, RecursionError):
                    if not raw.strip():
                        continue  # a blank line
                    answer = None
                custom_id = answer.get("custom_id") if isinstance(answer, dict) else None
                if not isinstance(custom_id, str):
                    unreadable.count += 1
                    if unreadable.count <= _LOG_CAP:
                        log.warning("results.unreadable_answer", file=str(path), line=number)
                    continue
                assert isinstance(answer, dict)
                ok = _success(answer)
                usage = _usage_of(answer) if ok else None
                # Stored negative: the length with its one "\n", copied as it is in one read and write.
                plain = raw.endswith(b"\n") and not raw.endswith(b"\r\n")
                length = -len(raw) if plain else len(strip_eol(raw))
                yield custom_id, index, start, length, int(ok), usage


def _count_dropped(index: MergeIndex) -> tuple[int, int]:
    """Log and count the answers that will be dropped: (duplicates, unknown)."""
    dropped = index.dropped(cap=_LOG_CAP)
    for custom_id, extra in dropped.duplicate_ids:
        log.warning("results.duplicate_answer", custom_id=custom_id, dropped=extra)
    for custom_id in dropped.unknown_ids:
        log.warning("results.unknown_answer", custom_id=custom_id)
    return dropped.duplicates, dropped.unknown


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(f"answer file shrank while merging (wanted {length} bytes at {offset})")
        data += more
    return data


def _unanswered_line(custom_id: str, code: str) -> bytes:
    line = {
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": UNANSWERED_CODES[code]},
    }
    return json.dumps(line, ensure_ascii=False).encode("utf-8")


class _AtomicFile:
    """A file written under a hidden temp name and renamed into place by `commit`.

    Opened on first write, so a file with no line is never created. The temp
    name is fixed, so a merge repeated after a crash overwrites its own leftover.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.temp = temp_name(dest)
        self.stream: IO[bytes] | None = None
        self.lines = 0

    def open(self) -> IO[bytes]:
        if self.stream is None:
            chaos.file_fault(self.temp)
            # Exactly 0640 (group batchd reads the outbox), never through a planted name.
            self.stream = open_temp(self.temp)
        return self.stream

    def write_line(self, content: bytes) -> None:
        stream = self.open()
        stream.write(content)
        stream.write(b"\n")
        self.lines += 1

    def write_raw(self, line: bytes) -> None:
        """A line that already ends in its one newline."""
        self.open().write(line)
        self.lines += 1

    def finish(self) -> bool:
        """Flush and fsync the temp file; False when nothing was written."""
        if self.stream is None:
            return False
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        return True

    def commit(self) -> None:
        os.replace(self.temp, self.dest)

    def discard(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.temp.unlink(missing_ok=True)


def _write_outputs(
    index: MergeIndex, answers: Sequence[Path], folder: Path, code: str
) -> tuple[int, int, int, dict[str, int]]:
    """Write both files in input order; return (completed, failed, unanswered, usage)."""
    output = _AtomicFile(folder / "output.jsonl")
    errors = _AtomicFile(folder / "errors.jsonl")
    fds = [os.open(path, os.O_RDONLY) for path in answers]
    usage: dict[str, int] = {}
    unanswered = 0
    # Usage strings are counted, not parsed, in the loop: many answers share one (same token
    # counts), and each distinct string is parsed once at the end.
    usage_counts: Counter[str] = Counter()
    try:
        write_ok = output.open().write
        for batch in index.ordered(batch=_ROWS_PER_BATCH):
            for custom_id, file, offset, length, ok, usage_json in batch:
                if file is None:
                    errors.write_line(_unanswered_line(custom_id, code))
                    unanswered += 1
                elif ok:
                    # Stored negative: the length with its "\n", copied as it is in one write.
                    write_ok(
                        _pread(fds[file], offset, -length) if length < 0 else _pread(fds[file], offset, length) + b"\n"
                    )
                    output.lines += 1
                    if usage_json is not None:
                        usage_counts[usage_json] += 1
                elif length < 0:
                    errors.write_raw(_pread(fds[file], offset, -length))
                else:
                    errors.write_line(_pread(fds[file], offset, length))
        for usage_json, times in usage_counts.items():
            for key, value in jsonl.loads(usage_json).items():
                usage[key] = usage.get(key, 0) + value * times
        # output.jsonl exists even when empty; errors.jsonl only when it has a line.
        output.open()
        output.finish()
        has_errors = errors.finish()
        output.commit()
        if has_errors:
            errors.commit()
        else:
            # An earlier merge of this job (a round before a follow-up) may have left one.
            errors.dest.unlink(missing_ok=True)
    except BaseException:
        output.discard()
        errors.discard()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    fsync_dir(folder)
    return output.lines, errors.lines, unanswered, usage


def merge_results(
    *,
    input_path: Path,
    answers: Sequence[Path],
    folder: Path,
    unanswered_code: str,
    scratch_dir: Path,
) -> MergeResult:
    """Write ``folder/output.jsonl`` and, when needed, ``folder/errors.jsonl`` in input order.

    `input_path` is the upload copy (one request per line; it defines the
    order). `answers` are the downloaded result files, output and error files
    of every remote batch, oldest round first. For each custom_id the first
    2xx answer wins; else the latest error answer; else a synthesized line
    with `unanswered_code` (a key of `UNANSWERED_CODES`). A second success is
    dropped and logged (``results.duplicate_answer``), as are answers for
    unknown custom_ids (``results.unknown_answer``). Answer lines are copied
    byte for byte, each ended by ``\\n``. Both files appear under their final
    names only once complete. Memory does not grow with the file sizes; the
    scratch index lives in `scratch_dir` and is removed afterwards.
    """
    if unanswered_code not in UNANSWERED_CODES:
        raise ValueError(f"unanswered_code must be one of {sorted(UNANSWERED_CODES)}, got {unanswered_code!r}")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".merge-", suffix=".sqlite", dir=scratch_dir)
    os.close(fd)
    index_path = Path(name)
    try:
        unreadable = _Unreadable()
        with MergeIndex(index_path) as index:
            total = index.fill(iter_custom_ids(input_path), _scan_answers(answers, unreadable))
            duplicates, unknown = _count_dropped(index)
            completed, failed, unanswered, usage = _write_outputs(index, answers, folder, unanswered_code)
    finally:
        # Our own scratch file, never a user's.
        index_path.unlink(missing_ok=True)
    result = MergeResult(
        total=total,
        completed=completed,
        failed=failed,
        usage=usage,
        duplicates=duplicates,
        unknown=unknown + unreadable.count,
        unanswered=unanswered,
    )
    log.info(
        "results.merged",
        folder=str(folder),
        total=result.total,
        completed=result.completed,
        failed=result.failed,
        duplicates=result.duplicates,
        unknown=result.unknown,
        unanswered=result.unanswered,
    )
    return result


def truncated_tail(path: Path, *, window: int = 1 << 20) -> bool:
    """Whether a downloaded JSONL file ends inside a line that is not valid JSON (cut off).

    A length check catches most cut bodies; this catches the rest (a body sent
    without Content-Length, or a server that announced the short length).
    Only the last `window` bytes are read.
    """
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as stream:
        stream.seek(max(0, size - window))
        tail = stream.read()
    if tail.endswith(b"\n"):
        return False
    last = tail.rsplit(b"\n", 1)[-1]
    try:
        json.loads(last)
    except ValueError:
        return True
    return False
