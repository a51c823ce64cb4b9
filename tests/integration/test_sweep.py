"""Listing for a sweep or a reconciliation costs what is in flight, not the account's history.

An account with 500 old batches (written into the emulator's data dir before it starts), the
provider and the daemon over real loopback HTTP; the emulator counts the requests it serves.
OpenAI pages are cut to 20 batches so that the whole history is 25 pages.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from batchd.backoff import RetryPolicy
from batchd.emulator import create_app, serve_emulator
from batchd.emulator.timeline import Timeline
from batchd.models import Job, JobState, RemoteBatch
from batchd.providers import openai as openai_wire
from batchd.providers.base import Provider
from batchd.providers.openai import OpenAIProvider
from batchd.providers.together import TogetherProvider
from tests.integration.daemon_rig import chat, eventually, rig
from tests.integration.emulator_helpers import request_line, seed_history, to_jsonl

HISTORY = 500
PAGE = 20
OPENAI_LIST = "GET /openai/v1/batches"
TOGETHER_LIST = "GET /v1/batches"
#: the history ends a day ago: every batch of it is older than anything a test creates
A_DAY_AGO = timedelta(days=1)


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_wire, "PAGE_LIMIT", PAGE)


class Account:
    """The emulator with a long history, a provider of one dialect, and the emulator's counters."""

    def __init__(self, provider: Provider, control: httpx.AsyncClient, history: list[str]) -> None:
        self.provider = provider
        self.control = control
        self.history = history

    async def requests(self, key: str) -> int:
        counts: dict[str, int] = (await self.control.get("/_emulator/stats")).json()["requests"]
        return counts.get(key, 0)

    async def create(self, tmp_path: Path, count: int) -> list[RemoteBatch]:
        """`count` new batches, oldest first."""
        data = to_jsonl([request_line("a")])
        source = tmp_path / "in.jsonl"
        source.write_bytes(data)
        file_id = await self.provider.upload_file(source, filename="in.jsonl", sha256=hashlib.sha256(data).hexdigest())
        return [
            await self.provider.create_batch(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id=f"j{i}"
            )
            for i in range(count)
        ]


@asynccontextmanager
async def account(tmp_path: Path, dialect: str) -> AsyncIterator[Account]:
    history = seed_history(tmp_path / "emulator", HISTORY, newest=datetime.now(UTC) - A_DAY_AGO, dialect=dialect)
    async with (
        serve_emulator(create_app(tmp_path / "emulator")) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as control,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        await control.post("/_emulator/pause")
        provider: Provider = (
            OpenAIProvider(http, base_url=f"{url}/openai/v1", api_key="k", retry=RetryPolicy(attempts=1))
            if dialect == "openai"
            else TogetherProvider(http, base_url=url, api_key="k", retry=RetryPolicy(attempts=1))
        )
        yield Account(provider, control, history)


def since_of(batches: list[RemoteBatch]) -> datetime:
    """What the daemon passes: the oldest batch's creation less a minute of clock skew."""
    oldest = min(b.created_at for b in batches if b.created_at is not None)
    return oldest - timedelta(minutes=1)


async def test_openai_sweep_for_the_newest_reads_one_page_not_the_history(tmp_path: Path) -> None:
    async with account(tmp_path, "openai") as acct:
        new = await acct.create(tmp_path, 3)
        wanted = {b.id for b in new}

        before = await acct.requests(OPENAI_LIST)
        everything = await acct.provider.list_batches()
        full_pages = await acct.requests(OPENAI_LIST) - before
        assert len(everything) == HISTORY + 3 and full_pages == -(-(HISTORY + 3) // PAGE) == 26

        before = await acct.requests(OPENAI_LIST)
        found = await acct.provider.list_batches(wanted=wanted, since=since_of(new))
        assert {b.id for b in found} == wanted
        assert await acct.requests(OPENAI_LIST) - before == 1

        # Wanted alone (no bound in time) also stops once all are found.
        before = await acct.requests(OPENAI_LIST)
        assert {b.id for b in await acct.provider.list_batches(wanted=wanted)} == wanted
        assert await acct.requests(OPENAI_LIST) - before == 1


async def test_openai_a_wanted_batch_older_than_since_is_not_searched_for(tmp_path: Path) -> None:
    async with account(tmp_path, "openai") as acct:
        (new,) = await acct.create(tmp_path, 1)
        old = acct.history[300]  # 301 batches further: the 16th page

        before = await acct.requests(OPENAI_LIST)
        found = await acct.provider.list_batches(wanted={new.id, old}, since=since_of([new]))
        assert [b.id for b in found] == [new.id]
        # The first page already reaches the history, a day older than `since`.
        assert await acct.requests(OPENAI_LIST) - before == 1

        # Without `since`, paging goes on until the old one is found, and no further.
        before = await acct.requests(OPENAI_LIST)
        found = await acct.provider.list_batches(wanted={new.id, old})
        assert {b.id for b in found} == {new.id, old}
        assert await acct.requests(OPENAI_LIST) - before == (1 + 300) // PAGE + 1


async def test_together_sweep_is_one_call_and_returns_only_the_wanted(tmp_path: Path) -> None:
    async with account(tmp_path, "together") as acct:
        new = await acct.create(tmp_path, 3)
        wanted = {b.id for b in new} | {acct.history[-1]}
        before = await acct.requests(TOGETHER_LIST)
        found = await acct.provider.list_batches(wanted=wanted, since=since_of(new))
        # One bare array: the old wanted batch is in it too (`since` only bounds paging).
        assert {b.id for b in found} == wanted
        assert len(await acct.provider.list_batches()) == HISTORY + 3
        assert await acct.requests(TOGETHER_LIST) - before == 2


async def test_daemon_sweeps_read_one_page_each_however_long_the_history(tmp_path: Path) -> None:
    seed_history(tmp_path / "emulator", HISTORY, newest=datetime.now(UTC) - A_DAY_AGO)
    # Batches stay VALIDATING a while, so that four jobs are in flight together and swept (long
    # enough for a loaded machine to take and submit all four first: 0.5 s was not always).
    async with rig(tmp_path, kind="openai", emulator={"timeline": Timeline(validating_s=2.0)}) as r:
        sweeps: list[dict[str, Any]] = []
        listing = r.provider.list_batches

        async def counted(**options: Any) -> list[RemoteBatch]:
            sweeps.append(options)
            return await listing(**options)

        r.provider.list_batches = counted  # type: ignore[method-assign]
        for name in "abcd":
            r.drop(f"{name}.jsonl", [chat(name)])
        await r.drain()
        assert all(r.job(name).state is JobState.COMPLETED for name in "abcd")
        assert sweeps and all(options["wanted"] and options["since"] is not None for options in sweeps)
        # Every sweep stopped after its first page: the 500 old batches were never read.
        assert (await r.stats())["requests"][OPENAI_LIST] == len(sweeps)


async def test_reconcile_adopts_the_lost_batch_reading_only_recent_pages(tmp_path: Path) -> None:
    seed_history(tmp_path / "emulator", HISTORY, newest=datetime.now(UTC) - A_DAY_AGO)
    async with rig(tmp_path, kind="openai") as r:
        # The batch is really created, but the daemon sees a 503 and reconciles by listing.
        fault = {"method": "POST", "path": "/openai/v1/batches", "status": 503, "act": True}
        await r.control("POST", "faults", json=fault)
        r.drop("lost.jsonl", [chat("a"), chat("b")])
        with capture_logs() as logs:
            await r.drain()
        job = r.job("lost")
        assert job.state is JobState.COMPLETED
        assert "job.batch_adopted" in [e["event"] for e in logs]
        stats = await r.stats()
        (made,) = [b for b in stats["batch_creates"] if b["input_file_id"] != "file-history"]
        (batch,) = r.store.batches.of_job(job.id)
        assert batch.remote_id is not None and batch.remote_id == made["id"]
        assert (await r.provider.get_batch(batch.remote_id)).metadata == {"batchd_job_id": job.id}
        # One job in flight polls by gets: the only listing was the reconciliation's, one page.
        assert stats["requests"][OPENAI_LIST] == 1


async def test_a_wanted_batch_the_sweep_misses_is_asked_on_its_own(tmp_path: Path) -> None:
    # Four jobs in flight together (see the sweep test above for the 2 s).
    async with rig(tmp_path, emulator={"timeline": Timeline(validating_s=2.0)}) as r:
        listing, getting = r.provider.list_batches, r.provider.get_batch
        hidden: set[str] = set()
        calls: list[tuple[str, bool]] = []

        async def forgetful(**options: Any) -> list[RemoteBatch]:
            # The provider's list leaves out job a's batch (as a list that lags behind would).
            (batch,) = r.store.batches.of_job(r.job("a").id)
            assert batch.remote_id is not None
            hidden.add(batch.remote_id)
            calls.append(("sweep", batch.remote_id in options["wanted"]))
            return [b for b in await listing(**options) if b.id not in hidden]

        async def get(batch_id: str) -> RemoteBatch:
            calls.append(("get", batch_id in hidden))
            return await getting(batch_id)

        r.provider.list_batches = forgetful  # type: ignore[method-assign]
        r.provider.get_batch = get  # type: ignore[method-assign]
        for name in "abcd":
            r.drop(f"{name}.jsonl", [chat(name)])
        await r.drain()
        assert all(r.job(name).state is JobState.COMPLETED for name in "abcd")
        # A sweep that wanted it and did not find it is followed by a get of it.
        assert any(a == ("sweep", True) and b == ("get", True) for a, b in itertools.pairwise(calls))


async def test_jobs_waiting_for_the_sweep_under_way_are_read_once_and_a_cancel_still_acts_at_once(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        await r.control("POST", "pause")  # every batch stays validating
        listed, release = r.hold_up_listing()
        reads: list[tuple[str, JobState]] = []
        due = r.store.jobs.due

        def counted(*args: Any, **kwargs: Any) -> list[Job]:
            found = due(*args, **kwargs)
            reads.extend((job.id, job.state) for job in found)
            return found

        r.store.jobs.due = counted  # type: ignore[method-assign]

        def polls_read(names: str) -> int:
            ids = {r.job(name).id for name in names}
            return sum(1 for job_id, state in reads if job_id in ids and state is JobState.VALIDATING)

        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            for name in "abc":
                r.drop(f"{name}.jsonl", [chat(name)])
            with anyio.fail_after(20):
                await listed.wait()  # a sweep is under way, held up in its list call
            for name in "def":
                r.drop(f"{name}.jsonl", [chat(name)])
            # Created after the sweep took its jobs: due for a poll, they wait for the next sweep.
            await eventually(lambda: all(any(j.name == n for j in r.store.jobs.select()) for n in "def"))
            await eventually(lambda: all(polls_read(n) >= 1 for n in "def"))
            before = polls_read("def")
            for _ in range(30):
                r.daemon.wake()
                await anyio.sleep(0.01)
            # 30 ticks later, not one more read of them: a tick's cost follows what can start.
            assert polls_read("def") == before
            # A command's news still reaches them at once: a cancel is sent while the sweep waits.
            cancelled = r.job("d")
            r.store.jobs.request_cancel(cancelled.id)
            (batch,) = r.store.batches.of_job(cancelled.id)
            cancel_call = f"POST /v1/batches/{batch.remote_id}/cancel"
            await eventually(lambda: r.job("d").state is not JobState.VALIDATING)
            # The state moves to cancelling before the request goes out: wait for the request.
            with anyio.fail_after(20):
                while (await r.stats())["requests"].get(cancel_call) is None:  # noqa: ASYNC110 - the emulator offers no event per request
                    await anyio.sleep(0.02)
            assert not release.is_set()
            assert (await r.stats())["requests"].get(cancel_call) == 1
            release.set()
            r.daemon.stop()
