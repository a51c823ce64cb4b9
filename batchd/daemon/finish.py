"""Finishing a round: download what came back, merge it into the outbox in input order, then a
follow-up round for what failed for a passing reason, or the job's end and its webhook events.

job.json is written (atomically) before the terminal commit; a restart between the two finds
it and commits the end it describes instead of merging again.

The provider's copies go as the provider's `delete_files` says ("inputs" by default): a round's
uploaded inputs once its batches have all ended; with "all", the result files too (Anthropic:
the batch, which holds them), but only once job.json is written: until then a crash may need to
merge them again, and no later round can need them after it. A file downloaded whole is recorded
and never fetched again; one the provider no longer has is recorded as expired, and its
requests end unanswered (`results_expired`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd import chaos, lifecycle, metrics
from batchd.crashpoints import crashpoint
from batchd.daemon.context import Context, db
from batchd.daemon.submit import Submitter
from batchd.faults import describe
from batchd.inbox import ensure_job_files, job_files_dir
from batchd.models import BatchStatus, FileFate, FileKind, Job, JobState, RemoteBatchRecord
from batchd.outbox import (
    OUTBOX_FILES,
    iso,
    job_document,
    make_outbox_folder,
    outbox_candidates,
    reason_for,
    write_job_json,
)
from batchd.packs import split_answers
from batchd.pricing import estimate_cost
from batchd.providers.base import ProviderError
from batchd.request_rules import id_key
from batchd.results import MergeResult, merge_results, truncated_tail
from batchd.safe_fs import PlantedEntry, check_within, remove_own_files
from batchd.source_file import SourceState, current_change
from batchd.store import Ending
from batchd.webhooks import build_event, webhook_data

log = structlog.get_logger("batchd.daemon")


class Finisher:
    """Ends rounds: merge, then a follow-up round (through the Submitter) or the job's end."""

    def __init__(self, ctx: Context, submitter: Submitter) -> None:
        self._ctx = ctx
        self._submitter = submitter

    async def end_round(self, job: Job) -> None:
        """Every batch of the round ended: merge what came back, then a follow-up round or the end."""
        # Once per step (a pack's files are not each held back again: a steady stream of files
        # would hold a pack's end back for each of them).
        await self._ctx.yield_to_intake()
        if job.is_pack:
            await self._end_pack(job)
        else:
            await self._end_round(job)

    async def _end_round(self, job: Job) -> None:
        doc = await db(_finished_document, job)
        if doc is None:
            doc = await self._merge_round(job)
            if doc is None:
                return  # a follow-up round was planned
        if self._delete_files(job) == "all":
            # Only now: job.json holds every answer of every round, durably.
            await self._delete_results(job)
        await self._finish(job, doc)

    def _delete_files(self, job: Job) -> str:
        """The job's provider's `delete_files`; "none" for a provider no longer configured (a job
        whose job.json is written ends without it; nothing can be deleted there anyway)."""
        settings = self._ctx.settings.provider_named(job.provider_name)
        return settings.delete_files if settings is not None else "none"

    async def _merge_round(self, job: Job) -> dict[str, Any] | None:
        """Download, merge in input order; plan a follow-up round (None) or write job.json (its content)."""
        settings = self._ctx.settings
        batches = await db(self._ctx.store.batches.of_job, job.id)
        work = self._ctx.work_dir(job)
        answers = await self._download(job, batches, work)
        crashpoint("after_download")
        # Read again: the download recorded what it fetched, and what had expired.
        batches = await db(self._ctx.store.batches.of_job, job.id)
        await self._delete_inputs(job, batches)
        # A file that was in a pack: the pack's batches were its round 0, their answers split
        # into its job files (_end_pack), merged first as the oldest round's.
        pack_batches = await db(self._ctx.store.batches.of_job, job.pack_id) if job.pack_id else []
        files = job_files_dir(settings, job.id)
        carried = [p for p in _answer_paths(files, pack_batches) if await anyio.Path(p).exists()]
        for part in carried:
            # Beside the inbox: refused if a folder on its way was swapped for a symlink.
            await db(check_within, settings.inbox_dir, part)
        answers = carried + answers
        unrun = _unrun_answers(job, pack_batches, files) | _unrun_answers(job, batches, work)
        batches = pack_batches + batches
        # Reserved in the database, then created: a restart finds the reservation and reuses it.
        candidates = outbox_candidates(settings.outbox_dir, job.name, job.id)
        folder = await db(self._ctx.store.jobs.reserve_outbox, job.id, candidates, os.path.lexists)
        await db(make_outbox_folder, settings.outbox_dir, folder)
        code = lifecycle.unanswered_code(batches, job.cancel_requested)
        assert job.upload_path is not None
        await db(check_within, settings.inbox_dir, Path(job.upload_path))
        merge: MergeResult = await db(
            merge_results,
            input_path=Path(job.upload_path),
            answers=answers,
            folder=folder,
            unanswered_code=code,
            scratch_dir=work,
            key=id_key(job.provider),
            unrun=unrun,
        )
        source_changed = await self._check_source(job)
        followup = lifecycle.wants_followup(job, settings.resubmit.max_rounds)
        if followup and await self._submitter.plan_followup(job, folder):
            return None
        state = lifecycle.final_state(merge.unanswered, code)
        reason = job.reason
        if state != JobState.COMPLETED and reason is None:
            reason = reason_for(batches, merge, code)
        doc = job_document(
            job, state, merge, pack_batches + await db(self._ctx.store.batches.of_job, job.id), folder,
            finished_at=self._ctx.clock(), reason=reason,
            cost=estimate_cost(merge.usage, settings.pricing.get(job.model or "")), source_changed=source_changed,
            delete_files=self._delete_files(job),
        )  # fmt: skip
        await db(write_job_json, folder, doc)
        crashpoint("after_job_json")
        return doc

    async def _check_source(self, job: Job) -> str | None:
        """Whether the dropped file still is what was submitted; a change is recorded and logged once."""
        if job.source_changed is not None:
            return job.source_changed
        if job.claimed_path is None or job.source_size is None or job.source_mtime_ns is None:
            return None  # a manual retry, or a job of an older release
        before = SourceState(job.source_size, job.source_mtime_ns)
        try:
            await db(check_within, self._ctx.settings.inbox_dir, Path(job.claimed_path).parent)
        except PlantedEntry as exc:
            reason: str | None = f"its claim folder was replaced by something batchd did not make ({exc.filename})"
        else:
            reason = await db(current_change, Path(job.claimed_path), before)
        if reason is not None:
            await db(self._ctx.store.jobs.record_source_changed, job.id, reason)
            log.warning("job.source_changed", job_id=job.id, source=job.source, path=job.claimed_path, reason=reason)
        return reason

    async def _end_pack(self, pack: Job) -> None:
        """A pack's round ended: its answers are split back into each waiting file's job files,
        each file's round ends as its own would have (merged into its outbox and ended, or a
        follow-up round of its own), then the pack ends, without an outbox or events of its own.

        Crash safety: the split is written whole or not at all and done again after a crash for
        the files still waiting; a file that ended or went on alone is no longer waiting."""
        settings = self._ctx.settings
        batches = await db(self._ctx.store.batches.of_job, pack.id)
        answers = await self._download(pack, batches, self._ctx.work_dir(pack))
        crashpoint("after_download")
        batches = await db(self._ctx.store.batches.of_job, pack.id)
        await self._delete_inputs(pack, batches)
        # Its holder holds its files (a file in a pack is never claimed alone).
        files = await db(self._ctx.store.jobs.take_pack_files, pack.id, self._ctx.daemon_id)
        self._ctx.lease(pack, *files)
        if files:
            copies = {f.id: Path(f.upload_path or "") for f in files}
            for copy in copies.values():
                await db(check_within, settings.inbox_dir, copy)
            dest = {f.id: await db(ensure_job_files, settings, f.id) for f in files}
            parts = [(a, Path(a.name)) for a in answers]
            await db(split_answers, parts, copies, dest, key=id_key(pack.provider))
            crashpoint("after_pack_split")
            for file in files:
                await self._end_round(file)
        if self._delete_files(pack) == "all":
            await self._delete_results(pack)
        code = lifecycle.unanswered_code(batches, pack.cancel_requested)
        answered = all(b.status == BatchStatus.COMPLETED for b in batches)
        state = lifecycle.final_state(0 if answered else 1, code)
        reason = f"carried the requests of {pack.pack_members} files; each ended as its own job"
        ending = Ending(state, self._ctx.clock(), reason, {}, {})
        await db(self._ctx.store.jobs.finish, pack.id, expect=pack.state, ending=ending, events=[])
        await self._drop_scratch(pack)
        log.info("pack.finished", job_id=pack.id, status=state.value, files=pack.pack_members)

    async def _drop_scratch(self, job: Job) -> None:
        """An ended job's own working copies go, once its terminal state is committed: its
        downloaded result files (its outbox holds every answer now, or, for a pack, its files'
        job files do) and the files batchd made for it beside the inbox (shards, follow-up
        inputs, a pack's copy, a packed file's share of the answers). Kept: the copy its
        requests were submitted from, which `batchd retry` reads (a pack is never retried).
        Without this, batchd would keep a second copy of every result and of every shard for
        ever. Best effort: a failure (or a crash just before) leaves files that cost disk only."""
        settings = self._ctx.settings
        work = self._ctx.work_dir(job)
        files = job_files_dir(settings, job.id)
        upload = Path(job.upload_path) if job.upload_path and not job.is_pack else None
        keep = {upload.name} if upload is not None and upload.parent == files else set()
        try:
            with contextlib.suppress(FileNotFoundError):
                await db(shutil.rmtree, work)
            # Beside the inbox: refused if a folder on its way was swapped for a symlink.
            with contextlib.suppress(FileNotFoundError):
                await db(check_within, settings.inbox_dir, files)
                await db(remove_own_files, files, keep)
        except OSError as exc:  # PlantedEntry too
            log.warning("job.scratch_kept", job_id=job.id, error=describe(exc))

    async def _download(self, job: Job, batches: list[RemoteBatchRecord], work: Path) -> list[Path]:
        """Fetch every output and error file of the job's batches into `work` (resumed where a
        crash left one); return them, oldest round first."""
        await anyio.Path(work).mkdir(parents=True, exist_ok=True)
        answers: list[Path] = []
        for batch in batches:
            for kind, file_id in ((FileKind.OUTPUT, batch.output_file_id), (FileKind.ERRORS, batch.error_file_id)):
                if batch.remote_id and file_id:
                    dest = _answer_path(work, batch, kind.value)
                    if await self._fetch(job, batch, kind, file_id, dest):
                        answers.append(dest)
        return answers

    async def _fetch(self, job: Job, batch: RemoteBatchRecord, kind: FileKind, file_id: str, dest: Path) -> bool:
        """One result file into `dest`; False when there is nothing to merge (it expired first)."""
        fate = batch.fate(kind)
        if fate is FileFate.EXPIRED:
            return False
        if fate is not None and await anyio.Path(dest).exists():
            # Fetched whole before (an earlier round's, or before a crash): never asked for again,
            # from a provider that may have let it go since.
            return True
        chaos.file_fault(dest)
        try:
            size = await self._ctx.provider_for(job).download_file(file_id, dest)
        except ProviderError as exc:
            gone = lifecycle.results_gone(
                exc.status_code, exc.retryable, now=self._ctx.clock(), expires_at=batch.results_expire_at,
                failures=job.attempts + 1,
            )  # fmt: skip
            if not gone:
                raise
            await self._results_expired(job, batch, kind, dest, exc)
            return False
        if await db(truncated_tail, dest):
            # A body that ended mid-line although its length looked right: fetch it whole again.
            await anyio.Path(dest).unlink()
            raise ProviderError(f"{file_id} arrived cut off mid-line", retryable=True)
        await db(self._ctx.store.batches.note_files, batch.id, {kind: FileFate.DOWNLOADED})
        log.info("job.downloaded", job_id=job.id, file_id=file_id, bytes=size)
        return True

    async def _results_expired(
        self, job: Job, batch: RemoteBatchRecord, kind: FileKind, dest: Path, exc: ProviderError
    ) -> None:
        """The provider no longer has a result file: recorded (never asked for again), and its
        requests end unanswered (`results_expired`); a prefix fetched before is dropped."""
        await anyio.Path(dest).unlink(missing_ok=True)
        await db(self._ctx.store.batches.note_files, batch.id, {kind: FileFate.EXPIRED})
        log.warning(
            "job.results_expired", job_id=job.id, remote_batch_id=batch.remote_id, kind=kind.value,
            expires_at=iso(batch.results_expire_at), error=exc.message,
        )  # fmt: skip

    async def _delete_inputs(self, job: Job, batches: list[RemoteBatchRecord]) -> None:
        """Delete at the provider the files this round uploaded, unless `delete_files` is "none":
        its batches have all ended, and nothing reads them again. Best effort (`_delete`); one
        that another live job's batch also uses (Together: the same content, the same file id)
        is left for that job to delete."""
        provider = self._ctx.provider_for(job)
        if self._delete_files(job) == "none" or not provider.uploads_files:
            return
        for batch in lifecycle.current_round(job, batches):
            if not batch.input_file_id or batch.fate(FileKind.INPUT) is not None:
                continue
            if await db(self._ctx.store.batches.input_shared, batch.input_file_id, job.id, batch.sha256):
                log.info("job.input_kept", job_id=job.id, file_id=batch.input_file_id, reason="another job uses it")
                continue
            await self._delete(job, batch, FileKind.INPUT, batch.input_file_id, provider.delete_file)

    async def _delete_results(self, job: Job) -> None:
        """Delete at the provider every result file the job downloaded (Anthropic: each ended
        batch, which holds the results). Best effort (`_delete`)."""
        provider = self._ctx.provider_for(job)
        for batch in await db(self._ctx.store.batches.of_job, job.id):
            if not batch.remote_id:
                continue
            if provider.uploads_files:
                for kind, file_id in ((FileKind.OUTPUT, batch.output_file_id), (FileKind.ERRORS, batch.error_file_id)):
                    if file_id and batch.fate(kind) is FileFate.DOWNLOADED:
                        await self._delete(job, batch, kind, file_id, provider.delete_file)
            elif batch.fate(FileKind.BATCH) is None and _results_taken(batch):
                await self._delete(job, batch, FileKind.BATCH, batch.remote_id, provider.delete_batch)

    async def _delete(
        self, job: Job, batch: RemoteBatchRecord, kind: FileKind, target: str, delete: Callable[[str], Awaitable[None]]
    ) -> None:
        """Delete one thing at the provider and record that it is gone. A refusal is logged once
        and recorded (never tried again); a passing failure that outlasted the call's retries is
        logged and not recorded. Neither holds the job up nor fails it."""
        try:
            await delete(target)
        except ProviderError as exc:
            log.warning(
                "job.file_not_deleted", job_id=job.id, remote_batch_id=batch.remote_id, kind=kind.value,
                file_id=target, status=exc.status_code, error=exc.message,
            )  # fmt: skip
            if exc.retryable:
                return
            fate = FileFate.REFUSED
        else:
            fate = FileFate.DELETED
        await db(self._ctx.store.batches.note_files, batch.id, {kind: fate})

    async def _finish(self, job: Job, doc: dict[str, Any]) -> None:
        """The terminal transition and its webhook events, in one transaction."""
        state = JobState(doc["status"])
        finished_at = _timestamp(doc["finished_at"])
        event = build_event(
            self._ctx.settings, lifecycle.event_type(state), webhook_data(doc), now=finished_at,
            job_webhook_url=job.webhook_url,
        )  # fmt: skip
        counts = dict(doc["request_counts"])
        if isinstance(doc.get("unanswered"), int):
            # Kept with the counts in the store, for progress: a job cancelled with 13 of 20
            # answered is 65 % done, though all 20 have a line in its outbox.
            counts["unanswered"] = doc["unanswered"]
        cost = doc.get("cost")
        cost_usd = cost.get("estimated_usd") if isinstance(cost, dict) else None
        ending = Ending(state, finished_at, doc["reason"], counts, doc["usage"], cost_usd=cost_usd)
        job = await db(self._ctx.store.jobs.finish, job.id, expect=job.state, ending=ending, events=[event])
        await self._drop_scratch(job)
        folder = Path(job.outbox_path or ".")
        metrics.job_finished(state.value, finished_at - job.created_at, [folder / n for n in OUTBOX_FILES])
        log.info(
            "job.finished", job_id=job.id, status=state.value, completed=doc["request_counts"]["completed"],
            failed=doc["request_counts"]["failed"], rounds=job.round + 1, output_file=doc["output_file"],
            error_file=doc["error_file"],
        )  # fmt: skip
        self._ctx.poke_deliverer()


def _answer_path(work: Path, batch: RemoteBatchRecord, kind: str) -> Path:
    """Where a batch's output or errors file is downloaded. Named by batchd's own row, not by the
    provider's id: Gemini's hold a "/", and no id a provider sends may choose a path."""
    return work / f"batch-{batch.id}.{kind}.jsonl"


def _answer_paths(work: Path, batches: list[RemoteBatchRecord]) -> list[Path]:
    return [_answer_path(work, b, kind) for b in batches for kind in ("output", "errors")]


def _unrun_answers(job: Job, batches: list[RemoteBatchRecord], work: Path) -> set[Path]:
    """The downloaded files whose `canceled` results (Anthropic's line for a request a cancel kept
    from running) are no answers: the request is unanswered, and its line is batchd's own with
    the round's code. Those of every batch that ended cancelled after the user's cancel (the
    job then ends `cancelled`, not `completed`: DESIGN §2), else those of the batches batchd
    cancelled as stuck (expired: they go to a follow-up round)."""
    if job.cancel_requested:
        cancelled = [b for b in batches if b.status == BatchStatus.CANCELLED]
    else:
        cancelled = [b for b in batches if lifecycle.cancelled_as_stuck(b)]
    return set(_answer_paths(work, cancelled))


def _finished_document(job: Job) -> dict[str, Any] | None:
    """The job.json a crash left behind after writing it but before the terminal commit."""
    if job.outbox_path is None:
        return None
    path = Path(job.outbox_path) / "job.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    # job.json is written atomically, so it is whole; it only has to be this job's.
    return doc if doc.get("id") == job.id else None


def _results_taken(batch: RemoteBatchRecord) -> bool:
    """Whether an Anthropic batch has ended and its results were fetched (or had expired)."""
    ended = batch.status.remote is not None and batch.status.remote.terminal
    taken = batch.fate(FileKind.OUTPUT) in (FileFate.DOWNLOADED, FileFate.EXPIRED) or not batch.output_file_id
    return ended and taken


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
