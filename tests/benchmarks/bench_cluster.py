"""Throughput of intake → create with 1, 2 and 3 daemons on PostgreSQL beside one daemon on
SQLite, and the failover time after a kill (issue 8's figures). Not part of the test command.

    python -m tests.benchmarks.bench_cluster [--files 300] [--lease 10]

Every run uses the emulator (Together dialect) in this process, the real `batchd run`
daemons as subprocesses sharing one inbox and outbox, and a fresh database. Throughput:
`--files` files are renamed into the inbox at once; the figure is files / (last create
received − first rename). Failover: three daemons on PostgreSQL with `--lease` seconds
of lease, the emulator paused so every job stays in flight; the daemon holding the most
jobs is SIGKILLed and the time until the others hold all of its jobs is measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio

from batchd.store import Store
from tests import databases
from tests.acceptance.conftest import DaemonProcess, Harness, Workspace, chat, eventually, harness
from tests.acceptance.test_cluster import cluster


def _homes(h: Harness, count: int, lease_s: float) -> list[Workspace]:
    homes = cluster(h, count)
    for home in homes:
        home.config.write_text(home.config.read_text().replace("lease_s = 2.0", f"lease_s = {lease_s}"))
    return homes


async def throughput(kind: str, daemons: int, files: int, lease_s: float) -> dict[str, float]:
    dbs = databases.begin_test(kind)
    try:
        with tempfile.TemporaryDirectory(prefix="batchd-cluster-") as tmp:
            async with harness(Path(tmp)) as h:
                procs = [DaemonProcess(home) for home in _homes(h, daemons, lease_s)]
                h.daemons.extend(procs)
                for d in procs:
                    await d.until_logged("daemon.ready")
                started = time.time()
                for i in range(files):
                    h.ws.drop(f"t{i:04d}.jsonl", [chat(f"t{i}")])

                async def created() -> int:
                    return len(await h.emulator.creates())

                with anyio.fail_after(600):
                    while await created() < files:  # noqa: ASYNC110 - the daemons are other processes
                        await anyio.sleep(0.05)
                elapsed = time.time() - started
                assert await created() == files
                return {"jobs_per_s": round(files / elapsed, 1), "seconds": round(elapsed, 2)}
    finally:
        dbs.drop_all()
        databases._current = None


async def failover(files: int, lease_s: float) -> dict[str, float]:
    dbs = databases.begin_test(databases.POSTGRESQL)
    try:
        with tempfile.TemporaryDirectory(prefix="batchd-failover-") as tmp:
            async with harness(Path(tmp)) as h:
                await h.emulator.control("POST", "pause")
                procs = [DaemonProcess(home) for home in _homes(h, 3, lease_s)]
                h.daemons.extend(procs)
                for d in procs:
                    await d.until_logged("daemon.ready")
                for i in range(files):
                    h.ws.drop(f"f{i:04d}.jsonl", [chat(f"f{i}")])
                await eventually(lambda: sum(len(d.logs_named("job.batch_created")) for d in procs) >= files, 300)
                store = Store(h.ws.database_url)
                try:
                    owners = Counter(job.owner for job in store.jobs.live())
                    victim_id, held = owners.most_common(1)[0]
                    victim = next(d for d in procs if d.logs_named("daemon.registered")[0]["daemon_id"] == victim_id)
                    victim.proc.kill()
                    killed = time.monotonic()
                    await eventually(lambda: not any(j.owner == victim_id for j in store.jobs.live()), 300)
                    took = time.monotonic() - killed
                finally:
                    store.close()
                return {"jobs_taken_over": held, "failover_s": round(took, 2), "lease_s": lease_s}
    finally:
        dbs.drop_all()
        databases._current = None


async def main_async(files: int, lease_s: float) -> None:
    report: dict[str, object] = {}
    report["sqlite_1"] = await throughput(databases.SQLITE, 1, files, lease_s)
    for n in (1, 2, 3):
        report[f"postgresql_{n}"] = await throughput(databases.POSTGRESQL, n, files, lease_s)
    report["failover"] = await failover(60, lease_s)
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--lease", type=float, default=10.0)
    args = parser.parse_args()
    anyio.run(main_async, args.files, args.lease)


if __name__ == "__main__":
    main()
