"""The inbox (DESIGN §3): what is a submission, claiming it, specs, rejections.

Everything here is synchronous filesystem work; the daemon runs it in worker
threads. Nothing is ever deleted: an accepted file is renamed into
`inbox/.batchd/claimed/<job id>/`, a rejected one into `inbox/rejected/`
(rejections.py), a claim that can be neither into `inbox/.batchd/quarantine/`.

Crash safety: the claim (a rename into a folder named after the new job id, after a
marker naming the claimer is written in it) happens before anything else, so a crash
after it leaves a claim folder without a job row, which recovery (recovery.py, claims.py)
takes again once its claimer is gone. Each claim is handled on its own: a file that
cannot be read is rejected with a report saying why, and one that cannot even be
rejected is moved aside; nothing about one claim stops the others.

Safety: the inbox is group-writable. batchd follows no symlink it did not make
(safe_fs.py): the folders it writes into are checked to be its own, the files it
creates are made O_EXCL|O_NOFOLLOW, and a claimed file is read through one descriptor
opened O_NOFOLLOW and checked to be a regular file. A file still being written when it is
taken is read as one snapshot, read again if it changed meanwhile, and what was submitted
(its size and modification time) is recorded on the job (source_file.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

import structlog

from batchd import claims, rejections
from batchd.claims import Taking
from batchd.config import DEFAULT_PROVIDER, ProviderSettings, Settings
from batchd.crashpoints import crashpoint
from batchd.durable_files import make_durable
from batchd.models import Job, JobState, Limits
from batchd.outbox import outbox_name
from batchd.packs import PACK_NAME, write_pack
from batchd.recovery import ClaimRecovery
from batchd.rejections import Rejection, from_report, whole_file
from batchd.request_rules import id_key
from batchd.safe_fs import NotRegularFile, make_dirs, open_regular, real_dir
from batchd.source_file import SourceState, snapshot
from batchd.specs import Spec, batch_model, is_ignored_name, move_data, open_data, read_spec, spec_data
from batchd.store import Hold, NewJob, RejectedJob, Store
from batchd.upload_copy import UploadCopy, write_upload_copy
from batchd.validation import Report, validate_stream
from batchd.webhooks import build_event

__all__ = [
    "UPLOAD_NAME",
    "Inbox",
    "Kind",
    "Rejection",
    "Spec",
    "classify",
    "ensure_job_files",
    "is_ignored_name",
    "job_files_dir",
]

log = structlog.get_logger("batchd.inbox")

#: The upload copy, beside the claimed file. Hidden on purpose: a submission's name never
#: starts with "." (such names are ignored), so a dropped `upload.jsonl` is never overwritten
#: by its own normalised copy (which would lose the user's bytes).
UPLOAD_NAME = ".upload.jsonl"
#: Reads of a claimed file that changed while it was read, before what is there is taken.
MAX_READS = 3
#: The inbox, when batchd makes it: group batchd drops files (setgid keeps the group), and the
#: sticky bit keeps members from renaming or removing each other's entries or batchd's.
INBOX_MODE = 0o3770
#: Errors that say nothing about the file (a full disk, a passing I/O fault, a race with another
#: daemon): its claim is left as it is and taken again at the next recovery pass.
PASSING_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EAGAIN,
     errno.EINTR, errno.EROFS, errno.ESTALE, errno.ETIMEDOUT, errno.EBUSY, errno.ENOENT}
)  # fmt: skip


def job_files_dir(settings: Settings, job_id: str) -> Path:
    """A job's shard, follow-up and retry files: beside the inbox (a filesystem every daemon
    sharing the inbox reaches), apart from the claim folders that recovery scans."""
    return settings.inbox_dir / ".batchd" / "work" / job_id


def ensure_job_files(settings: Settings, job_id: str) -> Path:
    """`job_files_dir`, each of its folders checked to be batchd's own (made if missing)."""
    return make_dirs(settings.inbox_dir, [".batchd", "work", job_id])


def is_the_files_fault(exc: BaseException) -> bool:
    """Whether an error taking a claimed file comes from the file (it is rejected with a report
    saying so), rather than from the database, the disk or batchd (the claim waits)."""
    if isinstance(exc, NotRegularFile | UnicodeError | RecursionError):
        return True
    return isinstance(exc, OSError) and exc.errno not in PASSING_ERRNOS


class Kind(StrEnum):
    """How the inbox treats a directory entry."""

    IGNORE = "ignore"
    REQUESTS = "requests"
    SPEC = "spec"
    #: taken only to be rejected (a symlink, another extension)
    BAD = "bad"


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
class Taken:
    """A claimed file read consistently: its checks, its upload copy, and what it was then."""

    report: Report
    copy: UploadCopy
    source: SourceState


class Inbox:
    """Claims, checks and records submissions; rejects what cannot be taken."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        store: Store,
        *,
        owner: Callable[[], Hold | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        #: the hold on a job this process creates (a daemon holds what it takes; None: nobody)
        self._owner = owner or (lambda: None)
        hold = self._owner()
        #: the claimer named in this process's claim folders: its daemon's id (or its own, without one)
        self.claimer = hold.owner if hold is not None else uuid.uuid4().hex
        #: wall-clock time, against which the ages of claim folders are told
        self._clock = clock
        self._taking = Taking()
        self._recovery = ClaimRecovery(
            store=store, settings=settings, inbox_dir=lambda: self.dir, me=self.claimer, taking=self._taking,
            settle=self._settle, clock=clock,
        )  # fmt: skip

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
        """The inbox and batchd's folders in it, each checked to be batchd's own (see safe_fs)."""
        inbox = self.dir
        if not inbox.is_dir():
            inbox.mkdir(parents=True, exist_ok=True)
            inbox.chmod(INBOX_MODE)
        mode = inbox.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            log.warning(
                "inbox.not_sticky", inbox=str(inbox), mode=oct(stat.S_IMODE(mode)),
                advice="chmod 3770 (DESIGN §9): without the sticky bit, anyone who may drop files"
                " may also rename or remove the files of others",
            )  # fmt: skip
        make_dirs(inbox, [".batchd", "claimed"])
        rejections.rejected_dir(inbox)

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
        """Claim `path` and turn it into a job (or a rejection). None if it is gone or ignored
        (or, when it can be neither taken nor rejected, moved aside into the quarantine)."""
        taken = self.take_many([path])
        return taken[0] if taken else None

    def take_many(self, paths: Sequence[Path]) -> list[Job]:
        """Claim each of `paths` and turn it into a job or a rejection, as `take` does; the
        accepted ones are recorded in one transaction (a burst of files pays one commit).

        Each claim still stands on its own: a file that cannot be read is rejected alone. An
        error that is not a file's (the database, a full disk) is raised, and every claim of
        this call that has no job yet waits for the next recovery pass, as a single take's does.
        """
        done: list[Job] = []
        accepted: list[NewJob] = []
        claimed: list[str] = []
        with contextlib.ExitStack() as holding:
            try:
                # Checked once for the whole take (each claim folder below it is checked as made).
                claimed_root = make_dirs(self.dir, [".batchd", "claimed"])
                for path in paths:
                    claim = self._claim(path, claimed_root, holding)
                    if claim is None:
                        continue
                    claimed.append(claim.parent.name)
                    outcome = self._decide(claim.parent.name, claim)
                    if isinstance(outcome, NewJob):
                        accepted.append(outcome)
                    elif outcome is not None:
                        done.append(outcome)
                recorded = self._pack(accepted)
                # The upload copies were written without their fsyncs: all of them at once now,
                # before the jobs that read them are committed.
                make_durable(_upload_copies(recorded))
                for job in self._store.jobs.insert_many(recorded) if recorded else []:
                    if job.is_pack:
                        log.info("inbox.packed", job_id=job.id, files=job.pack_members, requests=job.request_count)
                    else:
                        log.info(
                            "inbox.accepted", job_id=job.id, source=job.source, requests=job.request_count,
                            pack_id=job.pack_id,
                        )  # fmt: skip
                    done.append(job)
            except Exception:
                # The database, a full disk: the claims wait for the next recovery pass.
                for job_id in claimed:
                    self._recovery.defer(job_id)
                raise
        return done

    def _pack(self, accepted: list[NewJob]) -> list[NewJob]:
        """The jobs to record for `accepted`: small files that agree on what a batch is made of
        go into packs of two or more, each with its pack job (packs.py); the rest as they are.

        The pack's upload copy is written before anything is recorded: a crash before the commit
        leaves the claims without jobs, which recovery takes again (alone, unpacked), and the
        copy, which nothing then reads."""
        settings = self._settings()
        most = settings.inbox.pack_max_requests
        if most <= 0 or len(accepted) < 2:
            return accepted
        groups: dict[tuple[str, str | None, str | None, str | None], list[NewJob]] = {}
        alone: list[NewJob] = []
        for new in accepted:
            if new.spec_path is None and new.request_count is not None and new.request_count <= most:
                groups.setdefault((new.provider_name, new.endpoint, new.model, new.completion_window), []).append(new)
            else:
                alone.append(new)
        recorded = alone
        for group in groups.values():
            limits = settings.provider_named(group[0].provider_name)
            assert limits is not None
            for files in _fill(group, limits.limits):
                recorded.extend(self._make_pack(files) if len(files) > 1 else files)
        return recorded

    def _make_pack(self, files: list[NewJob]) -> list[NewJob]:
        """`files` in one pack: their jobs, naming it, and the pack's job."""
        pack_id = uuid.uuid4().hex
        first = files[0]
        dest = ensure_job_files(self._settings(), pack_id) / PACK_NAME
        copies = [(f.id, Path(f.upload_path or "")) for f in files]
        copy = write_pack(copies, dest, key=id_key(first.provider), durable=False)
        pack = NewJob(
            id=pack_id,
            name=f"pack-{pack_id[:12]}",
            source=f"{len(files)} files",
            provider=first.provider,
            provider_name=first.provider_name,
            endpoint=first.endpoint,
            upload_path=str(copy.path),
            sha256=copy.sha256,
            size_bytes=copy.size_bytes,
            request_count=copy.request_count,
            completion_window=first.completion_window,
            model=first.model,
            hold=first.hold,
            estimated_input_tokens=sum(f.estimated_input_tokens or 0 for f in files),
            estimated_output_tokens=sum(f.estimated_output_tokens or 0 for f in files),
            pack_members=len(files),
        )
        return [*(replace(f, pack_id=pack_id) for f in files), pack]

    def _claim(self, path: Path, root: Path, holding: contextlib.ExitStack) -> Path | None:
        """Rename `path` into a new claim folder under `root` (held by this process while
        `holding` lasts); the claimed path, or None when it is ignored or another take got it first."""
        if classify(path) is Kind.IGNORE:
            return None
        job_id = uuid.uuid4().hex
        holding.enter_context(self._taking.hold(job_id))
        claim_dir = real_dir(root / job_id)
        claims.write_marker(claim_dir, self.claimer, self._clock())
        claimed = claim_dir / path.name
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            # Another scan or another daemon took it first.
            claims.release(claim_dir)
            return None
        log.info("inbox.claimed", job_id=job_id, source=path.name)
        crashpoint("after_claim")
        return claimed

    def recover(self) -> list[Job]:
        """At start-up: every claim folder without a job whose claimer is gone, then half-done rejections."""
        jobs = self._recovery.everything()
        for job in self._store.jobs.select([JobState.REJECTED]):
            if job.claimed_path and job.rejected_path and os.path.lexists(job.claimed_path):
                try:
                    self._finish_rejection(job, self._analyse_for_report(job))
                except Exception as exc:
                    log.exception("inbox.rejection_unfinished", job_id=job.id, error=str(exc))
        # The events a crash left held (between a rejection's record and its move): the moves
        # are done now.
        self._store.deliveries.release_held()
        return jobs

    def recover_abandoned(self) -> list[Job]:
        """On each full rescan: claims a claimer left since (see recovery.py)."""
        return self._recovery.abandoned()

    def _settle(self, job_id: str, claimed: Path) -> Job | None:
        """Turn a claimed file into a job (recorded) or a rejection (see `_decide`)."""
        outcome = self._decide(job_id, claimed)
        if not isinstance(outcome, NewJob):
            return outcome
        make_durable(_upload_copies([outcome]))
        job = self._store.jobs.insert(outcome)
        log.info("inbox.accepted", job_id=job.id, source=job.source, requests=job.request_count)
        return job

    def _decide(self, job_id: str, claimed: Path) -> NewJob | Job | None:
        """What a claimed file becomes, whatever is wrong with it: the job to record, or its
        rejection (recorded).

        A file that cannot be read is rejected with a report saying why; a claim that cannot
        be rejected either is moved into the quarantine (None). Errors that are not the file's
        (the database, a full disk) are raised: the claim stays for a later pass.
        """
        source = claimed.name
        try:
            try:
                return self._prepare(job_id, claimed)
            except Rejection as rejection:
                problem = rejection
            except Exception as exc:
                if not is_the_files_fault(exc):
                    raise
                log.warning("inbox.unreadable", job_id=job_id, source=source, error=str(exc))
                problem = whole_file(source, "unreadable", f"batchd could not read it: {_describe(exc)}")
            return self._reject(job_id, claimed, problem)
        except Exception as exc:
            if not is_the_files_fault(exc):
                raise
            # Not even a rejection could be made (a name the filesystem refuses, rejected/
            # unusable): the whole claim is moved aside, visibly.
            claims.quarantine(self.dir, claimed.parent, source=source, error=exc)
            return None

    def _kind(self, claimed: Path) -> Kind:
        """What was claimed, or a Rejection for what is never read (a symlink, a FIFO, another extension)."""
        source = claimed.name
        mode = claimed.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise whole_file(source, "symlink", "symlinks are not followed; drop the file itself")
        if not stat.S_ISREG(mode):
            # A FIFO or a device is never opened: reading one could block intake forever.
            raise whole_file(source, "file_type", "not a regular file; drop a regular file")
        kind = classify(claimed)
        if kind is Kind.BAD:
            raise whole_file(source, "extension", "only NAME.jsonl (requests) and NAME.json (a spec) are taken")
        return kind

    def _prepare(self, job_id: str, claimed: Path) -> NewJob:
        """Check and copy a claimed file: the job it becomes (or a Rejection)."""
        settings = self._settings()
        source = claimed.name
        spec = read_spec(claimed, settings) if self._kind(claimed) is Kind.SPEC else None
        # Before the data is read: a Gemini job without a model could never be created.
        model = batch_model(_provider_of(settings, spec), spec, source)
        data = claimed if spec is None else spec_data(self.dir, claimed, spec)
        fd = open_regular(data) if spec is None else open_data(self.dir, claimed, data)
        try:
            moved: list[Path] = []

            def claim_data() -> None:
                # The spec's data joins it in the claim folder once it passed its checks.
                if spec is not None and not moved:
                    moved.append(move_data(self.dir, claimed, data, fd))

            # The spec's model rewrites each line's, except Gemini's: its lines name none, and the
            # model goes to the create call instead (`model`).
            rewrite = spec.model if spec and model is None else None
            taken = self._read_consistently(fd, claimed, spec, claim_data, rewrite)
        finally:
            os.close(fd)
        data = moved[0] if moved else data
        report, copy = taken.report, taken.copy
        provider_name = spec.provider if spec else DEFAULT_PROVIDER
        return NewJob(
            id=job_id,
            name=outbox_name(source),
            source=source,
            provider=_provider_of(settings, spec).kind,
            provider_name=provider_name,
            endpoint=report.endpoint,
            claimed_path=str(data),
            spec_path=str(claimed) if spec else None,
            upload_path=str(claimed.parent / UPLOAD_NAME),
            sha256=copy.sha256,
            size_bytes=copy.size_bytes,
            request_count=copy.request_count,
            completion_window=(spec.completion_window if spec else None) or settings.submit.completion_window,
            # Gemini's batch model, else the spec's override, else the one model every request
            # names (for cost estimates).
            model=model or (spec.model if spec else None) or report.model,
            webhook_url=spec.webhook_url if spec else None,
            metadata=dict(spec.metadata) if spec else {},
            hold=self._owner(),
            source_size=taken.source.size,
            source_mtime_ns=taken.source.mtime_ns,
            estimated_input_tokens=report.prompt_tokens,
            estimated_output_tokens=report.output_tokens,
            priority=spec.priority if spec else 0,
        )

    def _read_consistently(
        self, fd: int, claimed: Path, spec: Spec | None, claim_data: Callable[[], None], rewrite: str | None
    ) -> Taken:
        """Validate and copy one snapshot of the open file; again if it changed meanwhile.

        After MAX_READS reads of a file that keeps changing, the last snapshot is taken as it
        is; the job records what it was, and the end of its round reports the difference.
        `rewrite`: the model the upload copy writes into each line's `body.model` (None: none).
        """
        source = claimed.name
        for attempt in range(1, MAX_READS + 1):
            report, before = self._validate(fd, claimed, spec, last=attempt == MAX_READS)
            if not report.ok:
                log.info("inbox.changed_while_read", job_id=claimed.parent.name, source=source, attempt=attempt)
                continue
            claim_data()
            with snapshot(fd, before.size) as stream:
                # Made durable by whoever records the job (make_durable): a burst, all at once.
                copy = write_upload_copy(stream, claimed.parent / UPLOAD_NAME, model=rewrite, durable=False)
            after = SourceState.of(os.fstat(fd))
            if after == before or attempt == MAX_READS:
                return Taken(report, copy, before)
            log.warning(
                "inbox.changed_while_read", job_id=claimed.parent.name, source=source, attempt=attempt,
                size=before.size, now_size=after.size,
            )  # fmt: skip
        raise AssertionError("unreachable: the last read returns or raises")

    def _validate(self, fd: int, claimed: Path, spec: Spec | None, *, last: bool) -> tuple[Report, SourceState]:
        """Validate a snapshot of the open file. Raises a Rejection when it is invalid, unless it
        changed meanwhile (it may have been read mid-write) and this is not the `last` read."""
        before = SourceState.of(os.fstat(fd))
        # The rules and limits of the provider the file goes to.
        provider = _provider_of(self._settings(), spec)
        with snapshot(fd, before.size) as stream:
            name = spec.input if spec else claimed.name
            scratch = self._settings().state_dir / "work"
            report = validate_stream(
                stream, source=name, limits=provider.validation_limits, size_bytes=before.size,
                scratch_dir=scratch, dialect=provider.kind,
            )  # fmt: skip
        if not report.ok and (last or SourceState.of(os.fstat(fd)) == before):
            prefix = f"{claimed.name}: its input {spec.input} is not valid" if spec else ""
            raise from_report(report, prefix=prefix)
        return report, before

    def _analyse_for_report(self, job: Job) -> str:
        """The report of a rejection a crash interrupted, found again from the claimed file."""
        assert job.claimed_path is not None
        claimed = Path(job.claimed_path)
        settings = self._settings()
        try:
            spec = read_spec(claimed, settings) if self._kind(claimed) is Kind.SPEC else None
            data = claimed if spec is None else spec_data(self.dir, claimed, spec)
            fd = open_regular(data) if spec is None else open_data(self.dir, claimed, data)
            try:
                self._validate(fd, claimed, spec, last=True)
            finally:
                os.close(fd)
        except Rejection as rejection:
            return rejection.report
        except Exception as exc:
            if not is_the_files_fault(exc):
                raise
        return f"{job.source}: {job.reason}\n"

    def _reject(self, job_id: str, claimed: Path, rejection: Rejection) -> Job:
        # The default provider's kind: a rejected file went to no provider.
        settings = self._settings()
        source = claimed.name
        target, report_path = rejections.reserve(self.dir, source, job_id, rejection.report)
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
        if job.report_path != str(report_path):
            # Another daemon recorded this claim first: it finishes it; the name is given back.
            report_path.unlink(missing_ok=True)
            return job
        log.warning("inbox.rejected", job_id=job_id, source=source, reason=rejection.reason)
        try:
            self._finish_rejection(job, rejection.report)
        finally:
            # The file is in rejected/ with its report: its event may go. (Should the move fail, it
            # goes anyway: a rejection is news even when its file could not be moved yet.)
            self._store.deliveries.release_held(job_id)
        return job

    def _finish_rejection(self, job: Job, report: str) -> None:
        """Write the report, then move the file (byte-identical) beside it."""
        rejections.finish(self.dir, job, report)


def _upload_copies(news: Sequence[NewJob]) -> list[Path]:
    """The upload copies (and pack copies) of jobs about to be recorded, written without their
    fsyncs: made durable before the jobs that read them are committed."""
    return [Path(new.upload_path) for new in news if new.upload_path]


#: Bytes a request's line may grow by in a pack (its id becomes a job id, a dash and a rank).
PACK_ID_BYTES = 48


def _fill(files: list[NewJob], limits: Limits) -> list[list[NewJob]]:
    """`files` cut, in order, into packs that each fit one remote batch of `limits`."""
    packs: list[list[NewJob]] = [[]]
    size = count = 0
    for new in files:
        requests = new.request_count or 0
        grown = (new.size_bytes or 0) + requests * PACK_ID_BYTES
        if packs[-1] and (count + requests > limits.max_requests or size + grown > limits.max_bytes):
            packs.append([])
            size = count = 0
        packs[-1].append(new)
        size += grown
        count += requests
    return packs


def _describe(exc: BaseException) -> str:
    """An error as a user reads it in a report: the reason, without a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _provider_of(settings: Settings, spec: Spec | None) -> ProviderSettings:
    """The configured provider a file goes to: its spec's, else the default (read_spec has
    checked that a spec's is configured)."""
    found = settings.provider_named(spec.provider if spec else DEFAULT_PROVIDER)
    assert found is not None
    return found
