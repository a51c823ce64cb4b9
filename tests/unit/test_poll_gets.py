"""The poller's single gets: at most GETS_AT_ONCE in flight, however many poll rounds run."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import anyio

from batchd.daemon.admission import Admitter
from batchd.daemon.context import Context
from batchd.daemon.poll import GETS_AT_ONCE, Poller
from batchd.lifecycle import Action, Step
from batchd.models import BatchStatus, Job, JobState, RemoteBatch, RemoteBatchRecord, RemoteStatus

NOW = 1_764_100_000.0
ROUNDS = 12


class SlowProvider:
    """Answers gets once released, counting how many are in flight at once."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.in_flight = 0
        self.most = 0
        self.gets = 0

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.gets += 1
        await self.release.wait()
        self.in_flight -= 1
        return RemoteBatch(id=batch_id, status=RemoteStatus.IN_PROGRESS, input_file_id="f", endpoint="e")


def poll(i: int) -> tuple[Job, Action]:
    job = Job(
        id=f"job-{i}", name="n", source="n.jsonl", state=JobState.IN_PROGRESS, provider="p",
        created_at=NOW, updated_at=NOW,
    )  # fmt: skip
    row = RemoteBatchRecord(
        id=i, job_id=job.id, round=0, shard=0, input_file_id="f", remote_id=f"b-{i}",
        status=BatchStatus.IN_PROGRESS, create_attempts=1, intent_at=NOW, updated_at=NOW,
    )  # fmt: skip
    return job, Action(Step.POLL, NOW, (row,))


async def test_gets_of_concurrent_rounds_are_bounded() -> None:
    provider = SlowProvider()
    written: list[Any] = []
    store = SimpleNamespace(batches=SimpleNamespace(record_polls=written.extend))
    settings = SimpleNamespace(polling=SimpleNamespace(min_interval_s=1.0, max_interval_s=2.0))
    ctx = Context(
        cast(Any, settings), store=cast(Any, store), provider=cast(Any, provider), daemon_id="d",
        clock=lambda: NOW, rng=cast(Any, None), wake=lambda: None, poke_deliverer=lambda: None,
        faults=cast(Any, None),
    )  # fmt: skip
    poller = Poller(ctx, Admitter(ctx))
    async with anyio.create_task_group() as tg:
        for i in range(ROUNDS):
            tg.start_soon(poller.round, [poll(i)], NOW)
        await anyio.wait_all_tasks_blocked()
        assert provider.in_flight == GETS_AT_ONCE
        provider.release.set()
    assert provider.gets == ROUNDS and len(written) == ROUNDS
    assert provider.most == GETS_AT_ONCE
