"""Finishing a round: download what came back, merge it into the outbox in input order, then a
follow-up round for what failed for a passing reason, or the job's end and its webhook events.

job.json is written (atomically) before the terminal commit; a restart between the two finds
it and commits the end it describes instead of merging again.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd import chaos, lifecycle, metrics
from batchd.crashpoints import crashpoint
from batchd.daemon.context import Context, db
from batchd.daemon.submit import Submitter
from batchd.models import Job, JobState, RemoteBatchRecord
from batchd.outbox import OUTBOX_FILES, job_document, make_outbox_folder, outbox_candidates, reason_for, write_job_json
from batchd.pricing import estimate_cost
from batchd.providers.base import ProviderError
from batchd.request_rules import id_key
from batchd.results import MergeResult, merge_results, truncated_tail
from batchd.safe_fs import PlantedEntry, check_within
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
        doc = await db(_finished_document, job)
        if doc is None:
            doc = await self._merge_round(job)
            if doc is None:
                return  # a follow-up round was planned
        await self._finish(job, doc)

    async def _merge_round(self, job: Job) -> dict[str, Any] | None:
        """Download, merge in input order; plan a follow-up round (None) or write job.json (its content)."""
        settings = self._ctx.settings
        batches = await db(self._ctx.store.batches.of_job, job.id)
        work = self._ctx.work_dir(job)
        answers = await self._download(job, batches, work)
        crashpoint("after_download")
        await self._delete_inputs(job, batches)
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
            unrun=_stuck_answers(job, batches, work),
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
            job, state, merge, batches, folder, finished_at=self._ctx.clock(), reason=reason,
            cost=estimate_cost(merge.usage, settings.pricing.get(job.model or "")), source_changed=source_changed,
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

    async def _download(self, job: Job, batches: list[RemoteBatchRecord], work: Path) -> list[Path]:
        """Fetch every output and error file of the job's batches into `work` (resumed where a
        crash left one); return them, oldest round first."""
        await anyio.Path(work).mkdir(parents=True, exist_ok=True)
        answers: list[Path] = []
        for batch in batches:
            for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
                if batch.remote_id and file_id:
                    dest = _answer_path(work, batch, kind)
                    chaos.file_fault(dest)
                    size = await self._ctx.provider_for(job).download_file(file_id, dest)
                    if await db(truncated_tail, dest):
                        # A body that ended mid-line although its length looked right: fetch it whole again.
                        await anyio.Path(dest).unlink()
                        raise ProviderError(f"{file_id} arrived cut off mid-line", retryable=True)
                    log.info("job.downloaded", job_id=job.id, file_id=file_id, bytes=size)
                    answers.append(dest)
        return answers

    async def _delete_inputs(self, job: Job, batches: list[RemoteBatchRecord]) -> None:
        """Delete at the provider the files this round uploaded, where the provider wants it (Gemini
        counts them against a quota for 48 h). Best effort: a delete that fails is logged, once,
        and never holds the job up; a round ended again after a crash deletes again (one already
        gone counts as deleted)."""
        provider = self._ctx.provider_for(job)
        if not provider.deletes_inputs:
            return
        for batch in lifecycle.current_round(job, batches):
            if not batch.input_file_id or not batch.remote_id:
                continue
            try:
                await provider.delete_file(batch.input_file_id)
            except ProviderError as exc:
                log.warning("job.input_not_deleted", job_id=job.id, file_id=batch.input_file_id, error=exc.message)

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


def _stuck_answers(job: Job, batches: list[RemoteBatchRecord], work: Path) -> set[Path]:
    """The downloaded files of the batches batchd cancelled as stuck: what they say was cancelled
    never ran, and is treated as unanswered (expired), not as the user's cancel. After the
    user's own cancel, a cancel is what it is."""
    if job.cancel_requested:
        return set()
    stuck = [b for b in batches if lifecycle.cancelled_as_stuck(b)]
    return {_answer_path(work, b, kind) for b in stuck for kind in ("output", "errors")}


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


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
