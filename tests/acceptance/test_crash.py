"""kill -9 at chosen points and at random moments: nothing lost, nothing twice (fixed seed)."""

from __future__ import annotations

from pathlib import Path

from tests.acceptance import crash_scenario
from tests.acceptance.conftest import harness


async def test_kill_minus_nine_anywhere_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Two requests per remote batch: most jobs are several shards, killed mid-way too.
        out = await crash_scenario.run(h, jobs=12, random_kills=12, seed=20261125, shard_size=2)
        assert out.kills == len(crash_scenario.CRASH_POINTS) + 12
        await crash_scenario.check(h, out)
