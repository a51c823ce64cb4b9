"""Crash-safety stress run and recovery time (issue 4's figures). Not part of the test command.

    python -m tests.benchmarks.bench_crash [--jobs 200] [--kills 1000] [--seed 1]
    python -m tests.benchmarks.bench_crash --recovery-jobs 1000

The stress run is the CI crash test at scale: the real daemon against the emulator,
SIGKILLed at every crash point and at `--kills` random moments, restarted each time,
then checked (every job complete once, each input created once, every webhook with one
stable id, integrity_check ok). The recovery run fills the database with in-flight jobs
(emulator paused), kills the daemon, and times a restart until READY.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from tests.acceptance import crash_scenario
from tests.acceptance.conftest import chat, eventually, harness


async def stress(jobs: int, kills: int, seed: int) -> None:
    with tempfile.TemporaryDirectory(prefix="batchd-crash-") as tmp:
        async with harness(Path(tmp)) as h:
            started = time.monotonic()
            out = await crash_scenario.run(h, jobs=jobs, random_kills=kills, seed=seed)
            await crash_scenario.check(h, out)
            creates = await h.emulator.creates()
            print(
                json.dumps(
                    {
                        "jobs": len(out.files),
                        "kills": out.kills,
                        "lost": 0,
                        "duplicated_creates": len(creates) - len({c["input_file_id"] for c in creates}),
                        "webhooks_received": len(h.receiver.hooks),
                        "wall_s": round(time.monotonic() - started, 1),
                    }
                )
            )


async def recovery(jobs: int, restarts: int) -> None:
    with tempfile.TemporaryDirectory(prefix="batchd-recovery-") as tmp:
        async with harness(Path(tmp)) as h:
            await h.emulator.control("POST", "pause")
            first = h.start()
            await first.until_logged("daemon.ready")
            for i in range(jobs):
                h.ws.drop(f"r{i:05d}.jsonl", [chat(f"r{i}-a"), chat(f"r{i}-b")])
            await eventually(lambda: len(first.logs_named("job.batch_created")) >= jobs, 600)
            first.proc.kill()
            await first.wait()
            times = []
            for _ in range(restarts):
                started = time.monotonic()
                daemon = h.start()
                await daemon.until_logged("daemon.ready", timeout=60)
                times.append(time.monotonic() - started)
                daemon.proc.kill()
                await daemon.wait()
            # The same, measured inside the process: from the first log line to READY.
            inner = [_inner_ready_s(d.logs()) for d in h.daemons[1:]]
            print(
                json.dumps(
                    {
                        "jobs_in_flight": jobs,
                        "restart_to_ready_s_median": round(statistics.median(times), 3),
                        "restart_to_ready_s_max": round(max(times), 3),
                        "in_process_ready_s_median": round(statistics.median(inner), 3),
                    }
                )
            )


def _inner_ready_s(logs: list[dict[str, object]]) -> float:
    from datetime import datetime

    stamps = [e for e in logs if "timestamp" in e]
    start = datetime.fromisoformat(str(stamps[0]["timestamp"]))
    ready = next(datetime.fromisoformat(str(e["timestamp"])) for e in stamps if e["event"] == "daemon.ready")
    return (ready - start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--recovery-jobs", type=int, default=0, help="run the recovery-time measurement instead")
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    if args.recovery_jobs:
        anyio.run(recovery, args.recovery_jobs, args.restarts)
    else:
        anyio.run(stress, args.jobs, args.kills, args.seed)


if __name__ == "__main__":
    main()
