"""kill -9 at chosen points and at random moments: nothing lost, nothing twice (fixed seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd import crashpoints
from tests.acceptance import crash_scenario
from tests.acceptance.conftest import chat, harness, use_openai

pytestmark = pytest.mark.each_database


async def test_kill_minus_nine_anywhere_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Two requests per remote batch: most jobs are several shards, killed mid-way too.
        out = await crash_scenario.run(h, jobs=12, random_kills=12, seed=20261125, shard_size=2)
        assert out.kills == len(crash_scenario.CRASH_POINTS) + 12
        await crash_scenario.check(h, out)


async def test_the_anthropic_path_killed_anywhere_creates_no_second_batch(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Every crash point, and a few random moments (the Together test above does many).
        out = await crash_scenario.run(h, jobs=4, random_kills=2, seed=20261206, shard_size=2, dialect="anthropic")
        assert out.kills == len(crash_scenario.CRASH_POINTS) + 2
        await crash_scenario.check(h, out)


async def test_the_gemini_path_killed_anywhere_creates_no_second_batch(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Every crash point (a lost create is found again by its input file and display_name).
        out = await crash_scenario.run(h, jobs=3, random_kills=0, seed=20261207, shard_size=2, dialect="gemini")
        assert out.kills == len(crash_scenario.CRASH_POINTS)
        await crash_scenario.check(h, out)


async def test_packed_files_killed_anywhere_lose_nothing_and_share_each_batch_once(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # The first daemon takes the files together: packs; every crash point, the split included.
        out = await crash_scenario.run(h, jobs=10, random_kills=4, seed=20261207, packed=True)
        assert out.kills == len(crash_scenario.CRASH_POINTS) + len(crash_scenario.PACK_CRASH_POINTS) + 4
        await crash_scenario.check(h, out)


async def test_openai_dialect_killed_between_create_and_commit_adopts_by_metadata(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        use_openai(h)
        h.ws.drop("oa.jsonl", [chat("a"), chat("b")])
        first = h.start(env={crashpoints.ENV: "after_create_answer"})
        assert await first.wait(timeout=60) == -9
        (created,) = await h.emulator.creates()
        second = h.start()
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.completed" and event["data"]["provider"] == "openai"
        assert event["data"]["remote_batch_ids"] == [created["id"]]
        assert len(await h.emulator.creates()) == 1
        assert second.has_logged("job.batch_adopted")
