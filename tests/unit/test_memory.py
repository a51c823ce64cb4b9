"""`batchd run` caps glibc's malloc arenas, unless the operator chose a number."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from batchd.memory import limit_malloc_arenas; print(limit_malloc_arenas())"


def probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    return subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_the_cap_takes_on_glibc_and_an_operators_choice_wins() -> None:
    assert probe() == "True"
    assert probe(MALLOC_ARENA_MAX="8") == "False"
