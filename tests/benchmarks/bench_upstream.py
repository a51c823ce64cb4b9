"""Upstream engine throughput: the emulator's batches against a server that answers at once.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_upstream [--requests 5000] [--concurrency 16] [--rounds 3] [--json]

What is measured: requests per second through `UpstreamEngine` at the default
concurrency (16, `[local] concurrency`), beside the same server driven
directly by a plain asyncio + httpx loop with as many requests in flight. The
goal (issue #14) is at least 90 % of the plain loop (it was 80 % before).

How: the upstream is a minimal OpenAI-compatible ASGI app (it answers
`POST /v1/chat/completions` at once with a small chat completion) served by
uvicorn in a subprocess, so its CPU is not this process's. Each round runs,
one after the other over the same keep-alive-capable httpx client settings:

* plain: `--concurrency` asyncio tasks POST every request body and parse the
  JSON answer;
* emulator: the whole batch path in this process: `create_app` with an
  `UpstreamEngine(http, url, concurrency)`, the input uploaded through the
  OpenAI dialect (not timed), then timed from `POST /openai/v1/batches` to
  the batch reading `completed`: validation, every request through the
  engine, each answer fsynced into the spool, the result files written and
  installed. The emulator is reached in-process (`httpx.ASGITransport`);
  its status is polled every 100 ms (a few hundredths of the run).

Both sides send the same request bodies. Output: requests/s of each side per
round, the best and the median, and the ratio of medians; beside them the CPU
time this process spent per request (all threads: the spool's fsyncs
included), which a busy machine disturbs less than wall-clock rates. Read the
rates with the load average printed at the end (the machine may be shared).
Against a server this fast, httpx's own cost per request dominates both sides
and grows with the requests in flight (its pool checks every idle connection
on each request): the same plain loop runs faster at 4 than at 16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from starlette.types import Receive, Scope, Send

from batchd.emulator import UpstreamEngine, create_app, serve_emulator
from tests.integration.emulator_helpers import BearerAuth, openai_upload, request_line, to_jsonl

DEFAULT_CONCURRENCY = 16
#: The emulator's rate over the plain loop's (medians), issue #14.
GOAL_RATIO = 0.90


async def instant_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """A minimal OpenAI-compatible server: every chat completion is answered at once."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = json.loads(body)["messages"][-1]["content"]
    reply = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_764_100_000,
            "model": "bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": reply})


async def _serve_forever() -> None:
    async with serve_emulator(instant_upstream) as url:
        print(url, flush=True)
        await anyio.sleep_forever()


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    """The upstream server in its own process; its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.bench_upstream", "--serve"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"the upstream server did not start (said {url!r})")
    return proc, url


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds, and this process's CPU seconds (all its threads) in the same span."""

    wall_s: float
    cpu_s: float


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> Timing:
    wall, cpu = clocks()
    return Timing(wall - start[0], cpu - start[1])


async def plain_loop(url: str, bodies: list[dict[str, Any]], concurrency: int) -> Timing:
    """Time for `concurrency` tasks to send every body and read every answer."""
    queue = iter(bodies)
    async with httpx.AsyncClient() as http:

        async def worker() -> None:
            for body in queue:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                response.json()

        started = clocks()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return since(started)


async def through_emulator(url: str, data: bytes, concurrency: int, data_dir: Path) -> Timing:
    """Time from the batch create to `completed`, the emulator forwarding to `url`."""
    async with httpx.AsyncClient() as upstream_http:
        app = create_app(data_dir, engine=UpstreamEngine(upstream_http, url, concurrency))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://emulator", auth=BearerAuth("bench")
            ) as client,
        ):
            file_id = await openai_upload(client, data)
            started = clocks()
            answer = await client.post(
                "/openai/v1/batches",
                json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            )
            batch_id = answer.json()["id"]
            while True:
                batch = (await client.get(f"/openai/v1/batches/{batch_id}")).json()
                if batch["status"] not in ("validating", "in_progress", "finalizing"):
                    break
                await anyio.sleep(0.1)
            elapsed = since(started)
            counts = batch["request_counts"]
            if batch["status"] != "completed" or counts["completed"] != counts["total"]:
                raise RuntimeError(f"the batch did not complete cleanly: {batch}")
            return elapsed


async def bench(requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    lines = [request_line(f"req-{i:05d}", f"question {i}") for i in range(requests)]
    bodies = [line["body"] for line in lines]
    data = to_jsonl(lines)
    proc, url = start_upstream()
    plain: list[Timing] = []
    emulated: list[Timing] = []
    try:
        await plain_loop(url, bodies[: min(500, requests)], concurrency)  # warm-up: connections, imports
        with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
            for number in range(rounds):
                plain.append(await plain_loop(url, bodies, concurrency))
                emulated.append(await through_emulator(url, data, concurrency, Path(tmp) / f"round-{number}"))
                print(
                    f"round {number + 1}: plain {requests / plain[-1].wall_s:6.0f} req/s"
                    f" ({1e6 * plain[-1].cpu_s / requests:4.0f} µs CPU/request),"
                    f" emulator {requests / emulated[-1].wall_s:6.0f} req/s"
                    f" ({1e6 * emulated[-1].cpu_s / requests:4.0f} µs CPU/request)"
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    plain_rate = [requests / t.wall_s for t in plain]
    emulated_rate = [requests / t.wall_s for t in emulated]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "plain_req_s": plain_rate,
        "emulator_req_s": emulated_rate,
        "plain_cpu_us_per_request": [1e6 * t.cpu_s / requests for t in plain],
        "emulator_cpu_us_per_request": [1e6 * t.cpu_s / requests for t in emulated],
        "ratio_of_medians": statistics.median(emulated_rate) / statistics.median(plain_rate),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the upstream subprocess
    args = parser.parse_args()
    # Info logs would only add noise (and the server's stdout carries its URL); warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if args.serve:
        anyio.run(_serve_forever)
        return
    result = anyio.run(bench, args.requests, args.concurrency, args.rounds)
    plain, emulated = result["plain_req_s"], result["emulator_req_s"]
    print(f"\n{args.requests} requests, concurrency {args.concurrency}, {args.rounds} rounds")
    print(f"plain asyncio+httpx loop: best {max(plain):.0f} req/s, median {statistics.median(plain):.0f} req/s")
    print(f"emulator upstream engine: best {max(emulated):.0f} req/s, median {statistics.median(emulated):.0f} req/s")
    ratio = result["ratio_of_medians"]
    verdict = "goal met" if ratio >= GOAL_RATIO else "GOAL MISSED"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"emulator / plain (medians): {ratio:.0%}; goal: at least {GOAL_RATIO:.0%} -> {verdict} (load {load})")
    plain_cpu = statistics.median(result["plain_cpu_us_per_request"])
    emulated_cpu = statistics.median(result["emulator_cpu_us_per_request"])
    print(f"CPU of this process per request (medians): plain {plain_cpu:.0f} µs, emulator {emulated_cpu:.0f} µs")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, CPUs: {os.cpu_count()}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
