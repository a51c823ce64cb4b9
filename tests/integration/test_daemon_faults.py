"""The daemon against an emulator that fails 20 % of all API requests at random (429/500/503 with
Retry-After, and dropped connections): every job still completes with one remote batch, and
Retry-After is honoured at both layers (the provider's own retries and the daemon's step backoff)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from batchd.backoff import RetryPolicy
from batchd.emulator import RandomFaults
from batchd.models import JobState
from tests.integration.daemon_rig import chat, rig

pytestmark = pytest.mark.each_database

#: Short, so the daemon's real step backoff (which honours it) keeps the test quick.
RETRY_AFTER_S = 0.2
JOBS = 6
REQUESTS_PER_JOB = 4


class RecordedSleeps:
    """The provider's retry waits, recorded instead of slept (a checkpoint keeps the loop fair)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("statuses", [(429, 500, 503), (429, 500, 503, "drop")], ids=["statuses", "with-drops"])
async def test_every_job_completes_under_twenty_percent_random_faults(
    tmp_path: Path, statuses: tuple[int | str, ...]
) -> None:
    faults = RandomFaults(rate=0.2, statuses=statuses, retry_after=RETRY_AFTER_S, seed=7)
    sleeps = RecordedSleeps()
    # The provider's own retries (default policy) on, their waits recorded instead of slept.
    async with rig(tmp_path, emulator={"random_faults": faults}, retry=RetryPolicy(), sleep=sleeps) as r:
        for j in range(JOBS):
            r.drop(f"job{j}.jsonl", [chat(f"job{j}-req{i}") for i in range(REQUESTS_PER_JOB)])
        with capture_logs() as logs:
            result = await r.daemon.run(once=True, timeout=90)
        stats = await r.stats()
        jobs = {job.name: job for job in r.store.jobs.select()}
        settings = r.settings

    assert result.drained
    assert sorted(jobs) == [f"job{j}" for j in range(JOBS)]
    assert all(job.state is JobState.COMPLETED for job in jobs.values()), {n: j.state for n, j in jobs.items()}
    for j in range(JOBS):
        output = (settings.outbox_dir / f"job{j}" / "output.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["custom_id"] for line in output] == [f"job{j}-req{i}" for i in range(REQUESTS_PER_JOB)]
    # Faults were really served, and no job got a second remote batch.
    assert stats["faults_served"]["total"] >= 5
    assert len(stats["batch_creates"]) == JOBS
    if "drop" in statuses:
        # A dropped connection carries no Retry-After: the plain backoff applies.
        assert stats["faults_served"]["drop"] >= 1
        return
    # Retry-After was honoured: by the provider's own retries...
    assert sleeps.waits and all(wait >= RETRY_AFTER_S for wait in sleeps.waits)
    # ...and by the daemon's step backoff when a step failed for good (creates are never blindly retried).
    step_waits = [e["wait_s"] for e in logs if e["event"] == "job.step_failed"]
    assert all(wait >= RETRY_AFTER_S for wait in step_waits)
