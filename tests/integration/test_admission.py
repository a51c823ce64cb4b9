"""Admission control (#18) with the daemon in-process against the emulator over loopback: a
token budget keeps what is in flight within it, a provider's "queue full" answer makes a job
wait (each dialect's words), the queue goes in priority and arrival order, and a spend budget
holds a job until the UTC day rolls over (an injected clock). Real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from batchd.models import JobState
from batchd.tokens import output_tokens, prompt_tokens
from tests.integration.daemon_rig import Rig, chat, eventually, gemini, message, rig

pytestmark = pytest.mark.each_database


def asking(custom_id: str, kind: str = "together") -> dict[str, Any]:
    """One request of `kind`'s dialect, asking for at most 50 tokens."""
    text = f"{custom_id}: tell me about the weather in a few words"
    if kind == "anthropic":
        line = message(custom_id, text=text)
        line["params"]["max_tokens"] = 50
        return line
    if kind == "gemini":
        line = gemini(custom_id, text=text)
        line["request"]["generationConfig"] = {"maxOutputTokens": 50}
        return line
    line = chat(custom_id)
    line["body"]["messages"][0]["content"] = text
    line["body"]["max_tokens"] = 50
    return line


def job_tokens(lines: list[dict[str, Any]]) -> int:
    """What batchd (and the emulator) estimate the lines enqueue."""
    bodies = [line.get("body") or line.get("params") or line.get("request") for line in lines]
    return sum(prompt_tokens(b) + output_tokens(b) for b in bodies)


@asynccontextmanager
async def running(r: Rig) -> AsyncIterator[None]:
    """The daemon runs (not --once: files are dropped while it does) for the block, then stops."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.daemon.run)
        await eventually(lambda: r.daemon.ready.is_set())
        yield
        r.daemon.stop()


def states(r: Rig) -> dict[str, JobState]:
    return {j.name: j.state for j in r.store.jobs.select()}


async def test_a_token_budget_smaller_than_three_jobs_runs_five_never_over_it(tmp_path: Path) -> None:
    files = {f"job-{i}": [asking(f"job{i}-a"), asking(f"job{i}-b")] for i in range(5)}
    each = job_tokens(files["job-0"])
    budget = each * 5 // 2  # two jobs fit, never three
    async with rig(tmp_path, provider_lines=f"max_enqueued_tokens = {budget}\n") as r:
        # The emulator's own queue has the same limit: had batchd ever sent more, it would refuse.
        await r.control("POST", "queue", json={"max_enqueued_tokens": budget})
        await r.control("POST", "pause")
        for name, lines in files.items():
            r.drop(f"{name}.jsonl", lines)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(lambda: sorted(states(r).values()).count(JobState.QUEUED) == 3)
            queued = [j for j in r.store.jobs.select() if j.state is JobState.QUEUED]
            # The head of the queue waits for tokens; those behind it (in arrival order), for it.
            tokens = [j for j in queued if "tokens of its model are enqueued at its provider" in (j.wait_reason or "")]
            behind = [j for j in queued if j.wait_reason == "waiting for the jobs queued before it at its provider"]
            assert tokens and len(tokens) + len(behind) == 3
            with anyio.fail_after(20):  # the two let in reach the emulator
                while (await r.control("GET", "queue"))["enqueued_tokens"] != 2 * each:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            assert sorted(states(r).values()).count(JobState.QUEUED) == 3
            await r.control("POST", "resume")
        assert set(states(r).values()) == {JobState.COMPLETED}
        queue = await r.control("GET", "queue")
        assert queue["refused"] == 0 and queue["enqueued_tokens"] == 0
        for i in range(5):
            answered = [line["custom_id"] for line in r.outbox_lines(f"job-{i}", "output.jsonl")]
            assert answered == [f"job{i}-a", f"job{i}-b"]
        # Each job took its turn: no job's wait reason is left behind once it ran.
        assert all(j.wait_reason is None and j.admitted_at is not None for j in r.store.jobs.select())


@pytest.mark.parametrize("kind", ["together", "openai", "anthropic", "gemini"])
async def test_a_queue_full_refusal_makes_the_job_wait_then_complete(tmp_path: Path, kind: str) -> None:
    first = [asking("first-a", kind), asking("first-b", kind)]
    second = [asking("second-a", kind), asking("second-b", kind)]
    extra = 'model = "gemini-2.5-flash"\n' if kind == "gemini" else ""
    # Polling at 0.5-1 s: a refused job asks again after at least that, so the refusal's reason is
    # there to be read (at 0.02 s, a loaded machine could read the next check's words instead).
    async with rig(tmp_path, kind=kind, provider_lines=extra, polling=(0.5, 1.0)) as r:
        # The account's queue holds one of these jobs, not two; batchd is told no limit.
        await r.control("POST", "queue", json={"max_enqueued_tokens": job_tokens(first) + job_tokens(second) - 1})
        await r.control("POST", "pause")
        with capture_logs() as logs:
            async with running(r):
                r.drop("first.jsonl", first)
                # Held by the provider (Anthropic's batches are in_progress at once).
                await eventually(lambda: states(r).get("first") in (JobState.VALIDATING, JobState.IN_PROGRESS))
                r.drop("second.jsonl", second)
                await eventually(lambda: states(r).get("second") is JobState.QUEUED)
                waiting = r.job("second")
                assert "queue is full" in (waiting.wait_reason or "") or "queue was full" in (waiting.wait_reason or "")
                assert waiting.last_error is None  # a wait, not a failure
                await r.control("POST", "resume")
                await eventually(lambda: all(s.terminal for s in states(r).values()))
        assert states(r) == {"first": JobState.COMPLETED, "second": JobState.COMPLETED}
        assert (await r.control("GET", "queue"))["refused"] >= 1
        full = [e for e in logs if e["event"] == "job.provider_queue_full"]
        assert full and all(e["job_id"] == waiting.id for e in full)
        # What the refusal taught: the queue held the first job's tokens when it said "full".
        assert full[0]["tokens_in_flight"] == job_tokens(first)


async def test_the_queue_goes_by_priority_then_arrival(tmp_path: Path) -> None:
    async with rig(tmp_path, provider_lines="max_batches_in_flight = 1\n") as r:
        await r.control("POST", "pause")
        data = r.settings.inbox_dir / "data"
        data.mkdir(parents=True)
        async with running(r):
            r.drop("a.jsonl", [chat("a")])
            await eventually(lambda: states(r).get("a") is JobState.VALIDATING)
            r.drop("b.jsonl", [chat("b")])
            await eventually(lambda: states(r).get("b") is JobState.QUEUED)
            (data / "c.jsonl").write_text(json.dumps(chat("c")) + "\n")
            spec = r.settings.inbox_dir / ".c.json.tmp"
            spec.write_text('{"input": "data/c.jsonl", "priority": 5}')
            spec.rename(r.settings.inbox_dir / "c.json")
            await eventually(lambda: states(r).get("c") is JobState.QUEUED)
            assert "max_batches_in_flight = 1" in (r.job("c").wait_reason or "")
            await r.control("POST", "resume")
            await eventually(lambda: all(s.terminal for s in states(r).values()))
        assert set(states(r).values()) == {JobState.COMPLETED}
        creates = (await r.stats())["batch_creates"]
        by_file = {r.store.batches.of_job(r.job(n).id)[0].input_file_id: n for n in "abc"}
        order = [by_file.get(c["input_file_id"]) for c in creates]
        assert order == ["a", "c", "b"]  # c's priority puts it before b, which came first


async def test_a_spend_budget_holds_a_job_until_the_day_rolls_over(tmp_path: Path) -> None:
    # 23:59:30 UTC of a day: the clock the daemon and its store read, moved on by hand.
    day_end = datetime(2026, 12, 6, 23, 59, 30, tzinfo=UTC).timestamp()
    offset = [day_end - time.time()]

    def clock() -> float:
        return time.time() + offset[0]

    lines = [asking("one-a"), asking("one-b")]
    usd_per_mtok = 1_000_000 / job_tokens(lines)  # each job is estimated at $1.00
    pricing = f"[pricing.m]\ninput_per_mtok = {usd_per_mtok}\noutput_per_mtok = {usd_per_mtok}\n"
    async with rig(tmp_path, clock=clock, config_lines=pricing + "[budget]\nusd_per_day = 1.5\n") as r:
        # The first job stays in flight: its estimate counts against the day's budget.
        await r.control("POST", "pause")
        async with running(r):
            r.drop("one.jsonl", lines)
            await eventually(lambda: states(r).get("one") is JobState.VALIDATING)
            r.drop("two.jsonl", [asking("two-a"), asking("two-b")])
            await eventually(lambda: states(r).get("two") is JobState.QUEUED)
            assert "spend budget of the day: $1.00 of $1.50 used" in (r.job("two").wait_reason or "")
            await anyio.sleep(0.3)  # the daemon keeps ticking: still held, the day has not ended
            assert states(r)["two"] is JobState.QUEUED
            offset[0] += 60  # 00:00:30 of the next day: a new day's budget
            await eventually(lambda: states(r).get("two") is not JobState.QUEUED)
            await r.control("POST", "resume")
            await eventually(lambda: all(s.terminal for s in states(r).values()))
        assert states(r) == {"one": JobState.COMPLETED, "two": JobState.COMPLETED}
        two = r.job("two")
        assert two.admitted_at is not None and two.admitted_at >= day_end + 30
