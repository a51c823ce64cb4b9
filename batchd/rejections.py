"""Rejected submissions in `inbox/rejected/` (DESIGN §3): why, their names, their reports, the move.

A rejected file goes, byte-identical, to `rejected/NAME.EXT` (if taken: `NAME.<short id>.EXT`)
with its report `<that name>.errors.txt` beside it. A name too long for the filesystem once
`.errors.txt` is added keeps its extension and the short id and loses the end of its stem.
`rejected/` is batchd's own folder (2750: group batchd reads the reports, nobody plants
anything in it), checked before every write; reports are created O_EXCL|O_NOFOLLOW.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from batchd.durable_files import temp_name, write_atomic
from batchd.models import Job
from batchd.outbox import SHORT_ID_LENGTH
from batchd.safe_fs import NAME_MAX, create_new, make_dirs
from batchd.validation import Problem, Report, format_report

log = structlog.get_logger("batchd.inbox")

__all__ = [
    "REPORT_SUFFIX",
    "Rejection",
    "finish",
    "from_report",
    "on_line",
    "rejected_dir",
    "rejected_names",
    "reserve",
    "whole_file",
]

REPORT_SUFFIX = ".errors.txt"
#: What a rejected name must leave room for: its report's suffix, and the temp name the
#: report is rewritten through (".NAME.errors.txt.tmp").
_ROOM = len(temp_name(Path("x" + REPORT_SUFFIX)).name) - 1


class Rejection(Exception):
    """A submission that will not be taken; carries the report text."""

    def __init__(self, reason: str, report: str, details: Report) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report
        #: the problems, for `batchd validate --json`
        self.details = details


def on_line(source: str, line: int | None, rule: str, message: str) -> Rejection:
    """A rejection for one problem (in a spec, or about the file as a whole when line is None)."""
    problem = Problem(line, rule, message)
    report = Report(source=source, problems=(problem,), problem_count=1, request_count=0, endpoint=None, size_bytes=0)
    return Rejection(str(problem), format_report(report), report)


def whole_file(source: str, rule: str, message: str) -> Rejection:
    """A rejection for a problem with the file as a whole."""
    return on_line(source, None, rule, message)


def from_report(report: Report, *, prefix: str = "") -> Rejection:
    """A rejection naming the first problems validation found (the report lists up to 100)."""
    first = "; ".join(str(p) for p in report.problems[:3])
    more = f" (+{report.problem_count - 3} more)" if report.problem_count > 3 else ""
    return Rejection(f"{prefix}{first}{more}", (prefix + "\n\n" if prefix else "") + format_report(report), report)


def rejected_dir(inbox_dir: Path) -> Path:
    """`inbox/rejected/`, checked to be batchd's own folder (an impostor is moved aside)."""
    return make_dirs(inbox_dir, ["rejected"])


def _cut(text: str, size: int) -> str:
    """`text` cut to at most `size` UTF-8 bytes, at a character boundary."""
    return text.encode()[: max(0, size)].decode("utf-8", "ignore")


def rejected_names(source: str, job_id: str) -> list[str]:
    """The names a rejected file may take, in order: its own name, then one with the short job id."""
    short = job_id[:SHORT_ID_LENGTH]
    stem, dot, ext = source.rpartition(".")
    own = f"{stem}.{short}.{ext}" if dot else f"{source}.{short}"
    names = [source, own]
    fitting = [n for n in names if len(n.encode()) + _ROOM <= NAME_MAX]
    if own in fitting:
        return fitting
    # Too long: keep the short id and a short extension, cut the stem.
    base, tail = (stem, f".{short}.{ext}") if dot and len(ext.encode()) <= 32 else (source, f".{short}")
    return [*fitting, _cut(base, NAME_MAX - _ROOM - len(tail.encode())) + tail]


def reserve(inbox_dir: Path, source: str, job_id: str, report: str) -> tuple[Path, Path]:
    """Pick the rejected file's name and hold it by creating its report; return (file, report).

    The report is created with O_EXCL before the rejection is committed. A check for a free
    name alone is not enough: two daemons sharing the inbox that reject files of the same
    name at once would both pick it, and the second rename would silently replace the first
    file (os.rename overwrites).
    """
    folder = rejected_dir(inbox_dir)
    names = rejected_names(source, job_id)
    for i, name in enumerate(names):
        mine = i == len(names) - 1
        target = folder / name
        report_path = folder / f"{name}{REPORT_SUFFIX}"
        if not mine and os.path.lexists(target):
            continue
        try:
            fd = create_new(report_path)
        except FileExistsError:
            if not mine:
                continue
            # The name carries this job's id: a report left by an earlier try of this very
            # job (a crash before its commit). Ours to replace.
            write_atomic(report_path, report.encode("utf-8"))
            return target, report_path
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(report)
        return target, report_path
    raise AssertionError("unreachable: the job's own name is always available")


def finish(inbox_dir: Path, job: Job, report: str) -> None:
    """Write the report, then move the claimed file (byte-identical) beside it.

    Idempotent: a claimed file already moved (by this daemon before a crash, or by another
    daemon that rejected the same claim) is left alone.
    """
    assert job.rejected_path and job.report_path and job.claimed_path
    rejected_dir(inbox_dir)
    write_atomic(Path(job.report_path), report.encode("utf-8"))
    if not os.path.lexists(job.claimed_path):
        return
    if os.path.lexists(job.rejected_path):
        log.warning("inbox.rejected_name_taken", job_id=job.id, path=job.rejected_path, claimed=job.claimed_path)
        return
    os.rename(job.claimed_path, job.rejected_path)
