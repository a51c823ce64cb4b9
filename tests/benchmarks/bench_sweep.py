"""A sweep's list call on an account with a long history: the newest batches only, or every page.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_sweep [--history 20000] [--wanted 100] [--rounds 3] [--json]

The account: --history completed batches, a day old and older (written straight into the
emulator's data dir, `seed_history`), then --wanted new batches created over HTTP, as a
daemon with that many jobs in flight would have them. The emulator runs in a subprocess
(real loopback HTTP), so the CPU time measured here is the client's alone.

For each dialect (OpenAI: newest-first pages of 100 with the `after` cursor; Together:
one bare array), each round times the same question two ways:

* full: `list_batches()`, then the wanted ones picked out (what a sweep did before #14);
* sweep: `list_batches(wanted=…, since=…)`, `since` being the oldest wanted batch's creation
  less `lifecycle.CLOCK_SKEW_S`, as the daemon passes it.

Reported per mode: the list requests the emulator served (its own counters), the wall time
and this process's CPU time (medians over the rounds), and the batches returned. Wall time
includes the emulator's serving; read it with the load average printed at the end (the
machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from batchd.backoff import RetryPolicy
from batchd.emulator import create_app, serve_emulator
from batchd.lifecycle import CLOCK_SKEW_S
from batchd.models import RemoteBatch
from batchd.providers.base import Provider
from batchd.providers.openai import OpenAIProvider
from batchd.providers.together import TogetherProvider
from tests.integration.emulator_helpers import request_line, seed_history, to_jsonl

LIST_PATHS = {"openai": "GET /openai/v1/batches", "together": "GET /v1/batches"}
START_TIMEOUT_S = 300.0


async def _serve_forever(data_dir: Path) -> None:
    async with serve_emulator(create_app(data_dir)) as url:
        print(url, flush=True)
        await anyio.sleep_forever()


def start_emulator(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """The emulator over `data_dir` in its own process (it loads the history at start); its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bench_sweep", "--serve", str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"the emulator did not start (said {url!r})")
    return proc, url


async def served(control: httpx.AsyncClient, key: str) -> int:
    counts: dict[str, int] = (await control.get("/_emulator/stats")).json()["requests"]
    return counts.get(key, 0)


async def create_wanted(provider: Provider, folder: Path, count: int) -> list[RemoteBatch]:
    data = to_jsonl([request_line("a")])
    source = folder / "in.jsonl"
    source.write_bytes(data)
    file_id = await provider.upload_file(source, filename="in.jsonl", sha256=hashlib.sha256(data).hexdigest())
    return [
        await provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id=f"job-{i}"
        )
        for i in range(count)
    ]


async def measure(
    control: httpx.AsyncClient, key: str, call: Callable[[], Awaitable[list[RemoteBatch]]]
) -> dict[str, float]:
    before = await served(control, key)
    wall, cpu = time.perf_counter(), time.process_time()
    found = await call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"requests": await served(control, key) - before, "wall_s": wall, "cpu_s": cpu, "returned": len(found)}


async def bench(history: int, wanted_count: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"history": history, "wanted": wanted_count, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        data_dir = Path(tmp) / "emulator"
        started = time.perf_counter()
        # Records are dialect-neutral: both dialects list every batch.
        seed_history(data_dir, history, newest=datetime.now(UTC) - timedelta(days=1))
        proc, url = start_emulator(data_dir)
        print(f"history of {history} batches seeded and loaded in {time.perf_counter() - started:.1f} s")
        try:
            async with (
                httpx.AsyncClient(base_url=url, trust_env=False, timeout=120) as control,
                httpx.AsyncClient(trust_env=False, timeout=120) as http,
            ):
                # Nothing runs: the wanted batches stay where they are while they are listed.
                await control.post("/_emulator/pause")
                providers: dict[str, Provider] = {
                    "openai": OpenAIProvider(http, base_url=f"{url}/openai/v1", api_key="k", retry=RetryPolicy()),
                    "together": TogetherProvider(http, base_url=url, api_key="k", retry=RetryPolicy()),
                }
                new = await create_wanted(providers["openai"], Path(tmp), wanted_count)
                ids = {b.id for b in new}
                since = min(b.created_at for b in new if b.created_at is not None) - timedelta(seconds=CLOCK_SKEW_S)
                for dialect, provider in providers.items():
                    key = LIST_PATHS[dialect]

                    async def full(provider: Provider = provider) -> list[RemoteBatch]:
                        return [b for b in await provider.list_batches() if b.id in ids]

                    async def sweep(provider: Provider = provider) -> list[RemoteBatch]:
                        return await provider.list_batches(wanted=ids, since=since)

                    runs: dict[str, list[dict[str, float]]] = {"full": [], "sweep": []}
                    for _ in range(rounds):
                        runs["full"].append(await measure(control, key, full))
                        runs["sweep"].append(await measure(control, key, sweep))
                    results[dialect] = {
                        mode: {
                            "requests": int(statistics.median(r["requests"] for r in rs)),
                            "returned": int(statistics.median(r["returned"] for r in rs)),
                            "wall_s": statistics.median(r["wall_s"] for r in rs),
                            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                        }
                        for mode, rs in runs.items()
                    }
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=20_000)
    parser.add_argument("--wanted", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the emulator subprocess
    args = parser.parse_args()
    # Info logs would only add noise (and the server's stdout carries its URL); warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if args.serve:
        anyio.run(_serve_forever, args.serve)
        return
    result = anyio.run(bench, args.history, args.wanted, args.rounds)
    print(f"\n{args.history} old batches + {args.wanted} wanted (the newest); medians of {args.rounds} rounds")
    for dialect in ("openai", "together"):
        for mode in ("full", "sweep"):
            r = result[dialect][mode]
            print(
                f"{dialect:8} {mode:5}: {r['requests']:4d} list requests, {r['wall_s'] * 1000:8.1f} ms wall,"
                f" {r['cpu_s'] * 1000:7.1f} ms CPU here, {r['returned']} returned"
            )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, CPUs: {os.cpu_count()}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
