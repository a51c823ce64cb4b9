"""The chaos run at length (issue 13's figures). Not part of the test command.

    python -m tests.benchmarks.bench_chaos [--jobs 200] [--rate 0.05] [--seeds 1 2 3]

The CI chaos test (tests/acceptance/test_chaos.py: 50 jobs, one seed) with more jobs, a
higher fault rate and several seeds, on SQLite. Each run prints the jobs, the faults injected
by kind, the daemon's exits (must be 0), lost and duplicated requests (must be 0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anyio

from tests.acceptance.test_chaos import run_chaos


async def main(jobs: int, rate: float, seeds: list[int]) -> None:
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="batchd-chaos-") as tmp:
            started = time.monotonic()
            figures = await run_chaos(Path(tmp), jobs=jobs, seed=seed, rate=rate)
            figures.update(seed=seed, rate=rate, seconds=round(time.monotonic() - started, 1))
            print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    anyio.run(main, args.jobs, args.rate, args.seeds)
