"""Stuck batches (#18): a batch that does not run within `stuck_after_s` is cancelled by the
daemon, recorded and logged as stuck, and its requests complete in a follow-up round; with no
rounds left the job ends `expired`, not `cancelled`. The emulator's `pending_once` trigger holds
a batch before it runs, over real loopback HTTP, in each dialect."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from batchd.cli.records import show_lines, show_record
from batchd.emulator.timeline import Timeline
from batchd.models import BatchStatus, JobState
from batchd.status.pages import job_page
from batchd.status.queries import JobDetail
from tests.integration.daemon_rig import chat, eventually, gemini, message, rig

#: One second: long enough for a bound batch to be polled a few times first (every 0.02-0.1 s).
STUCK = "stuck_after_s = 1\n"
HELD = {"pending_once": True}


def lines_for(kind: str) -> tuple[list[dict[str, Any]], str, str]:
    """Three requests whose second holds its first batch before it runs, in `kind`'s own lines;
    the provider lines the dialect needs; the field naming a request."""
    if kind == "anthropic":
        return [message("a"), message("b", HELD), message("c")], STUCK, "custom_id"
    if kind == "gemini":
        return [gemini("a"), gemini("b", HELD), gemini("c")], STUCK + 'model = "gemini-2.5-flash"\n', "key"
    return [chat("a"), chat("b", HELD), chat("c")], STUCK, "custom_id"


@pytest.mark.parametrize("kind", ["together", "openai", "anthropic", "gemini"])
async def test_a_batch_kept_pending_past_the_limit_is_cancelled_and_its_requests_complete_in_a_follow_up(
    tmp_path: Path, kind: str
) -> None:
    lines, provider_lines, key = lines_for(kind)
    async with rig(tmp_path, kind=kind, provider_lines=provider_lines) as r:
        r.drop("held.jsonl", lines)
        with capture_logs() as logs:
            await r.drain()
        job = r.job("held")
        assert job.state is JobState.COMPLETED and job.round == 1
        # Every request answered once, in input order, by the follow-up round.
        assert [line[key] for line in r.outbox_lines("held", "output.jsonl")] == ["a", "b", "c"]
        assert not (r.settings.outbox_dir / "held" / "errors.jsonl").exists()
        first, second = r.store.batches.of_job(job.id)
        assert (first.round, first.status, second.round, second.status) == (
            0, BatchStatus.CANCELLED, 1, BatchStatus.COMPLETED,
        )  # fmt: skip
        assert first.stuck_at is not None and first.progress_at is not None and second.stuck_at is None
        # Not cancelled early: it had not moved for the whole limit when it was found stuck.
        assert first.stuck_at - first.progress_at >= 1.0
        # Visible: job.json names the stuck batch, and the log says how long it waited.
        doc = r.job_json("held")
        assert doc["status"] == "completed"
        stuck_batch = doc["rounds"][0]["batches"][0]
        assert stuck_batch["status"] == "cancelled" and stuck_batch["stuck_at"] is not None
        assert doc["rounds"][1]["batches"][0]["stuck_at"] is None
        (found,) = [e for e in logs if e["event"] == "job.batch_stuck"]
        assert found["remote_batch_id"] == first.remote_id and found["job_id"] == job.id
        assert found["waited_s"] >= 1.0 and found["limit_s"] == 1.0
        # Only batchd's stuck cancel: the user never cancelled.
        assert not job.cancel_requested
        # `batchd show` and the status page say so too.
        batches = r.store.batches.of_job(job.id)
        shown = show_lines(show_record(job, batches, [], time.time()))
        assert sum("stuck: cancelled by batchd at" in line for line in shown) == 1
        page = job_page(JobDetail(job, batches, [], [], [], time.time()))
        assert "stuck, cancelled by batchd" in page and "found stuck (no progress since" in page


async def test_with_no_round_left_the_job_ends_expired_with_batch_expired_lines(tmp_path: Path) -> None:
    async with rig(tmp_path, provider_lines=STUCK + "[resubmit]\nmax_rounds = 0\n") as r:
        r.drop("late.jsonl", [chat("a"), chat("b", HELD)])
        await r.drain()
        job = r.job("late")
        assert job.state is JobState.EXPIRED and job.round == 0
        errors = r.outbox_lines("late", "errors.jsonl")
        assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
            ("a", None, "batch_expired"), ("b", None, "batch_expired"),
        ]  # fmt: skip
        doc = r.job_json("late")
        assert doc["status"] == "expired" and doc["unanswered"] == 2
        assert "stuck" in doc["reason"] and doc["rounds"][0]["batches"][0]["stuck_at"] is not None


async def test_anthropic_canceled_results_of_a_stuck_batch_become_batch_expired_lines(tmp_path: Path) -> None:
    # Anthropic answers a cancelled batch with a `canceled` result per request never run: of a
    # batch batchd cancelled as stuck, those are unanswered requests, not the user's cancel.
    async with rig(tmp_path, kind="anthropic", provider_lines=STUCK + "[resubmit]\nmax_rounds = 0\n") as r:
        r.drop("late.jsonl", [message("a", HELD), message("b")])
        await r.drain()
        job = r.job("late")
        assert job.state is JobState.EXPIRED
        errors = r.outbox_lines("late", "errors.jsonl")
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("a", "batch_expired"),
            ("b", "batch_expired"),
        ]


async def test_a_batch_that_moves_within_the_limit_is_left_alone(tmp_path: Path) -> None:
    # The emulator holds the batch VALIDATING for 0.6 s, then answers a request every 0.2 s: it
    # moves well within the limit of 1 s each time, though the whole takes longer than that.
    timeline = Timeline(validating_s=0.6, in_progress_min_s=1.2)
    async with rig(tmp_path, provider_lines=STUCK, emulator={"timeline": timeline}) as r:
        r.drop("steady.jsonl", [chat(f"q{i}") for i in range(6)])
        await r.drain()
        job = r.job("steady")
        assert job.state is JobState.COMPLETED and job.round == 0
        (batch,) = r.store.batches.of_job(job.id)
        assert batch.stuck_at is None and batch.status is BatchStatus.COMPLETED


async def test_jobs_polled_by_a_list_sweep_are_found_stuck_too(tmp_path: Path) -> None:
    # Three jobs in flight: one list call polls them all (lifecycle.SWEEP_MIN_JOBS).
    async with rig(tmp_path, provider_lines=STUCK) as r:
        names = ["one", "two", "three"]
        for name in names:
            r.drop(f"{name}.jsonl", [chat(f"{name}-a"), chat(f"{name}-b", HELD)])
        with capture_logs() as logs:
            await r.drain()
        assert sum(e["event"] == "job.batch_stuck" for e in logs) == 3
        for name in names:
            job = r.job(name)
            assert job.state is JobState.COMPLETED and job.round == 1
            assert [line["custom_id"] for line in r.outbox_lines(name, "output.jsonl")] == [f"{name}-a", f"{name}-b"]
        listed = (await r.stats())["requests"].get("GET /v1/batches", 0)
        assert listed > 0  # the sweep's list call did the polling


async def test_an_anthropic_job_the_user_cancelled_ends_cancelled_with_its_unrun_requests_unanswered(
    tmp_path: Path,
) -> None:
    # Anthropic writes a `canceled` result for each request a cancel kept from running: those are
    # no answers, so the job ends `cancelled` (DESIGN §2), not `completed`.
    async with rig(tmp_path, kind="anthropic") as r:
        r.drop("stop.jsonl", [message("a", HELD), message("b", HELD)])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(lambda: bool(r.store.jobs.select()) and r.job("stop").state is JobState.IN_PROGRESS)
            r.store.jobs.request_cancel(r.job("stop").id)
            r.daemon.wake()
        assert r.job("stop").state is JobState.CANCELLED
        errors = r.outbox_lines("stop", "errors.jsonl")
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("a", "batch_cancelled"),
            ("b", "batch_cancelled"),
        ]
        assert r.job_json("stop")["unanswered"] == 2
