"""kill -9 at chosen points and at random moments: nothing lost, nothing twice (fixed seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance import crash_scenario
from tests.acceptance.conftest import harness

pytestmark = pytest.mark.each_database


async def test_kill_minus_nine_anywhere_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        out = await crash_scenario.run(h, jobs=12, random_kills=12, seed=20261125)
        assert out.kills == len(crash_scenario.CRASH_POINTS) + 12
        await crash_scenario.check(h, out)
