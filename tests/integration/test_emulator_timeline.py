"""Realistic timelines: each state lasts what the Timeline says, progress climbs, cancels take time.

These tests poll while the emulator's own (short, real-time) timeline runs: the
waiting is the behaviour under test, not a backoff.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.emulator import Timeline
from tests.integration.emulator_helpers import (
    OPENAI,
    asgi_emulator,
    create_batch,
    openai_create,
    openai_upload,
    request_line,
    to_jsonl,
    upload,
)

LINES = [request_line(f"r{i}", f"text {i}") for i in range(10)]
TIMELINE = Timeline(validating_s=0.2, in_progress_min_s=0.4, finalizing_s=0.2)


def distinct(values: list[Any]) -> list[Any]:
    """The values in order of appearance, repeats folded."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


async def watch(poll: Any, done: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while not seen or not done(seen[-1]):
            seen.append(await poll())
            await anyio.sleep(0.01)
    return seen


async def test_openai_batch_walks_through_every_state_for_its_time(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path, timeline=TIMELINE) as client:
        started = time.monotonic()
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(LINES))))["id"]

        async def poll() -> dict[str, Any]:
            batch: dict[str, Any] = (await client.get(f"{OPENAI}/batches/{batch_id}")).json()
            return batch

        seen = await watch(poll, lambda b: b["status"] == "completed")
        elapsed = time.monotonic() - started
    assert distinct([b["status"] for b in seen]) == ["validating", "in_progress", "finalizing", "completed"]
    assert elapsed >= 0.8
    counts = [b["request_counts"]["completed"] for b in seen if b["status"] == "in_progress"]
    assert any(0 < c < len(LINES) for c in counts), counts  # requests are spread over the time
    assert counts == sorted(counts)
    finalizing = [b for b in seen if b["status"] == "finalizing"]
    assert all(b["request_counts"]["completed"] == len(LINES) and b["output_file_id"] is None for b in finalizing)
    assert seen[-1]["finalizing_at"] is not None


async def test_together_batch_shows_progress_and_no_finalizing(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path, timeline=TIMELINE) as client:
        batch_id = await create_batch(client, await upload(client, to_jsonl(LINES)))

        async def poll() -> dict[str, Any]:
            job: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
            return job

        seen = await watch(poll, lambda b: b["status"] == "COMPLETED")
    assert distinct([b["status"] for b in seen]) == ["VALIDATING", "IN_PROGRESS", "COMPLETED"]
    progress = [b["progress"] for b in seen if b["status"] == "IN_PROGRESS"]
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress)
    assert progress[-1] == 100.0  # finalizing shows as IN_PROGRESS at 100 %


async def test_cancelling_lasts_the_timeline_s_cancelling_time(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path, timeline=Timeline(cancelling_s=0.3)) as client:
        await client.post("/_emulator/pause")
        file_id = await openai_upload(client, to_jsonl(LINES))
        together_id = await create_batch(client, file_id)
        openai_id = (await openai_create(client, file_id))["id"]
        started = time.monotonic()
        assert (await client.post(f"/v1/batches/{together_id}/cancel")).json()["status"] == "CANCELING"
        assert (await client.post(f"{OPENAI}/batches/{openai_id}/cancel")).json()["status"] == "cancelling"
        await client.post("/_emulator/resume")

        async def poll() -> dict[str, Any]:
            batch: dict[str, Any] = (await client.get(f"{OPENAI}/batches/{openai_id}")).json()
            return batch

        seen = await watch(poll, lambda b: b["status"] == "cancelled")
        assert time.monotonic() - started >= 0.3
        assert distinct([b["status"] for b in seen]) == ["cancelling", "cancelled"]
        assert (await client.get(f"/v1/batches/{together_id}")).json()["status"] in ("CANCELING", "CANCELLED")


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_timeline_refuses_impossible_durations(value: float) -> None:
    with pytest.raises(ValueError, match="validating_s"):
        Timeline(validating_s=value)
