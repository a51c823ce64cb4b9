"""Merging a job's results into its outbox folder: ordering and accounting (DESIGN §4).

`merge_results` joins the provider's result files (in any order, over several
rounds) back onto the input file's order without holding either in memory: a
hash join on disk (merge_work.py) finds each request's input position and where
its best answer sits; the answer lines are then copied by offset, in input
order. Memory stays flat whatever the file sizes. A big merge shares the work
with a helper process (merge_helper.py), on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import structlog

from batchd import chaos, merge_helper
from batchd.durable_files import fsync_dir, open_temp, temp_name
from batchd.merge_counts import Joined, Scanned
from batchd.merge_helper import Helper, HelperFailed
from batchd.merge_plan import UNANSWERED_CODES, Plan, plan_merge
from batchd.merge_work import Worker, read_exactly, starts

__all__ = [
    "UNANSWERED_CODES",
    "MergeResult",
    "merge_results",
    "truncated_tail",
]

log = structlog.get_logger("batchd.results")

# Individual log events per kind of dropped answer; the summary event counts them all.
_LOG_CAP = 100

# Every answer line a merge copies is read through this name (a test puts a failing read here).
_pread = read_exactly


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


class _AtomicFile:
    """A file written under a hidden temp name and renamed into place by `commit`.

    The temp name is fixed, so a merge repeated after a crash overwrites its own leftover.
    Written by descriptor (`os.pwrite`), by this process and the merge's helper.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.temp = temp_name(dest)
        self.stream: IO[bytes] | None = None

    def open(self) -> int:
        chaos.file_fault(self.temp)
        # Exactly 0640 (group batchd reads the outbox), never through a planted name.
        self.stream = open_temp(self.temp)
        return self.stream.fileno()

    def finish(self) -> None:
        assert self.stream is not None
        os.fsync(self.stream.fileno())
        self.stream.close()

    def commit(self) -> None:
        os.replace(self.temp, self.dest)

    def discard(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.temp.unlink(missing_ok=True)


def _log_unreadable(plan: Plan, scanned: Scanned) -> None:
    """Log the first unreadable answer lines, by file and line number (counted now: they are rare)."""
    counted: dict[int, tuple[int, int]] = {}  # file -> (offset counted to, line ends before it)
    for position in scanned.unreadable_at:
        file = bisect_right(plan.bases, position) - 1
        offset = position - plan.bases[file]
        done, lines = counted.get(file, (0, 0))
        with open(plan.answers[file], "rb") as stream:
            stream.seek(done)
            while done < offset:
                block = stream.read(min(1 << 20, offset - done))
                lines += block.count(b"\n")
                done += len(block)
        counted[file] = (done, lines)
        log.warning("results.unreadable_answer", file=plan.answers[file], line=lines + 1)


def _log_dropped(joined: Joined) -> None:
    for custom_id, extra in joined.duplicate_ids:
        log.warning("results.duplicate_answer", custom_id=custom_id, dropped=extra)
    for _, custom_id in joined.unknown_at:
        log.warning("results.unknown_answer", custom_id=custom_id)


def _run(plan: Plan, output: _AtomicFile, errors: _AtomicFile, helper_wanted: bool) -> tuple[Scanned, Joined]:
    """The three phases of the merge, shared with a helper process when `helper_wanted`."""
    fds = [output.open(), errors.open()]
    worker = Worker(plan, "main", _pread)
    helper = Helper(plan, fds) if helper_wanted else None
    done = False
    try:
        scanned = worker.scan()
        if helper is not None:
            scanned.merge(Scanned.from_tuple(helper.answer()), plan.cap)
        total = scanned.total
        assert total is not None
        if helper is not None:
            helper.send("join", total)
        joined = worker.join(total)
        if helper is not None:
            joined.merge(Joined.from_tuple(helper.answer()), plan.cap)
        sections = (fds[0], starts(joined.output_bytes)), (fds[1], starts(joined.error_bytes))
        if helper is not None:
            helper.send("write", total, *sections)
        worker.write(total, *sections)
        if helper is not None:
            helper.answer()
        done = True
    finally:
        worker.close()
        if helper is not None:
            helper.close(done=done)
    return scanned, joined


def _merge(
    input_path: Path,
    answers: Sequence[Path],
    folder: Path,
    code: str,
    scratch_dir: Path,
    key: str,
    unrun: Collection[Path],
    *,
    helper: bool,
) -> tuple[Plan, Scanned, Joined]:
    """One attempt at writing the outbox files, in a scratch folder of its own."""
    work = Path(tempfile.mkdtemp(prefix=".merge-", dir=scratch_dir))
    output = _AtomicFile(folder / "output.jsonl")
    errors = _AtomicFile(folder / "errors.jsonl")
    try:
        plan = plan_merge(work, input_path, answers, code, cap=_LOG_CAP, key=key, unrun=unrun)
        scanned, joined = _run(plan, output, errors, helper)
        output.finish()
        errors.finish()
        output.commit()
        # errors.jsonl only when it has a line.
        if joined.failed:
            errors.commit()
        else:
            errors.temp.unlink()
            # An earlier merge of this job (a round before a follow-up) may have left one.
            errors.dest.unlink(missing_ok=True)
    except BaseException:
        output.discard()
        errors.discard()
        raise
    finally:
        # Our own scratch folder, never a user's.
        shutil.rmtree(work, ignore_errors=True)
    fsync_dir(folder)
    return plan, scanned, joined


def merge_results(
    *,
    input_path: Path,
    answers: Sequence[Path],
    folder: Path,
    unanswered_code: str,
    scratch_dir: Path,
    key: str = "custom_id",
    unrun: Collection[Path] = (),
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
    join's files live in a private folder in `scratch_dir`, removed afterwards.
    From `merge_helper.HELPER_FROM_BYTES` of input and answers, with two CPUs,
    a helper process shares the work (merge_helper.py); if it fails, the merge
    is done again without it (``results.helper_failed``). `key` is the field that names a
    request (request_rules.id_key): "key" for Gemini, whose answers it then reads as Gemini's.
    `unrun`: answer files of cancelled batches (the user's cancel, or batchd's of a stuck batch),
    in which an Anthropic `canceled` result counts as no answer (the request gets the line with `unanswered_code`).
    """
    if unanswered_code not in UNANSWERED_CODES:
        raise ValueError(f"unanswered_code must be one of {sorted(UNANSWERED_CODES)}, got {unanswered_code!r}")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    size = input_path.stat().st_size + sum(path.stat().st_size for path in answers)
    merge = partial(_merge, input_path, answers, folder, unanswered_code, scratch_dir, key, unrun)
    try:
        plan, scanned, joined = merge(helper=merge_helper.helper_wanted(size))
    except HelperFailed as exc:
        log.warning("results.helper_failed", folder=str(folder), error=str(exc))
        plan, scanned, joined = merge(helper=False)
    # Logged once the files are written: a merge done again would have logged them twice.
    _log_unreadable(plan, scanned)
    _log_dropped(joined)
    scanned.usage.merge(joined.dropped_usage)
    assert scanned.total is not None
    result = MergeResult(
        total=scanned.total,
        completed=joined.completed,
        failed=joined.failed,
        usage=scanned.usage.totals(),
        duplicates=joined.duplicates,
        unknown=joined.unknown + scanned.unreadable,
        unanswered=joined.unanswered,
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
