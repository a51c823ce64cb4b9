"""What the daemon costs when nothing happens, and with 10,000 jobs in flight.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_idle [--idle-s 180] [--jobs 10000] [--inflight-s 180] [--nothing-due] [--json]

Idle: the real daemon (`python -m batchd run`, a subprocess) with the default
configuration (the embedded local backend, polling 5-60 s, rescans every 30 s),
an empty inbox and no jobs. After a 10 s warm-up, its CPU time (utime + stime
of /proc/<pid>/stat, every thread included) is read at the start and end of
--idle-s seconds and extrapolated to an hour; RSS is VmRSS of /proc/<pid>/status
at the end (VmHWM, the peak, beside it).

In flight: this process serves the emulator (echo engine) on loopback,
PAUSED, so that no batch advances. It uploads one input file and creates
--jobs batches through the Together dialect (they stay VALIDATING), then
inserts one job per batch straight into a fresh state database (state
`validating`, the remote batch bound, next checks spread over the first poll
interval), as the daemon itself would have left them. Then the daemon starts
(provider.kind = "together" at the emulator, default polling 5-60 s, the
metrics listener on) and runs for --inflight-s seconds. Reported: RSS (end and
peak), CPU, the provider calls per minute by kind (from the emulator's own
request counters: list sweeps `GET /v1/batches`, single gets `GET
/v1/batches/{id}`, anything else), and from /metrics the scheduler's tick time
and the poll rounds' duration. The goal (issue 6): under 150 MB, and one list
sweep per poll interval instead of one call per job. Issue 14's goals: with
100,000 jobs (`--jobs 100000 --inflight-s 1800`) under 300 MB and flat; with
`--nothing-due` (every job's first check after the window: what jobs that wait
cost) under 5 % of a core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert

from batchd.backoff import RetryPolicy
from batchd.emulator.app import create_app
from batchd.emulator.server import serve_emulator
from batchd.providers.errors import ProviderError
from batchd.providers.together import TogetherProvider
from batchd.store import Store
from batchd.store import schema as store_tables

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
WARM_UP_S = 10.0


# ---------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" that ends the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


# ---------------------------------------------------------------- the daemon


class Daemon:
    """`python -m batchd run` as a subprocess, JSON logs in a file."""

    def __init__(self, root: Path, config: Path, env: dict[str, str]) -> None:
        self.log_path = root / "daemon.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd", "--config", str(config), "run"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def logs(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    async def until(self, event: str) -> dict[str, Any]:
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
                for entry in self.logs():
                    if entry.get("event") == event:
                        return entry
                await anyio.sleep(0.1)

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(STOP_TIMEOUT_S):
            while self.proc.poll() is None:  # noqa: ASYNC110 - another process: no event to await
                await anyio.sleep(0.05)
        self._log.close()
        return self.proc.returncode


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_") and k != "NOTIFY_SOCKET"}
    env["TOGETHER_API_KEY"] = "bench"
    return env


async def sample(pid: int, seconds: float, every: Callable[[], None] | None = None) -> dict[str, Any]:
    """CPU and memory of `pid` over `seconds`; the peak RSS is sampled once a second, and RSS is
    kept once a minute (`rss_by_minute`: whether it stays flat)."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    peak = 0.0
    by_minute: list[float] = []
    while (elapsed := time.monotonic() - t0) < seconds:
        rss_now = memory_mb(pid)[0]
        peak = max(peak, rss_now)
        if elapsed >= 60 * len(by_minute):
            by_minute.append(round(rss_now, 1))
        if every is not None:
            every()
        await anyio.sleep(min(1.0, seconds - elapsed))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    rss, hwm = memory_mb(pid)
    window = t1 - t0
    return {
        "window_s": round(window, 1),
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_s_per_hour": round((cpu1 - cpu0) * 3600 / window, 1),
        "cpu_percent": round(100 * (cpu1 - cpu0) / window, 2),
        "rss_mb": round(rss, 1),
        "rss_peak_sampled_mb": round(max(peak, rss), 1),
        "vm_hwm_mb": round(hwm, 1),
        "rss_by_minute": [*by_minute, round(rss, 1)],
    }


# ---------------------------------------------------------------- idle


async def bench_idle(root: Path, idle_s: float) -> dict[str, Any]:
    await anyio.Path(root).mkdir()
    config = root / "batchd.toml"
    await anyio.Path(config).write_text('state_dir = "state"\n', encoding="utf-8")
    daemon = Daemon(root, config, daemon_env())
    try:
        await daemon.until("daemon.ready")
        await anyio.sleep(WARM_UP_S)
        result = await sample(daemon.proc.pid, idle_s)
        result["exit_code"] = await daemon.stop()
        return result
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


# ---------------------------------------------------------------- 10,000 jobs in flight


def chat_line(i: int) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]}
    return json.dumps({"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


async def create_batches(url: str, work: Path, count: int) -> tuple[str, Path, list[tuple[str, float]]]:
    """Upload one input file and create `count` batches from it; (file id, its path, [(batch id, created_at)])."""
    import hashlib

    path = work / "input.jsonl"
    path.write_text("".join(chat_line(i) + "\n" for i in range(3)), encoding="utf-8")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    created: list[tuple[str, float]] = []
    async with httpx.AsyncClient(timeout=60) as http:
        provider = TogetherProvider(http, base_url=url, api_key="bench", retry=RetryPolicy(attempts=3))
        file_id = await provider.upload_file(path, filename="input.jsonl", sha256=sha)
        limiter = anyio.CapacityLimiter(32)

        async def one(i: int) -> None:
            async with limiter:
                for attempt in range(5):
                    try:
                        remote = await provider.create_batch(
                            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                            job_id=str(i),
                        )  # fmt: skip
                        break
                    except ProviderError:
                        # A connection dropped under load: the setup only needs a batch per job (a
                        # spare one the daemon never polls is harmless).
                        if attempt == 4:
                            raise
                        await anyio.sleep(1)
                at = remote.created_at.timestamp() if remote.created_at else time.time()
                created.append((remote.id, at))

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return file_id, path, created


def insert_jobs(
    database_url: str, file_id: str, input_path: Path, batches: list[tuple[str, float]], first_check_in_s: float
) -> None:
    """One `validating` job per remote batch, as the daemon leaves a job after binding its batch:
    its next checks spread over the 5 s after `first_check_in_s` from now."""
    store = Store(database_url)
    try:
        store.migrate()
        now = time.time()
        rng = random.Random(6)
        jobs, remotes = [], []
        for n, (remote_id, created_at) in enumerate(batches):
            job_id = uuid.uuid4().hex
            next_check_at = now + first_check_in_s + rng.uniform(0, 5)
            jobs.append(
                {
                    "id": job_id, "name": f"bench-{n:05d}", "source": f"bench-{n:05d}.jsonl", "state": "validating",
                    "provider": "together", "endpoint": "/v1/chat/completions", "upload_path": str(input_path),
                    "request_count": 3, "completion_window": "24h", "metadata": {}, "input_file_id": file_id,
                    "cancel_requested": False, "poll_interval_s": 5.0, "next_check_at": next_check_at,
                    "due_at": next_check_at, "attempts": 0, "created_at": now, "updated_at": now,
                }
            )  # fmt: skip
            remotes.append(
                {
                    "job_id": job_id, "round": 0, "shard": 0, "input_file_id": file_id, "remote_id": remote_id,
                    "status": "validating", "create_attempts": 1, "intent_at": created_at - 1,
                    "remote_created_at": created_at, "updated_at": now,
                }
            )  # fmt: skip
        with store.engine.begin() as conn:
            conn.execute(insert(store_tables.jobs), jobs)
            conn.execute(insert(store_tables.remote_batches), remotes)
    finally:
        store.close()


def request_kinds(counts: dict[str, int]) -> dict[str, int]:
    kinds = {"list": 0, "get": 0, "other": 0}
    for key, n in counts.items():
        if key == "GET /v1/batches":
            kinds["list"] += n
        elif key.startswith("GET /v1/batches/"):
            kinds["get"] += n
        else:
            kinds["other"] += n
    return kinds


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def bench_in_flight(root: Path, jobs: int, inflight_s: float, *, nothing_due: bool) -> dict[str, Any]:
    await anyio.Path(root).mkdir()
    async with (
        serve_emulator(create_app(root / "emulator"), host="127.0.0.1", port=0) as url,
        httpx.AsyncClient(timeout=60) as http,
    ):
        (await http.post(f"{url}/_emulator/pause")).raise_for_status()
        started = time.monotonic()
        file_id, input_path, batches = await create_batches(url, root, jobs)
        setup_s = time.monotonic() - started
        config = root / "batchd.toml"
        config.write_text(
            f'state_dir = "state"\n[provider]\nkind = "together"\nbase_url = "{url}"\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n',
            encoding="utf-8",
        )
        await anyio.to_thread.run_sync(
            insert_jobs,
            f"sqlite:///{root / 'state' / 'batchd.db'}",
            file_id,
            input_path,
            batches,
            # Nothing due: every first check after the window (what the jobs cost while they wait).
            inflight_s + 3600 if nothing_due else 0.0,
        )
        before = (await http.get(f"{url}/_emulator/stats")).json()["requests"]
        daemon = Daemon(root, config, daemon_env())
        try:
            metrics_url = (await daemon.until("metrics.listening"))["url"]
            await daemon.until("daemon.ready")
            ready_at = time.monotonic()
            usage = await sample(daemon.proc.pid, inflight_s)
            window_min = (time.monotonic() - ready_at) / 60
            after = (await http.get(f"{url}/_emulator/stats")).json()["requests"]
            scraped = metric_values((await http.get(f"{metrics_url}/metrics", timeout=60)).text)
            usage["exit_code"] = await daemon.stop()
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
    calls = request_kinds({k: after.get(k, 0) - before.get(k, 0) for k in after})

    def value(name: str, **labels: str) -> float:
        return scraped.get((name, tuple(sorted(labels.items()))), 0.0)

    ticks = value("batchd_scheduler_tick_duration_seconds_count")
    sweeps = value("batchd_poll_duration_seconds_count", mode="sweep")
    return {
        "jobs": jobs,
        "nothing_due": nothing_due,
        "setup_s": round(setup_s, 1),
        **usage,
        "calls": calls,
        "calls_per_minute": {k: round(v / window_min, 1) for k, v in calls.items()},
        "scheduler_ticks": int(ticks),
        "tick_mean_s": round(value("batchd_scheduler_tick_duration_seconds_sum") / ticks, 3) if ticks else None,
        "sweep_rounds_finished": int(sweeps),
        "sweep_round_mean_s": (
            round(value("batchd_poll_duration_seconds_sum", mode="sweep") / sweeps, 2) if sweeps else None
        ),
        "jobs_by_state": {
            dict(labels)["state"]: int(v) for (name, labels), v in scraped.items() if name == "batchd_jobs" and v
        },
    }


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="batchd-bench-idle-"))
    try:
        results: dict[str, Any] = {}
        if args.idle_s > 0:
            results["idle"] = await bench_idle(root / "idle", args.idle_s)
            idle = results["idle"]
            print(f"idle: {json.dumps(idle)}", flush=True)
            print(f"idle: {idle['cpu_s_per_hour']} CPU-s per hour, RSS {idle['rss_mb']} MB", flush=True)
        if args.jobs > 0:
            found = await bench_in_flight(root / "in-flight", args.jobs, args.inflight_s, nothing_due=args.nothing_due)
            results["in_flight"] = found
            print(f"in flight: {json.dumps(found)}", flush=True)
            print(
                f"in flight, {args.jobs} jobs{' (nothing due)' if args.nothing_due else ''}:"
                f" RSS {found['rss_mb']} MB (peak {found['rss_peak_sampled_mb']}; goal < 300 MB at 100,000"
                f" jobs, < 150 MB at 10,000), CPU {found['cpu_percent']} % of a core"
                f" (goal while nothing is due: < 5 %), list sweeps/min {found['calls_per_minute']['list']},"
                f" gets/min {found['calls_per_minute']['get']}, mean tick {found['tick_mean_s']} s",
                flush=True,
            )
            print(f"in flight: RSS once a minute (MB): {found['rss_by_minute']}", flush=True)
        return results
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    # The emulator logs every batch it creates; only problems are of interest here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--idle-s", type=float, default=180.0, help="idle window in seconds (0: skip)")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in flight (0: skip)")
    parser.add_argument("--inflight-s", type=float, default=180.0, help="window with the jobs in flight")
    parser.add_argument(
        "--nothing-due", action="store_true", help="the jobs' first checks fall after the window (the cost of waiting)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    args = parser.parse_args(argv)
    results = anyio.run(run, args)
    if args.json:
        print(json.dumps(results, indent=2))
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    ok = all(r.get("exit_code") == 0 for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
