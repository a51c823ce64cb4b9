"""Kill the real daemon with SIGKILL over and over, restart it each time, then prove
nothing was lost and nothing happened twice. Used by the CI test (a fixed seed, a few
dozen kills) and by the stress benchmark (hundreds of jobs, a thousand kills)."""

from __future__ import annotations

import json
import random
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy.engine import make_url

from batchd.crashpoints import ENV
from batchd.request_rules import id_key
from tests.acceptance.conftest import (
    DaemonProcess,
    Harness,
    chat,
    eventually,
    gemini,
    message,
    read_jsonl,
    use_anthropic,
    use_gemini,
)
from tests.databases import is_sqlite

#: Every place the daemon can be stopped dead on purpose, in pipeline order. A fresh file
#: is dropped before each so that the point is certainly reached.
CRASH_POINTS = (
    "after_claim",
    "after_upload_answer",
    "after_create_answer",
    "after_download",
    "after_job_json",
    "after_webhook_sent",
)
#: ...and where only packed files go: between the split of a pack's answers and its files' ends.
PACK_CRASH_POINTS = ("after_pack_split",)


@dataclass
class Outcome:
    kills: int = 0
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: requests per remote batch (None: the provider's limit, one batch per file here)
    shard_size: int | None = None
    #: "together", "anthropic" or "gemini": the provider's dialect (and the format of the request lines)
    dialect: str = "together"
    #: files taken in one go share remote batches ([inbox] pack_max_requests): each file is one batch's share
    packed: bool = False

    def shards(self, name: str) -> int:
        count = len(self.files[name])
        return 1 if self.shard_size is None else -(-count // self.shard_size)


def integrity_ok(database_url: str) -> bool:
    """SQLite's integrity_check of the file the killed daemon wrote.

    On PostgreSQL there is nothing to check here: the server, not the killed client, writes its
    files, and a killed client's open transaction is rolled back by the server.
    """
    if not is_sqlite(database_url):
        return True
    conn = sqlite3.connect(make_url(database_url).database or "")
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone() == ("ok",))
    finally:
        conn.close()


def _requests(name: str, rng: random.Random, dialect: str) -> list[dict[str, Any]]:
    line = {"anthropic": message, "gemini": gemini}.get(dialect, chat)
    count = rng.randint(1, 6)
    lines = [line(f"{name}-{k}", f"{name} request {k}") for k in range(count)]
    if rng.random() < 0.2:
        # A request the provider fails for good: still a completed job, the error accounted.
        lines[0] = line(f"{name}-0", trigger={"error": "invalid_model"})
    return lines


async def _until_dead(daemon: DaemonProcess, timeout: float) -> int:
    await eventually(lambda: daemon.proc.poll() is not None, timeout)
    return await daemon.wait()


async def run(
    h: Harness,
    *,
    jobs: int,
    random_kills: int,
    seed: int,
    max_kill_delay_s: float = 0.6,
    shard_size: int | None = None,
    dialect: str = "together",
    packed: bool = False,
) -> Outcome:
    """Drop `jobs` files, kill at every crash point and `random_kills` random moments, then drain.

    With `shard_size`, every file of more requests than that is cut into several remote batches.
    With `dialect="anthropic"` (or "gemini"), the provider is the emulator's Anthropic (or
    Gemini) dialect. With `packed`, small files taken in one go share remote batches (every file
    here is small: the first daemon takes the `jobs` files together).
    """
    rng = random.Random(seed)
    out = Outcome(shard_size=shard_size, dialect=dialect, packed=packed)
    if packed:
        h.ws.config.write_text(h.ws.config.read_text().replace("[inbox]\n", "[inbox]\npack_max_requests = 6\n", 1))
    if dialect == "anthropic":
        use_anthropic(h)
    elif dialect == "gemini":
        use_gemini(h)
    if shard_size is not None:
        config = h.ws.config.read_text()
        h.ws.config.write_text(
            config.replace(f'kind = "{dialect}"', f'kind = "{dialect}"\nmax_batch_requests = {shard_size}')
        )
    db = h.ws.database_url
    points = CRASH_POINTS + (PACK_CRASH_POINTS if packed else ())
    names = iter(f"f{i:04d}" for i in range(jobs + 2 * len(points)))

    def drop() -> None:
        name = next(names)
        out.files[name] = _requests(name, rng, dialect)
        h.ws.drop(f"{name}.jsonl", out.files[name])

    for _ in range(jobs):
        drop()
    plan: list[str | None] = [*points, *([None] * random_kills)]
    rng.shuffle(plan)
    for point in plan:
        if point is None:
            daemon = h.start()
            await daemon.until_logged("daemon.ready")
            # A kill at a random moment of the daemon's work (the moment is the experiment).
            await anyio.sleep(rng.uniform(0, max_kill_delay_s))
            daemon.proc.kill()
            await daemon.wait()
        elif packed:
            # Two files there before it starts: its first rescan takes them together, a pack.
            drop()
            drop()
            daemon = h.start(env={ENV: point})
            code = await _until_dead(daemon, 60)
            assert code == -9, f"daemon did not die at {point}: exit {code}"
        else:
            daemon = h.start(env={ENV: point})
            # Leftover work may reach the point before the new file does: dying early is fine.
            await eventually(daemon.dead_or_ready, 30)
            drop()
            code = await _until_dead(daemon, 60)
            assert code == -9, f"daemon did not die at {point}: exit {code}"
        out.kills += 1
        assert integrity_ok(db), f"integrity_check failed after kill {out.kills}"
    done = await h.ws.batchd("run", "--once", "--timeout", "240", timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert integrity_ok(db)
    return out


async def check(h: Harness, out: Outcome) -> None:
    """Every job complete and accounted for, each input created once, each webhook stable."""
    creates = await h.emulator.creates()
    # (An Anthropic create's requests are stored as an input file of its own: unique per create,
    # so the count below is what catches a second create there.)
    per_input: dict[str, int] = defaultdict(int)
    for create in creates:
        per_input[create["input_file_id"]] += 1
    duplicated = {k: v for k, v in per_input.items() if v != 1}
    assert not duplicated, f"inputs created more than once: {duplicated}"
    if out.packed:
        assert len(creates) < len(out.files), "files taken together shared remote batches"
    else:
        assert len(creates) == sum(out.shards(name) for name in out.files), "one remote batch per shard"

    key = id_key(out.dialect)
    folders = {p.name: p for p in h.ws.outbox.iterdir() if (p / "job.json").exists()}
    assert sorted(folders) == sorted(out.files), f"one complete outbox folder per file: {sorted(folders)}"
    for name, sent in out.files.items():
        meta = json.loads((folders[name] / "job.json").read_text(encoding="utf-8"))
        assert meta["status"] == "completed", (name, meta["status"], meta["reason"])
        assert len(meta["remote_batch_ids"]) == out.shards(name)
        got = [line[key] for line in read_jsonl(folders[name] / "output.jsonl")]
        if (folders[name] / "errors.jsonl").exists():
            got += [line[key] for line in read_jsonl(folders[name] / "errors.jsonl")]
        assert sorted(got) == sorted(x[key] for x in sent), name
        assert meta["request_counts"]["total"] == len(sent)

    ids_per_job: dict[str, set[str]] = defaultdict(set)
    bodies_per_id: dict[str, set[bytes]] = defaultdict(set)
    for hook, event in zip(h.receiver.hooks, h.receiver.verified(), strict=True):
        ids_per_job[event["data"]["id"]].add(hook.headers["webhook-id"])
        bodies_per_id[hook.headers["webhook-id"]].add(hook.body)
    job_ids = {json.loads((f / "job.json").read_text())["id"] for f in folders.values()}
    assert set(ids_per_job) == job_ids, "every job's webhook arrived"
    assert all(len(ids) == 1 for ids in ids_per_job.values()), "one stable webhook-id per job"
    assert all(len(bodies) == 1 for bodies in bodies_per_id.values()), "identical bytes on every attempt"
