"""The inbox (DESIGN §3): what is a submission, claiming it, specs, rejections.

Everything here is synchronous filesystem work; the daemon runs it in worker
threads. Nothing is ever deleted: an accepted file is renamed into
`inbox/.batchd/claimed/<job id>/`, a rejected one into `inbox/rejected/`.

Crash safety: the claim (a rename into a folder named after the new job id)
happens before anything else, so a crash after it leaves a claimed folder
without a job row, which `recover()` takes again at start-up.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from batchd.config import Settings
from batchd.crashpoints import crashpoint
from batchd.durable_files import write_atomic
from batchd.models import Job, JobState
from batchd.outbox import outbox_name
from batchd.store import Hold, NewJob, RejectedJob, Store
from batchd.upload_copy import write_upload_copy
from batchd.validation import Problem, Report, format_report, validate_file
from batchd.webhooks import build_event, webhook_url_refusal

log = structlog.get_logger("batchd.inbox")

SPEC_KEYS = frozenset({"input", "completion_window", "model", "webhook_url", "metadata"})
#: A spec is a small JSON document; anything bigger is a mistake, not a spec.
MAX_SPEC_BYTES = 1_000_000
#: The upload copy, beside the claimed file. Hidden on purpose: a submission's name never
#: starts with "." (such names are ignored), so a dropped `upload.jsonl` is never overwritten
#: by its own normalised copy (which would lose the user's bytes).
UPLOAD_NAME = ".upload.jsonl"


def job_files_dir(settings: Settings, job_id: str) -> Path:
    """A job's shard, follow-up and retry files: beside the inbox (a filesystem every daemon
    sharing the inbox reaches), apart from the claim folders that recovery scans."""
    return settings.inbox_dir / ".batchd" / "work" / job_id


class Kind(StrEnum):
    """How the inbox treats a directory entry."""

    IGNORE = "ignore"
    REQUESTS = "requests"
    SPEC = "spec"
    #: taken only to be rejected (a symlink, another extension)
    BAD = "bad"


def is_ignored_name(name: str) -> bool:
    """Names the producer protocol keeps out of batchd's way (DESIGN §3)."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


def classify(path: Path) -> Kind:
    """What an entry directly inside the inbox is, without following symlinks."""
    if is_ignored_name(path.name):
        return Kind.IGNORE
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return Kind.IGNORE
    if stat.S_ISDIR(mode):
        return Kind.IGNORE
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        return Kind.BAD
    if path.suffix == ".jsonl":
        return Kind.REQUESTS
    if path.suffix == ".json":
        return Kind.SPEC
    return Kind.BAD


@dataclass(frozen=True)
class Spec:
    """A parsed `NAME.json` spec."""

    input: str
    completion_window: str | None = None
    model: str | None = None
    webhook_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Rejection(Exception):
    """A submission that will not be taken; carries the report text."""

    def __init__(self, reason: str, report: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report


def _on_line(source: str, line: int | None, rule: str, message: str) -> Rejection:
    """A rejection for one problem (in a spec, or about the file as a whole when line is None)."""
    problem = Problem(line, rule, message)
    report = Report(source=source, problems=(problem,), problem_count=1, request_count=0, endpoint=None, size_bytes=0)
    return Rejection(str(problem), format_report(report))


def _whole_file(source: str, rule: str, message: str) -> Rejection:
    return _on_line(source, None, rule, message)


def _from_report(report: Report, *, prefix: str = "") -> Rejection:
    first = "; ".join(str(p) for p in report.problems[:3])
    more = f" (+{report.problem_count - 3} more)" if report.problem_count > 3 else ""
    return Rejection(f"{prefix}{first}{more}", (prefix + "\n\n" if prefix else "") + format_report(report))


class Inbox:
    """Claims, checks and records submissions; rejects what cannot be taken."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        store: Store,
        *,
        owner: Callable[[], Hold | None] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        #: the hold on a job this process creates (a daemon holds what it takes; None: nobody)
        self._owner = owner or (lambda: None)

    @property
    def dir(self) -> Path:
        return self._settings().inbox_dir

    @property
    def claimed_root(self) -> Path:
        return self.dir / ".batchd" / "claimed"

    @property
    def rejected_dir(self) -> Path:
        return self.dir / "rejected"

    def ensure_folders(self) -> None:
        for folder in (self.dir, self.claimed_root, self.rejected_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def candidates(self) -> list[Path]:
        """Entries of the inbox that are submissions (or must be rejected), oldest name first."""
        found = []
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if classify(path) is not Kind.IGNORE:
                        found.append(path)
        except FileNotFoundError:
            # The folder was removed under a running daemon: nothing to take until it is back
            # (the watcher watches it again then); raising here would stop intake.
            log.warning("inbox.missing", inbox=str(self.dir))
        return sorted(found)

    # ------------------------------------------------------------ taking

    def take(self, path: Path) -> Job | None:
        """Claim `path` and turn it into a job (or a rejection). None if it is gone or ignored."""
        if classify(path) is Kind.IGNORE:
            return None
        job_id = uuid.uuid4().hex
        claim_dir = self.claimed_root / job_id
        claim_dir.mkdir(parents=True)
        claimed = claim_dir / path.name
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            # Another scan or another daemon took it first.
            claim_dir.rmdir()
            return None
        log.info("inbox.claimed", job_id=job_id, source=path.name)
        crashpoint("after_claim")
        return self._process(job_id, claimed)

    def recover(self) -> list[Job]:
        """Finish what a crash interrupted: claimed files without a job, half-done rejections."""
        jobs: list[Job] = []
        if not self.claimed_root.is_dir():
            return jobs
        # Claim folders are kept for ever, so read every job id once rather than ask per folder.
        known = self._store.jobs.ids()
        for claim_dir in sorted(self.claimed_root.iterdir()):
            if claim_dir.name in known or not claim_dir.is_dir():
                continue
            # Whatever was claimed counts, whatever its type (a symlink or a FIFO is claimed only to
            # be rejected); only folders (a spec's data/) and hidden names (our upload copy and
            # temp files) are ours.
            submitted = [
                p for p in sorted(claim_dir.iterdir())
                if not p.name.startswith(".") and not stat.S_ISDIR(p.lstat().st_mode)
            ]  # fmt: skip
            if not submitted:
                # Our own claim folder, from a claim whose rename never happened. Anything
                # left inside is kept: a start-up must not fail on it, nor delete it.
                try:
                    claim_dir.rmdir()
                except OSError as exc:
                    log.warning("inbox.claim_folder_kept", path=str(claim_dir), error=str(exc))
                continue
            log.warning("inbox.recovering_claim", job_id=claim_dir.name, source=submitted[0].name)
            jobs.append(self._process(claim_dir.name, submitted[0]))
        for job in self._store.jobs.select([JobState.REJECTED]):
            if job.claimed_path and job.rejected_path and os.path.lexists(job.claimed_path):
                self._finish_rejection(job, self._analyse_for_report(job))
        return jobs

    def _analyse_for_report(self, job: Job) -> str:
        assert job.claimed_path is not None
        try:
            self._check(Path(job.claimed_path), self._settings())
        except Rejection as rejection:
            return rejection.report
        return f"{job.source}: {job.reason}\n"

    def _process(self, job_id: str, claimed: Path) -> Job:
        try:
            return self._accept(job_id, claimed)
        except Rejection as rejection:
            return self._reject(job_id, claimed, rejection)

    def _check(self, claimed: Path, settings: Settings) -> tuple[Report, Spec | None, Path]:
        """Every rule a submission must pass; raises Rejection naming the first problems."""
        source = claimed.name
        kind = classify(claimed)
        if claimed.is_symlink():
            raise _whole_file(source, "symlink", "symlinks are not followed; drop the file itself")
        if not stat.S_ISREG(claimed.lstat().st_mode):
            # A FIFO or a device is never opened: reading one could block intake forever.
            raise _whole_file(source, "file_type", "not a regular file; drop a regular file")
        if kind is Kind.BAD:
            raise _whole_file(source, "extension", "only NAME.jsonl (requests) and NAME.json (a spec) are taken")
        limits = settings.provider.validation_limits
        spec: Spec | None = None
        data = claimed
        if kind is Kind.SPEC:
            spec = self._read_spec(claimed, settings)
            data = self._spec_data(claimed, spec)
            report = validate_file(data, source=spec.input, limits=limits)
            if not report.ok:
                raise _from_report(report, prefix=f"{source}: its input {spec.input} is not valid")
        else:
            report = validate_file(claimed, source=source, limits=limits)
            if not report.ok:
                raise _from_report(report)
        return report, spec, data

    def _accept(self, job_id: str, claimed: Path) -> Job:
        settings = self._settings()
        source = claimed.name
        report, spec, data = self._check(claimed, settings)
        if spec is not None and data.parent != claimed.parent / "data":
            (claimed.parent / "data").mkdir(exist_ok=True)
            moved = claimed.parent / "data" / data.name
            try:
                os.rename(data, moved)
            except FileNotFoundError:
                # Gone since it was checked: another spec naming the same file claimed it first
                # (takes run in parallel). A rejection, not an error that leaves this spec
                # claimed without a job until the next start.
                (claimed.parent / "data").rmdir()
                raise _whole_file(source, "input", f"{spec.input} does not exist (any more)") from None
            data = moved
        upload = claimed.parent / UPLOAD_NAME
        copy = write_upload_copy(data, upload, model=spec.model if spec else None)
        new = NewJob(
            id=job_id,
            name=outbox_name(source),
            source=source,
            provider=settings.provider.kind,
            endpoint=report.endpoint,
            claimed_path=str(data),
            spec_path=str(claimed) if spec else None,
            upload_path=str(upload),
            sha256=copy.sha256,
            size_bytes=copy.size_bytes,
            request_count=copy.request_count,
            completion_window=(spec.completion_window if spec else None) or settings.submit.completion_window,
            # The spec's override, else the one model every request names (for cost estimates).
            model=(spec.model if spec else None) or report.model,
            webhook_url=spec.webhook_url if spec else None,
            metadata=dict(spec.metadata) if spec else {},
            hold=self._owner(),
        )
        job = self._store.jobs.insert(new)
        log.info("inbox.accepted", job_id=job_id, source=source, requests=copy.request_count)
        return job

    # ------------------------------------------------------------ specs

    def _read_spec(self, claimed: Path, settings: Settings) -> Spec:
        source = claimed.name
        if claimed.stat().st_size > MAX_SPEC_BYTES:
            raise _whole_file(source, "spec", f"a spec is at most {MAX_SPEC_BYTES} bytes")
        try:
            raw = json.loads(claimed.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise _whole_file(source, "encoding", "a spec must be UTF-8") from None
        except json.JSONDecodeError as exc:
            raise _on_line(source, exc.lineno, "json", f"not valid JSON ({exc.msg})") from None
        # Anything json.loads raises is the spec's fault (too deeply nested, an integer over
        # Python's digit limit); escaping as an exception would stop intake, and recover()
        # would meet the same claimed spec at every start.
        except RecursionError:
            raise _whole_file(source, "json", "not valid JSON (nested too deeply)") from None
        except ValueError as exc:
            raise _whole_file(source, "json", f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _whole_file(source, "spec", "a spec must be a JSON object")
        unknown = sorted(set(raw) - SPEC_KEYS)
        if unknown:
            raise _whole_file(source, "spec", f"unknown key(s) {', '.join(unknown)}; allowed: {sorted(SPEC_KEYS)}")
        data_path = raw.get("input")
        if not isinstance(data_path, str) or not data_path:
            raise _whole_file(source, "input", "`input` (the JSONL file, relative to the inbox) is required")
        window = raw.get("completion_window")
        # isascii: str.isdigit() also accepts digits such as "²" that no provider reads as a number.
        if window is not None and (
            not isinstance(window, str)
            or not (window[:-1].isascii() and window[:-1].isdigit())
            or window[-1:] not in ("h", "d")
        ):
            raise _whole_file(source, "completion_window", 'must look like "24h"')
        model = raw.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise _whole_file(source, "model", "must be a non-empty string")
        meta = raw.get("metadata", {})
        if not isinstance(meta, dict):
            raise _whole_file(source, "metadata", "must be a JSON object")
        url = raw.get("webhook_url")
        if url is not None and not isinstance(url, str):
            raise _whole_file(source, "webhook_url", f"{url!r} is not a URL string")
        refused = None if url is None else webhook_url_refusal(url, settings.inbox.allow_webhook_urls)
        if refused is not None:
            raise _whole_file(source, "webhook_url", refused)
        return Spec(input=data_path, completion_window=window, model=model, webhook_url=url, metadata=meta)

    def _spec_data(self, claimed: Path, spec: Spec) -> Path:
        """The spec's data file: inside a sub-folder of the inbox, no `..`, no symlink, existing."""
        source = claimed.name
        # After a crash the data may already sit in the claim folder.
        already = claimed.parent / "data" / PurePosixPath(spec.input).name
        if already.is_file() and not already.is_symlink():
            return already
        rel = PurePosixPath(spec.input)
        if rel.is_absolute() or "\\" in spec.input:
            raise _whole_file(source, "input", "must be a path relative to the inbox, not absolute")
        if any(part in ("..", ".") for part in rel.parts) or len(rel.parts) < 2:
            raise _whole_file(source, "input", "must name a file inside a sub-folder of the inbox, without `..`")
        if rel.parts[0] in (".batchd", "rejected") or any(is_ignored_name(p) for p in rel.parts):
            raise _whole_file(source, "input", f"{spec.input!r} is in a folder batchd does not take from")
        current = self.dir
        for part in rel.parts:
            current = current / part
            try:
                mode = current.lstat().st_mode
            except FileNotFoundError:
                raise _whole_file(source, "input", f"{spec.input} does not exist") from None
            if stat.S_ISLNK(mode):
                raise _whole_file(source, "input", f"{spec.input}: symlinks are not followed")
        if not stat.S_ISREG(current.lstat().st_mode):
            raise _whole_file(source, "input", f"{spec.input} is not a regular file")
        if current.suffix != ".jsonl":
            raise _whole_file(source, "input", f"{spec.input} must be a .jsonl file")
        return current

    # ------------------------------------------------------------ rejecting

    def _reject(self, job_id: str, claimed: Path, rejection: Rejection) -> Job:
        settings = self._settings()
        source = claimed.name
        target, report_path = self._reserve_rejected_name(source, job_id, rejection.report)
        now = self._store.now()
        data = {
            "id": job_id,
            "name": outbox_name(source),
            "status": "rejected",
            "source": source,
            "report_file": str(report_path),
            "reason": rejection.reason,
        }
        event = build_event(settings, "batch.rejected", data, now=now, job_webhook_url=None)
        try:
            rejected = RejectedJob(
                id=job_id,
                name=outbox_name(source),
                source=source,
                provider=settings.provider.kind,
                claimed_path=str(claimed),
                rejected_path=str(target),
                report_path=str(report_path),
                reason=rejection.reason,
                finished_at=now,
            )
            job = self._store.jobs.insert_rejected(rejected, [event])
        except BaseException:
            # Not committed: give the name back (the report is ours, written a moment ago), so
            # that the retry after recover() does not leave a report without its file.
            report_path.unlink(missing_ok=True)
            raise
        log.warning("inbox.rejected", job_id=job_id, source=source, reason=rejection.reason)
        self._finish_rejection(job, rejection.report)
        return job

    def _reserve_rejected_name(self, source: str, job_id: str, report: str) -> tuple[Path, Path]:
        """Pick `rejected/NAME.EXT` (if taken: `NAME.<short id>.EXT`) and hold it by creating its report.

        The report is created with O_EXCL before the rejection is committed. A check for a
        free name alone is not enough: two daemons sharing the inbox that reject files of the
        same name at once would both pick it, and the second rename would silently replace
        the first file (os.rename overwrites).
        """
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        stem, dot, ext = source.rpartition(".")
        own = f"{stem}.{job_id[:8]}.{ext}" if dot else f"{source}.{job_id[:8]}"
        for name in (source, own):
            target = self.rejected_dir / name
            report_path = self.rejected_dir / f"{name}.errors.txt"
            if name == source and os.path.lexists(target):
                continue
            try:
                fd = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if name == source:
                    continue
                # The name carries this job's id: a report left by an earlier try of this
                # very job (a crash before its commit). Ours to overwrite.
                fd = os.open(report_path, os.O_WRONLY | os.O_TRUNC)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(report)
            return target, report_path
        raise AssertionError("unreachable: the job's own name is always available")

    def _finish_rejection(self, job: Job, report: str) -> None:
        """Write the report, then move the file (byte-identical) beside it."""
        assert job.rejected_path and job.report_path and job.claimed_path
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(job.report_path), report.encode("utf-8"))
        os.rename(job.claimed_path, job.rejected_path)
