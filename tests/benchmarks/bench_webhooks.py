"""Webhook delivery: terminal transition -> webhook received, and deliveries per second.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_webhooks [--jobs 100] [--events 2000] [--runs 3] [--json]

Two measurements, each against the issue's goal:

* latency (goal: median under 50 ms once the job is terminal locally). The real
  daemon runs as a subprocess (`python -m batchd --config X run`, the embedded
  local backend, JSON logs to a file) with one [[webhooks]] endpoint: a receiver
  served in this process on loopback that notes `time.time()` when each request
  arrives. --jobs files are renamed into the inbox one at a time, each after the
  previous job's webhook arrived. Per job, two latencies: from `finished_at` in
  the store (taken just before job.json is written and the terminal transition
  commits with its event), and from the `job.finished` log line (written right
  after that commit). Their difference is the cost of job.json and the commit.

* throughput (goal, issue #14: at least 1,000 deliveries a second to one fast
  receiver, signing on; it was over 500 before). --events
  events are inserted through the Store the way terminal transitions insert them
  (one job and its event per transaction), then the daemon's Deliverer, with an
  HTTP client set up as the daemon sets it up and its log lines written as JSON
  to a file, drains them to a receiver that runs in a process of its own (so its
  CPU is not counted here). Reported per run: deliveries per second from the
  Deliverer's start until the last outcome is committed, and the CPU time this
  process spent per delivery, which depends far less on how busy the machine is
  than the rate does (1000 / that is the rate one free core would sustain).
  --runs repeats it on a fresh database.

The load average is printed with the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import structlog
from starlette.types import Receive, Scope, Send

from batchd import logs as batchd_logging
from batchd.asgi_server import EmbeddedServer
from batchd.config import load_settings
from batchd.emulator.server import serve_emulator
from batchd.models import JobState
from batchd.store import Store
from batchd.webhooks import Deliverer, build_event
from batchd.webhooks.transport import webhook_client
from tests.benchmarks.bench_intake_latency import (
    daemon_env,
    log_wall,
    machine,
    read_log,
    rename_in,
    stage,
    summary,
    wait_for_log,
)
from tests.store_helpers import add_job

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LATENCY_GOAL_MS = 50.0
THROUGHPUT_GOAL = 1000.0
#: Seconds for one job's webhook to arrive (or the daemon to start) before giving up.
STEP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


# ---------------------------------------------------------------- receivers


@dataclass
class Arrival:
    wall: float
    event: dict[str, Any]


@dataclass
class LatencyReceiver:
    """ASGI: answers 204 and notes when each event arrived (headers parsed, before the body)."""

    arrivals: list[Arrival] = field(default_factory=list)
    _arrived: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        wall = time.time()
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        self.arrivals.append(Arrival(wall, json.loads(body)))
        self._arrived.set()
        self._arrived = anyio.Event()

    async def wait_for(self, name: str, timeout: float) -> Arrival:
        with anyio.fail_after(timeout):
            while True:
                for arrival in self.arrivals:
                    if arrival.event["data"]["name"] == name:
                        return arrival
                await self._arrived.wait()


def serve_fast_receiver() -> None:
    """The throughput receiver (`--receiver`, in its own process): prints its port, then on SIGTERM
    how many requests it answered over how many connections."""
    import socket

    import uvicorn

    requests = 0
    clients: set[tuple[str, int]] = set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal requests
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        requests += 1
        clients.add(tuple(scope["client"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    server = EmbeddedServer(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    # uvicorn's own handler would raise SIGTERM again once stopped, before the counts are printed.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    print(json.dumps({"requests": requests, "connections": len(clients)}), flush=True)


# ---------------------------------------------------------------- latency: the real daemon


def write_latency_config(root: Path, hook_url: str) -> Path:
    config = root / "batchd.toml"
    config.write_text(
        f"""state_dir = "{root / "state"}"

[polling]
min_interval_s = 0.2
max_interval_s = 0.5

[inbox]
settle_s = 0.2

[[webhooks]]
url = "{hook_url}"
secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    return config


@dataclass
class LatencyResult:
    from_finished_at_s: list[float]
    from_log_s: list[float]
    #: finished_at -> job.finished log line: job.json written, the terminal transition committed
    commit_s: list[float]
    daemon_exit: int


async def run_latency(root: Path, jobs: int, daemon_log: IO[bytes]) -> LatencyResult:
    receiver = LatencyReceiver()
    log_path = Path(daemon_log.name)
    inbox = root / "state" / "inbox"
    names: list[str] = []
    async with serve_emulator(receiver) as url:
        config = write_latency_config(root, url + "/hook")
        command = [sys.executable, "-m", "batchd", "--config", str(config), "run"]
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT, env=daemon_env()
        )
        try:
            await wait_for_log(log_path, "daemon.ready", process, STEP_TIMEOUT_S)
            await anyio.Path(inbox).mkdir(parents=True, exist_ok=True)
            for index in range(jobs):
                tmp, final = await stage(inbox, "hook", index, 1)
                rename_in(index, tmp, final)
                names.append(final.stem)
                await receiver.wait_for(final.stem, STEP_TIMEOUT_S)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(STOP_TIMEOUT_S):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    store = Store(f"sqlite:///{root / 'state' / 'batchd.db'}")
    try:
        finished = {job.id: job.finished_at for job in store.jobs.select()}
    finally:
        store.close()
    logged = {
        str(r["job_id"]): log_wall(r) for r in await anyio.to_thread.run_sync(read_log, log_path)
        if r.get("event") == "job.finished"
    }  # fmt: skip
    first: dict[str, float] = {}
    for arrival in receiver.arrivals:
        first.setdefault(arrival.event["data"]["id"], arrival.wall)
    from_db, from_log, commit = [], [], []
    for job_id, arrived in first.items():
        finished_at = finished.get(job_id)
        if finished_at is None or job_id not in logged:
            raise RuntimeError(f"job {job_id}: no finished_at or no job.finished line; see {log_path}")
        from_db.append(arrived - finished_at)
        from_log.append(arrived - logged[job_id])
        commit.append(logged[job_id] - finished_at)
    if len(first) != jobs:
        raise RuntimeError(f"{len(first)} of {jobs} jobs' webhooks arrived")
    code = process.returncode
    return LatencyResult(from_db, from_log, commit, -1 if code is None else code)


# ---------------------------------------------------------------- throughput: the Deliverer


@dataclass
class ThroughputRun:
    events: int
    insert_s: float
    drain_s: float
    cpu_s: float
    delivered: int
    received: int
    connections: int

    @property
    def rate(self) -> float:
        return self.delivered / self.drain_s

    @property
    def cpu_ms_per_delivery(self) -> float:
        return self.cpu_s / max(self.delivered, 1) * 1000


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_throughput(root: Path, events: int) -> ThroughputRun:
    receiver = await anyio.open_process(
        [sys.executable, "-m", "tests.benchmarks.bench_webhooks", "--receiver"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        with anyio.fail_after(STEP_TIMEOUT_S):
            port = int((await receiver.stdout.receive()).decode().split()[0])
        config = root / "batchd.toml"
        config.write_text(
            f'state_dir = "{root / "state"}"\n\n[[webhooks]]\nurl = "http://127.0.0.1:{port}/hook"\n'
            f'secret = "{SECRET}"\n',
            encoding="utf-8",
        )
        settings = load_settings(config, environ={})
        store = Store(settings.database_url)
        try:
            store.migrate()
            start = time.perf_counter()
            for index in range(events):
                data = {"id": f"job-{index}", "name": f"bench-{index}", "status": "completed"}
                event = build_event(settings, "batch.completed", data, now=time.time(), job_webhook_url=None)
                add_job(store, f"job-{index}", f"bench-{index}", state=JobState.COMPLETED, events=[event])
            insert_s = time.perf_counter() - start
            async with webhook_client() as http:
                deliverer = Deliverer(store, lambda: settings, http, rng=random.Random(1))
                cpu0, start = cpu_seconds(), time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(deliverer.serve, tg)
                    with anyio.fail_after(STEP_TIMEOUT_S + events / 50):
                        # The Deliverer signals nothing when it is done: ask the store, as `run --once` does.
                        while await anyio.to_thread.run_sync(store.deliveries.pending_count):  # noqa: ASYNC110
                            await anyio.sleep(0.05)
                    drain_s, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu0
                    tg.cancel_scope.cancel()
            delivered = sum(1 for d in store.deliveries.select() if d.state == "delivered")
        finally:
            store.close()
    finally:
        with anyio.CancelScope(shield=True):
            if receiver.returncode is None:
                receiver.send_signal(signal.SIGTERM)
                with anyio.move_on_after(STOP_TIMEOUT_S):
                    await receiver.wait()
            if receiver.returncode is None:
                receiver.kill()
                await receiver.wait()
    assert receiver.stdout is not None
    tail = b""
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            tail += await receiver.stdout.receive()
    counts = json.loads(tail.decode().strip().splitlines()[-1]) if tail.strip() else {}
    return ThroughputRun(
        events=events,
        insert_s=insert_s,
        drain_s=drain_s,
        cpu_s=cpu_s,
        delivered=delivered,
        received=int(counts.get("requests", -1)),
        connections=int(counts.get("connections", -1)),
    )


# ---------------------------------------------------------------- output


def verdict(met: bool) -> str:
    return "goal met" if met else "GOAL MISSED"


def report(latency: LatencyResult | None, runs: Sequence[ThroughputRun], host: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": host}
    if latency is not None:
        result["latency"] = {
            "from_finished_at": summary(latency.from_finished_at_s),
            "from_job_finished_log": summary(latency.from_log_s),
            "finished_at_to_log": summary(latency.commit_s),
            "daemon_exit": latency.daemon_exit,
            "goal_ms": LATENCY_GOAL_MS,
        }
    if runs:
        rates = sorted(r.rate for r in runs)
        result["throughput"] = {
            "runs": [
                {
                    "events": r.events,
                    "deliveries_per_s": round(r.rate, 1),
                    "drain_s": round(r.drain_s, 3),
                    "cpu_ms_per_delivery": round(r.cpu_ms_per_delivery, 3),
                    "inserts_per_s": round(r.events / r.insert_s, 1),
                    "delivered": r.delivered,
                    "received": r.received,
                    "connections": r.connections,
                }
                for r in runs
            ],
            "median_deliveries_per_s": round(rates[len(rates) // 2], 1),
            # What one core of its own would sustain at the measured CPU cost (the receiver on another).
            "cpu_bound_per_s": round(1000 / statistics.median(r.cpu_ms_per_delivery for r in runs), 1),
            "goal_per_s": THROUGHPUT_GOAL,
        }
    return result


def print_report(data: dict[str, Any]) -> None:
    row = "  {:<58} {:>4} {:>8} {:>8} {:>8} {:>8}"
    if "latency" in data:
        lat = data["latency"]
        print("webhook latency: terminal transition -> webhook received (real daemon, loopback), ms")
        print(row.format("measured from", "n", "median", "p90", "p99", "max"))
        for key, label in (
            ("from_finished_at", "finished_at in the store"),
            ("from_job_finished_log", "the job.finished log line (after the commit)"),
            ("finished_at_to_log", "  of which: finished_at -> job.finished (job.json, commit)"),
        ):
            s = lat[key]
            print(row.format(label, s["n"], *(f"{s[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms", "max_ms"))))
        met = lat["from_finished_at"]["median_ms"] < LATENCY_GOAL_MS
        print(
            f"  goal: median under {LATENCY_GOAL_MS:g} ms -> {verdict(met)}; daemon exit {lat['daemon_exit']}"
            f" (load average {' '.join(f'{x:.2f}' for x in data['machine']['loadavg_1_5_15'])})"
        )
    if "throughput" in data:
        thr = data["throughput"]
        print("\nwebhook throughput: events to one fast receiver (its own process), drained by the Deliverer")
        for r in thr["runs"]:
            print(
                f"  {r['events']} events: {r['deliveries_per_s']:.0f} deliveries/s ({r['drain_s']:.2f} s), "
                f"CPU {r['cpu_ms_per_delivery']:.2f} ms per delivery, {r['received']} requests received over "
                f"{r['connections']} connections (inserted at {r['inserts_per_s']:.0f}/s)"
            )
        met = thr["median_deliveries_per_s"] >= THROUGHPUT_GOAL
        print(
            f"  median {thr['median_deliveries_per_s']:.0f}/s; goal: at least {THROUGHPUT_GOAL:g}/s -> {verdict(met)}"
            f" (load average {' '.join(f'{x:.2f}' for x in data['machine']['loadavg_1_5_15'])})"
        )
        print(
            f"  at the median CPU cost, a core of its own would deliver {thr['cpu_bound_per_s']:.0f}/s "
            "(the rate depends on the machine's load; this does not)"
        )
    host = data["machine"]
    print(f"\nmachine: {host['cpus']} CPUs, load average {host['loadavg_1_5_15']}, Python {host['python']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100, help="latency: jobs, one at a time (default 100; 0 skips)")
    parser.add_argument("--events", type=int, default=2000, help="throughput: events per run (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="throughput: runs (default 3; 0 skips)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", type=Path, help="use (and keep) this folder, e.g. to read the logs")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver:
        serve_fast_receiver()
        return 0
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder must be new or empty")
    root = args.keep or Path(tempfile.mkdtemp(prefix="batchd-bench-webhooks-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        latency = None
        if args.jobs > 0:
            (root / "latency").mkdir()
            # The receiver runs in this loop and logs nothing worth reading.
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
            with (root / "latency" / "daemon.log").open("wb") as daemon_log:
                latency = anyio.run(run_latency, root / "latency", args.jobs, daemon_log)
        runs = []
        with (root / "deliverer.log").open("w", encoding="utf-8") as log_file:
            # The Deliverer logs as the daemon does: a JSON line per delivery (to journald there).
            with contextlib.redirect_stdout(log_file):
                batchd_logging.configure(json=True)
            for index in range(args.runs):
                folder = root / f"throughput-{index}"
                folder.mkdir()
                runs.append(anyio.run(run_throughput, folder, args.events))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    data = report(latency, runs, machine())
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_report(data)
    broken = (latency is not None and latency.daemon_exit != 0) or any(
        r.delivered != r.events or r.received != r.events for r in runs
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
