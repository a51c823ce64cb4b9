"""Provider webhooks as poll hints (#18): a batch's end → its results in the outbox, with
polling set to minutes.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_provider_hooks [--jobs 20] [--kind openai|gemini] [--json]

The daemon runs in this process (as tests/integration/test_daemon_hooks.py runs it) against
the emulator over loopback, `[polling] min_interval_s = 300`: no poll falls due while this
runs, so every job that ends is brought in by its provider webhook alone. The emulator sends
the signed event when its worker ends a batch; this measures, per job, from that moment (the
emulator's `batch_ended` hook, on this process's clock) to the job's `finished_at` in the store
(taken as its results are merged, just before job.json is written and the end committed).
Jobs are dropped one at a time, each after the previous one finished. Goal: under 1 s.
The load average is printed with the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from batchd.emulator import provider_hooks
from batchd.models import JobState
from tests.integration.daemon_rig import chat, eventually, gemini, rig
from tests.integration.test_daemon_hooks import HOOKED, LISTEN, MODEL, SECRET, SLOW, listener

GOAL_S = 1.0


async def measure(jobs: int, kind: str) -> list[float]:
    ended: dict[str, float] = {}
    original = provider_hooks.ProviderHooks.batch_ended

    def noted(self: provider_hooks.ProviderHooks, batch: Any) -> None:
        ended[batch.id] = time.time()
        original(self, batch)

    provider_hooks.ProviderHooks.batch_ended = noted  # type: ignore[method-assign]
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        extra = HOOKED + (MODEL if kind == "gemini" else "")
        async with (
            rig(Path(tmp), kind=kind, polling=SLOW, provider_lines=extra, config_lines=LISTEN) as r,
            listener(r) as url,
            anyio.create_task_group() as tg,
        ):
            target = {"dialect": kind, "url": f"{url}/hooks/default", "secret": SECRET}
            await r.control("POST", "provider-webhooks", json=target)
            tg.start_soon(r.daemon.run)
            await eventually(lambda: r.daemon.ready.is_set())
            for i in range(jobs):
                name = f"job-{i}"
                r.drop(f"{name}.jsonl", [gemini(f"k{i}") if kind == "gemini" else chat(f"c{i}")])
                await eventually(
                    lambda n=name: any(  # type: ignore[misc]
                        j.name == n and j.state is JobState.COMPLETED for j in r.store.jobs.select()
                    ),
                    60,
                )
                job = r.job(name)
                (batch,) = r.store.batches.of_job(job.id)
                remote = (batch.remote_id or "").removeprefix("batches/")
                assert job.finished_at is not None
                latencies.append(job.finished_at - ended[remote])
            r.daemon.stop()
    provider_hooks.ProviderHooks.batch_ended = original  # type: ignore[method-assign]
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--kind", choices=("openai", "gemini"), default="openai")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    latencies = anyio.run(measure, args.jobs, args.kind)
    figures = {
        "kind": args.kind,
        "jobs": len(latencies),
        "end_to_outbox_median_s": round(statistics.median(latencies), 4),
        "end_to_outbox_max_s": round(max(latencies), 4),
        "goal_s": GOAL_S,
        "polling_min_interval_s": SLOW[0],
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"{args.kind}: batch end → outbox, {len(latencies)} jobs, polling every {SLOW[0]:.0f} s or slower: "
        f"median {figures['end_to_outbox_median_s']} s, max {figures['end_to_outbox_max_s']} s "
        f"(goal < {GOAL_S} s); load {figures['load_average']}"
    )


if __name__ == "__main__":
    main()
