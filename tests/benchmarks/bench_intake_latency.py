"""Intake latency: from a file's rename into the inbox to the provider receiving its batch create.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_intake_latency [--drops 100] [--burst N] [--requests 10] [--pack N]
        [--floor 50] [--json]

Issue 14's figures: `--drops 100 --requests 1` (sequential: median < 10 ms, p99 < 50 ms)
and `--drops 0 --burst 10000 --requests 1` (burst: >= 500 files/s, the daemon's RSS
during it < 150 MB).

What is measured: the time from the atomic rename of a JSONL file into the
inbox (the producer protocol of DESIGN §3) to the moment the provider receives
that file's `POST /v1/batches`. The issue's goal is a median under 100 ms on
the embedded backend.

How: this process serves the emulator (`batchd.emulator.app.create_app`, echo
engine) with `serve_emulator` on a loopback port, wrapped in a small ASGI
middleware that timestamps every API request on arrival. The real daemon runs
as a subprocess (`python -m batchd --config X run`, its own event loop) with
`provider.kind = "together"`, `base_url` = that URL and `TOGETHER_API_KEY=bench`.
That is exactly the embedded backend's code path: `provider.kind = "local"`
serves the same app with the same `serve_emulator` on a loopback port and
reaches it through the same `TogetherProvider`; only the process boundary
differs (here the emulator does not share the daemon's event loop, so its
own work does not slow the daemon down, and the measuring side owns it).
Both timestamps (before the rename, on the request's arrival) are taken in
this process; wall-clock `time.time()` is also kept to line them up with the
daemon's JSON log, whose ISO timestamps give the per-stage breakdown.

Two runs:

* sequential: --drops files, one at a time; each is renamed in only after the
  previous one's create arrived (plus --gap seconds), so each latency is
  measured on an otherwise quiet intake (earlier jobs still finish in the
  background: polls, downloads, outbox writes).
* burst: --drops files renamed in as fast as possible; reported are the time
  from the first rename to the last create, and each file's own latency.

Every dropped file has its own content (its `custom_id`s name the drop), so
each has its own sha256. A create is matched to the drops it carries through
the emulator's stored copy of its input file, read once when the create
arrives: each line's `custom_id` is either a drop's own (an unpacked file) or
a pack id `<job id>-<rank>` (batchd.packs.request_id), whose job id the
daemon's `inbox.claimed` (job_id, source = the drop's name) maps to its drop.
A drop's create is the first whose file carries any of its requests; the runs
wait until the creates carry every request dropped (distinct ids, so a
duplicate cannot stand in for a missing drop). A drop whose requests arrive
in two creates is reported (DESIGN §2 promises one remote batch per
submission; the benchmark then exits 1, numbers still printed).

Packing: `--pack N` (default 0: off, the config as without it) writes
`[inbox] pack_max_requests = N`, so files of at most N requests that the
inbox takes in one go share one remote batch (a pack job). A packed drop's
latency is then to the create of its pack's batch, and its stages from
`job.planned` on are its pack's (found through `inbox.accepted`'s `pack_id`),
on the pack's uploaded file. The setting is printed beside the goals, with
how many remote batches each run's drops became.

The floor (`--floor N`, default 50; 0: skip): before the first drop, a bare httpx client in
a process of its own sends Together's four submission requests N times, one after the other,
to the same emulator: no inbox, no validation, no database. Its time from the first request
to the create's arrival is what the sequential figure cannot go below through this protocol
against this emulator; the rest of the sequential figure is the daemon's own. It is printed
beside the goal and does not change what the runs measure.

Output: n, median, p90, p99 and max in ms per run, then where the time goes:
the daemon's log (`--log-level`, JSON lines) and the middleware's
timestamps split each latency into stages — rename → `inbox.claimed` →
`inbox.accepted` → `job.planned` (the pack's, for a packed drop) → the upload's three requests
(`POST /v1/files`, `PUT` of the bytes, `preprocess`) → `job.uploaded` → the
create's arrival — and the emulator's own time per request is shown beside
them. `--json` adds every drop's latency and stages. The daemon is stopped
with SIGTERM and must exit 0. Wall-clock numbers: read them with the load
average printed at the end (the machine may be shared).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import httpx
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.emulator.app import create_app
from batchd.emulator.server import serve_emulator
from batchd.emulator.state import EmulatorState
from batchd.packs import parse_request_id

#: Seconds to wait for one create (or for the daemon to start) before giving up.
STEP_TIMEOUT_S = 30.0
#: SIGTERM must end the daemon within DESIGN §7's 10 s; a little slack for a loaded machine.
STOP_TIMEOUT_S = 15.0
#: The daemon's log events that mark the stages of intake.
LOG_STAGES = ("inbox.claimed", "inbox.accepted", "job.planned", "job.uploaded")
#: The stages from rename to create: key, then what the time is spent on. Each ends where the next begins.
STAGES = (
    ("claim", "rename -> inbox.claimed: inotify wake-up, thread hop, claim rename"),
    ("accept", "inbox.claimed -> inbox.accepted: validate, upload copy + sha256, insert job"),
    ("schedule", "inbox.accepted -> job.planned: scheduler round, free step slot, shard plan write"),
    ("files", "job.planned -> POST /v1/files arrives"),
    ("put", "POST /v1/files arrives -> PUT of the bytes arrives"),
    ("preprocess", "PUT arrives -> POST .../preprocess arrives"),
    ("uploaded", "preprocess arrives -> job.uploaded: answer, intent write"),
    ("create", "job.uploaded -> POST /v1/batches arrives: scheduler round, step slot, attempt write"),
)
#: The emulator's requests on the path, by Hit.kind.
REQUEST_KINDS = (
    ("files", "POST /v1/files (upload start, 302)"),
    ("put", "PUT /_emulator/upload/{id}"),
    ("preprocess", "POST /v1/files/{id}/preprocess"),
    ("create", "POST /v1/batches"),
)


# ---------------------------------------------------------------- the provider side


@dataclass
class Hit:
    """One API request as the emulator saw it."""

    method: str
    path: str
    #: time.monotonic() / time.time() when the app was called (headers parsed, body not yet read)
    mono: float
    wall: float
    #: time.monotonic() when the answer's last byte was handed to the server
    done: float | None = None
    #: the file the request is about (path, response header or create body), when there is one
    file_id: str | None = None
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)

    @property
    def kind(self) -> str:
        """Which step of intake this request is (see REQUEST_KINDS), else "other"."""
        if self.method == "POST" and self.path == "/v1/files":
            return "files"
        if self.method == "PUT" and self.path.startswith("/_emulator/upload/"):
            return "put"
        if self.method == "POST" and self.path.endswith("/preprocess"):
            return "preprocess"
        if self.method == "POST" and self.path == "/v1/batches":
            return "create"
        return "other"


def read_custom_ids(path: Path) -> list[str]:
    """The custom_id of each line of a file the emulator stored (the content the daemon uploaded)."""
    ids: list[str] = []
    try:
        with path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                value = record.get("custom_id") if isinstance(record, dict) else None
                if isinstance(value, str):
                    ids.append(value)
    except OSError:
        pass
    return ids


class Recorder:
    """ASGI middleware that timestamps every HTTP request before the emulator sees it."""

    def __init__(self, app: ASGIApp, state: EmulatorState) -> None:
        self.app = app
        self.state = state
        self.hits: list[Hit] = []
        #: the batch creates, in order of arrival
        self.creates: list[Hit] = []
        #: the custom_ids of each create's input file, read once when its first create arrived
        self.file_ids: dict[str, list[str]] = {}
        #: every custom_id some create carried: a drop's own ids or its pack ids, each once
        self.created_ids: set[str] = set()
        self._arrived = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hit = Hit(scope["method"], scope["path"], time.monotonic(), time.time())
        self.hits.append(hit)
        parts = hit.path.strip("/").split("/")
        # /_emulator/upload/{id} (the PUT) and /v1/files/{id}/preprocess name their file.
        if len(parts) >= 3 and parts[-1] != "content" and parts[1] in ("upload", "files"):
            hit.file_id = parts[2]
        is_create = hit.method == "POST" and hit.path == "/v1/batches"

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                hit.body.extend(message.get("body", b""))
            return message

        async def send_answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                hit.status = int(message["status"])
                for name, value in message.get("headers", []):
                    # Step 1 of the upload answers 302 with the new file's id in a header.
                    if name.lower() == b"x-together-file-id":
                        hit.file_id = value.decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                hit.done = time.monotonic()
            await send(message)

        await self.app(scope, receive_body if is_create else receive, send_answer)
        if is_create:
            try:
                hit.file_id = json.loads(bytes(hit.body)).get("input_file_id")
            except ValueError:
                hit.file_id = None
            self.creates.append(hit)
            if hit.file_id is not None and hit.file_id not in self.file_ids:
                # The emulator stored the upload before the create; read after the answer went out
                # (hit.mono is already taken) and off the loop (a pack may be long).
                ids = await anyio.to_thread.run_sync(read_custom_ids, self.state.content_path(hit.file_id))
                self.file_ids[hit.file_id] = ids
                self.created_ids.update(ids)
            self._arrived.set()
            self._arrived = anyio.Event()

    async def wait_creates(self, count: int, timeout: float) -> None:
        """Return once the creates carry `count` distinct request ids; TimeoutError after `timeout` s.

        Distinct ids, not creates or files: a create may carry several drops' requests (a pack),
        and a duplicate (a daemon bug: the same requests in a second batch) must not stand in for
        another drop's.
        """
        with anyio.fail_after(timeout):
            while len(self.created_ids) < count:
                await self._arrived.wait()


# ---------------------------------------------------------------- the producer side


@dataclass
class Drop:
    """One file renamed into the inbox."""

    index: int
    name: str
    mono: float
    wall: float


def custom_id(run: str, index: int, line: int) -> str:
    return f"{run}-{index:04d}-{line:03d}"


def file_content(run: str, index: int, requests: int) -> bytes:
    """A valid chat batch file whose custom_ids (hence sha256) belong to this drop alone."""
    lines = []
    for line in range(requests):
        request = {
            "custom_id": custom_id(run, index, line),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "bench-model",
                "messages": [{"role": "user", "content": f"Say hello to request {line} of drop {index}."}],
                "max_tokens": 16,
            },
        }
        lines.append(json.dumps(request, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


async def stage(inbox: Path, run: str, index: int, requests: int) -> tuple[Path, Path]:
    """Write a drop under an ignored name; return (temp path, final path)."""
    name = f"{run}-{index:04d}.jsonl"
    tmp = inbox / f".{name}.tmp"
    await anyio.Path(tmp).write_bytes(file_content(run, index, requests))
    return tmp, inbox / name


def rename_in(index: int, tmp: Path, final: Path) -> Drop:
    """The producer's atomic rename, timestamped right before it."""
    mono, wall = time.monotonic(), time.time()
    os.rename(tmp, final)
    return Drop(index, final.name, mono, wall)


# ---------------------------------------------------------------- the daemon


def write_config(root: Path, base_url: str, pack: int = 0) -> Path:
    """The daemon's config; `pack` > 0 packs files of at most that many requests (0: the key is not written)."""
    packing = f"pack_max_requests = {pack}\n" if pack > 0 else ""
    config = root / "batchd.toml"
    config.write_text(
        f"""state_dir = "{root / "state"}"

[provider]
kind = "together"
base_url = "{base_url}"
# The emulator's stored copy of each upload matches creates to drops: kept after the batch ends.
delete_files = "none"

[polling]
min_interval_s = 0.2

[inbox]
settle_s = 0.2
{packing}""",
        encoding="utf-8",
    )
    return config


def daemon_env() -> dict[str, str]:
    # BATCHD_* from the caller's shell would silently change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env["TOGETHER_API_KEY"] = "bench"
    return env


async def wait_for_log(log_path: Path, event: str, process: anyio.abc.Process, timeout: float) -> None:
    """Until the daemon's log holds `event` (it logs JSON lines: stdout is a file)."""
    needle = f'"event": "{event}"'
    with anyio.fail_after(timeout):
        while needle not in await anyio.Path(log_path).read_text(encoding="utf-8", errors="replace"):
            if process.returncode is not None:
                raise RuntimeError(f"the daemon exited with {process.returncode} before {event}; see {log_path}")
            await anyio.sleep(0.05)


def read_log(log_path: Path) -> list[dict[str, Any]]:
    records = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
    return records


def log_wall(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- analysis


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values_s: Sequence[float]) -> dict[str, float]:
    """n, median, p90, p99, max in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms) if ms else float("nan"),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
    }


def claimed_jobs(log: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The job id of each claimed file, by file name (the daemon's `inbox.claimed`)."""
    job_of: dict[str, str] = {}
    for record in log:
        job_id = record.get("job_id")
        if record["event"] == "inbox.claimed" and isinstance(job_id, str):
            job_of.setdefault(str(record.get("source")), job_id)
    return job_of


def drop_of_id(value: str, run: str, known: set[int], by_job: dict[str, int]) -> int | None:
    """The drop whose request `value` is: its own custom_id (`custom_id(run, index, line)`) or a pack id."""
    prefix = f"{run}-"
    if value.startswith(prefix):
        index, dash, line = value[len(prefix) :].partition("-")
        if dash and index.isdigit() and line.isdigit() and int(index) in known:
            return int(index)
        return None
    found = parse_request_id(value)
    return by_job.get(found[0]) if found is not None else None


def match_creates(
    drops: Sequence[Drop],
    creates: Sequence[Hit],
    file_ids: dict[str, list[str]],
    run: str,
    job_of: dict[str, str],
) -> tuple[dict[int, Hit], dict[int, int], int]:
    """Each drop's first create: the first (by arrival) whose input file carries any of its requests.

    `file_ids`: the custom_ids of each created input file (Recorder.file_ids); `job_of`: each
    claimed file's job id (claimed_jobs), which maps a pack id back to its drop. Also returns,
    per drop, how many creates carried its requests: more than one is a duplicate remote batch,
    which DESIGN §2 forbids; and how many creates carried this run's drops in all.
    """
    known = {d.index for d in drops}
    by_job = {job_of[d.name]: d.index for d in drops if d.name in job_of}
    carried: dict[str, set[int]] = {}
    matched: dict[int, Hit] = {}
    counts: dict[int, int] = {}
    batches = 0
    for hit in sorted(creates, key=lambda h: h.mono):
        if hit.file_id is None:
            continue
        indexes = carried.get(hit.file_id)
        if indexes is None:
            found = (drop_of_id(value, run, known, by_job) for value in file_ids.get(hit.file_id, ()))
            indexes = carried[hit.file_id] = {index for index in found if index is not None}
        batches += bool(indexes)
        for index in indexes:
            counts[index] = counts.get(index, 0) + 1
            matched.setdefault(index, hit)
    return matched, counts, batches


def drop_stages(
    drops: Sequence[Drop], matched: dict[int, Hit], hits: Sequence[Hit], log: Sequence[dict[str, Any]]
) -> dict[int, dict[str, float]]:
    """For each matched drop, the seconds spent in each of STAGES (wall clock; a stage is absent when unseen).

    A packed drop's stages from `job.planned` on are its pack job's (`inbox.accepted`'s `pack_id`);
    its matched create's input file is the pack's upload.
    """
    job_of = claimed_jobs(log)
    pack_of: dict[str, str] = {}
    events: dict[str, dict[str, float]] = {}
    for record in log:
        job_id = record.get("job_id")
        if not isinstance(job_id, str):
            continue
        if record["event"] == "inbox.accepted" and isinstance(record.get("pack_id"), str):
            pack_of.setdefault(job_id, str(record["pack_id"]))
        if record["event"] in LOG_STAGES:
            events.setdefault(job_id, {}).setdefault(str(record["event"]), log_wall(record))
    arrivals: dict[tuple[str, str], float] = {}
    for hit in hits:
        if hit.file_id is not None:
            arrivals.setdefault((hit.file_id, hit.kind), hit.wall)
    result: dict[int, dict[str, float]] = {}
    for drop in drops:
        create = matched.get(drop.index)
        job_id = job_of.get(drop.name)
        if create is None or create.file_id is None or job_id is None:
            continue
        seen = events.get(job_id, {})
        # From job.planned on, the job submitted: the pack's for a packed drop.
        sent = events.get(pack_of[job_id], {}) if job_id in pack_of else seen
        fid = create.file_id
        points = [
            drop.wall,
            seen.get("inbox.claimed"),
            seen.get("inbox.accepted"),
            sent.get("job.planned"),
            arrivals.get((fid, "files")),
            arrivals.get((fid, "put")),
            arrivals.get((fid, "preprocess")),
            sent.get("job.uploaded"),
            create.wall,
        ]
        spans: dict[str, float] = {}
        for (key, _), start, end in zip(STAGES, points[:-1], points[1:], strict=True):
            if start is not None and end is not None:
                spans[key] = end - start
        result[drop.index] = spans
    return result


def handling_times(hits: Sequence[Hit], files: set[str]) -> dict[str, list[float]]:
    """Seconds the emulator took to answer each kind of request about `files` (arrival to last byte)."""
    times: dict[str, list[float]] = {key: [] for key, _ in REQUEST_KINDS}
    for hit in hits:
        if hit.file_id in files and hit.kind in times and hit.done is not None:
            times[hit.kind].append(hit.done - hit.mono)
    return times


# ---------------------------------------------------------------- the runs


@dataclass
class RunResult:
    name: str
    drops: list[Drop]
    #: the daemon's peak resident memory during the run (burst only)
    rss_peak_mb: float | None = field(default=None, kw_only=True)
    #: the bare client's latencies (sequential only; see run_floor), seconds
    floor_s: list[float] = field(default_factory=list, kw_only=True)
    latencies_s: list[float]
    #: per drop index: seconds per stage
    stages: dict[int, dict[str, float]]
    #: per request kind: the emulator's own handling time, seconds
    handling: dict[str, list[float]]
    #: first rename to last create
    span_s: float
    #: drops whose requests went out in more than one batch create (index -> creates)
    duplicates: dict[int, int]
    #: the batch creates that carried this run's drops (fewer than the drops when packed)
    batches: int

    def stage_summary(self) -> list[tuple[str, str, dict[str, float]]]:
        return [
            (key, label, summary([spans[key] for spans in self.stages.values() if key in spans]))
            for key, label in STAGES
        ]


async def run_sequential(inbox: Path, recorder: Recorder, drops: int, requests: int, gap_s: float) -> list[Drop]:
    done: list[Drop] = []
    start = len(recorder.created_ids)
    for index in range(drops):
        tmp, final = await stage(inbox, "seq", index, requests)
        done.append(rename_in(index, tmp, final))
        await recorder.wait_creates(start + (index + 1) * requests, STEP_TIMEOUT_S)
        await anyio.sleep(gap_s)
    return done


async def run_burst(inbox: Path, recorder: Recorder, drops: int, requests: int) -> list[Drop]:
    staged = [await stage(inbox, "burst", index, requests) for index in range(drops)]
    start = len(recorder.created_ids)
    done = [rename_in(index, tmp, final) for index, (tmp, final) in enumerate(staged)]
    await recorder.wait_creates(start + drops * requests, STEP_TIMEOUT_S + drops)
    return done


# ---------------------------------------------------------------- the protocol's floor


async def floor_client(url: str, count: int, requests: int, gap_s: float) -> list[tuple[float, str]]:
    """Together's four submission requests (PROVIDERS.md), `count` times one after the other, by a
    bare httpx client: no inbox, no validation, no database, no fsync of its own. Each: the wall
    time right before its first request, and its file id (the create's arrival is the recorder's)."""
    sent: list[tuple[float, str]] = []
    headers = {"Authorization": "Bearer bench"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as api, httpx.AsyncClient() as storage:
        for index in range(count):
            content = file_content("floor", index, requests)
            fields = {
                "purpose": (None, "batch-api"),
                "file_name": (None, f"floor-{index:04d}.jsonl"),
                "file_type": (None, "jsonl"),
                "checksum": (None, hashlib.sha256(content).hexdigest()),
            }
            wall = time.time()
            start = await api.post("/v1/files", files=fields, follow_redirects=False)
            file_id = start.headers["X-Together-File-Id"]
            put = await storage.put(start.headers["Location"], content=content)
            put.raise_for_status()
            (await api.post(f"/v1/files/{file_id}/preprocess")).raise_for_status()
            body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            (await api.post("/v1/batches", json=body)).raise_for_status()
            sent.append((wall, file_id))
            await anyio.sleep(gap_s)
    return sent


async def run_floor(url: str, recorder: Recorder, count: int, requests: int, gap_s: float) -> list[float]:
    """The floor of the sequential figure: in a process of its own (as the daemon is), the bare
    client's latencies from its first request to its create's arrival, seconds."""
    command = [
        sys.executable, "-m", "tests.benchmarks.bench_intake_latency", "--floor-client", url,
        "--floor", str(count), "--requests", str(requests), "--gap", str(gap_s),
    ]  # fmt: skip
    done = await anyio.run_process(command, env=daemon_env())
    sent = [(float(wall), str(file_id)) for wall, file_id in json.loads(done.stdout)]
    arrived = {hit.file_id: hit.wall for hit in recorder.creates}
    return [arrived[file_id] - wall for wall, file_id in sent]


async def wait_finished(outbox: Path, count: int, timeout: float) -> None:
    """Until `count` jobs have written job.json (the background tail of the previous run)."""
    with anyio.fail_after(timeout):
        # The outbox is the daemon's only sign of a finished job visible from here: poll it.
        while True:
            finished = await anyio.to_thread.run_sync(lambda: list(outbox.glob("*/job.json")))
            if len(finished) >= count:
                return
            await anyio.sleep(0.1)


def result_of(name: str, drops: list[Drop], recorder: Recorder, log: list[dict[str, Any]]) -> RunResult:
    matched, counts, batches = match_creates(drops, recorder.creates, recorder.file_ids, name, claimed_jobs(log))
    missing = [d.index for d in drops if d.index not in matched]
    if missing:
        raise RuntimeError(f"{name}: no batch create matched drops {missing[:10]}")
    latencies = [matched[d.index].mono - d.mono for d in drops]
    span = max(h.mono for h in matched.values()) - min(d.mono for d in drops)
    duplicates = {index: n for index, n in counts.items() if n > 1}
    files = {h.file_id for h in matched.values() if h.file_id is not None}
    return RunResult(
        name=name,
        drops=drops,
        latencies_s=latencies,
        stages=drop_stages(drops, matched, recorder.hits, log),
        handling=handling_times(recorder.hits, files),
        span_s=span,
        duplicates=duplicates,
        batches=batches,
    )


async def bench(root: Path, args: argparse.Namespace, daemon_log: IO[bytes]) -> tuple[list[RunResult], int]:
    """Serve the emulator, run the daemon against it, drop files; return the results and the daemon's exit code."""
    data_dir = root / "emulator"
    recorder = Recorder(create_app(data_dir), EmulatorState(data_dir))
    inbox = root / "state" / "inbox"
    outbox = root / "state" / "outbox"
    log_path = Path(daemon_log.name)
    async with serve_emulator(recorder) as url:
        config = write_config(root, url, args.pack)
        command = [sys.executable, "-m", "batchd", "--config", str(config), "run", "--log-level", args.log_level]
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=subprocess.STDOUT, env=daemon_env()
        )
        try:
            await wait_for_log(log_path, "daemon.ready", process, STEP_TIMEOUT_S)
            # Before any drop: the daemon is idle, and the emulator's state as small as it gets.
            floor = await run_floor(url, recorder, args.floor, args.requests, args.gap) if args.floor else []
            seq_drops = await run_sequential(inbox, recorder, args.drops, args.requests, args.gap)
            await wait_finished(outbox, args.drops, STEP_TIMEOUT_S + args.drops)
            async with anyio.create_task_group() as sampling:
                rss = RssSampler(process.pid)
                sampling.start_soon(rss.run)
                burst_drops = await run_burst(inbox, recorder, args.burst, args.requests)
                sampling.cancel_scope.cancel()
            await wait_finished(outbox, args.drops + args.burst, STEP_TIMEOUT_S + args.burst)
        finally:
            # Shielded: even when interrupted, the daemon is stopped and reaped before the folder goes.
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(STOP_TIMEOUT_S):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                    print(f"the daemon ignored SIGTERM for {STOP_TIMEOUT_S} s and was killed", file=sys.stderr)
    code = process.returncode
    records = await anyio.to_thread.run_sync(read_log, log_path)
    results = [result_of("seq", seq_drops, recorder, records)] if seq_drops else []
    if seq_drops:
        results[-1].floor_s = floor
    if burst_drops:
        results.append(result_of("burst", burst_drops, recorder, records))
        results[-1].rss_peak_mb = rss.peak_mb
    return results, -1 if code is None else code


class RssSampler:
    """The daemon's resident memory, sampled every 0.2 s while it runs: the peak during a burst."""

    def __init__(self, pid: int) -> None:
        self._status = Path(f"/proc/{pid}/status")
        self.peak_mb = 0.0

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                for line in self._status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            await anyio.sleep(0.2)


# ---------------------------------------------------------------- output


LABELS = {"seq": "sequential", "burst": "burst"}


def machine() -> dict[str, Any]:
    """What the numbers depend on besides batchd: the CPUs and how busy they were."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load], "python": sys.version.split()[0]}


def packing(pack: int, results: Sequence[RunResult]) -> str:
    """The pack setting, and what each run's drops became."""
    if pack <= 0:
        return "packing: off"
    became = "; ".join(f"{LABELS[r.name]}: {len(r.drops)} files in {r.batches} remote batches" for r in results)
    return f"packing: files of <= {pack} requests ({became})"


def print_table(results: Sequence[RunResult], daemon_exit: int, host: dict[str, Any], pack: int) -> None:
    row = "{:<36} {:>4} {:>9} {:>9} {:>9} {:>9}"
    print("intake latency: rename into the inbox -> POST /v1/batches received by the provider (ms)")
    print(row.format("run", "n", "median", "p90", "p99", "max"))
    for r in results:
        s = summary(r.latencies_s)
        label = "sequential" if r.name == "seq" else "burst, each file"
        cells = (f"{s[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms", "max_ms"))
        print(row.format(label, s["n"], *cells))
        if r.name == "burst":
            print(row.format("burst, first rename -> last create", s["n"], f"{r.span_s * 1000:.1f}", "", "", ""))
        if r.floor_s:
            f = summary(r.floor_s)
            cells = (f"{f[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms", "max_ms"))
            print(row.format("floor: bare client, 4 requests", f["n"], *cells))
    for r in results:
        s = summary(r.latencies_s)
        if r.name == "seq":
            print(f"goal: sequential median < 10 ms (now {s['median_ms']:.1f}), p99 < 50 ms (now {s['p99_ms']:.1f})")
            if r.floor_s:
                f = summary(r.floor_s)
                print(
                    f"      floor: Together's four requests by a bare client, first request -> create arrives:"
                    f" median {f['median_ms']:.1f}, p99 {f['p99_ms']:.1f} (the daemon's own share: the rest)"
                )
        else:
            rate = s["n"] / r.span_s if r.span_s > 0 else float("inf")
            print(
                f"goal: burst >= 500 files/s (now {rate:.0f} files/s over {s['n']} files),"
                f" daemon RSS during it < 150 MB (now peak {r.rss_peak_mb or 0:.0f} MB)"
            )
    print(packing(pack, results))
    stage_row = "  {:<82} {:>8} {:>8} {:>8} {:>8}"
    for r in results:
        print(f"\nwhere the time goes ({LABELS[r.name]}), ms:")
        print(stage_row.format("stage", "median", "p90", "p99", "max"))
        for _, label, s in r.stage_summary():
            print(stage_row.format(label, *(f"{s[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms", "max_ms"))))
        print("  the emulator's own handling time per request (arrival -> last byte out):")
        for key, label in REQUEST_KINDS:
            s = summary(r.handling[key])
            print(stage_row.format("  " + label, *(f"{s[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms", "max_ms"))))
    print(f"\ndaemon exit code after SIGTERM: {daemon_exit}")
    print(f"machine: {host['cpus']} CPUs, load average {host['loadavg_1_5_15']}, Python {host['python']}")
    for r in results:
        if r.duplicates:
            shown = ", ".join(f"{r.name}-{i:04d} x{n}" for i, n in sorted(r.duplicates.items()))
            print(f"DUPLICATE remote batches ({r.name}): {len(r.duplicates)} drops got more than one create: {shown}")


def as_json(results: Sequence[RunResult], daemon_exit: int, host: dict[str, Any], pack: int) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "daemon_exit": daemon_exit,
        "machine": host,
        "pack_max_requests": pack,
        "runs": {
            r.name: {
                **summary(r.latencies_s),
                "span_ms": ms(r.span_s),
                "rss_peak_mb": r.rss_peak_mb,
                "floor": summary(r.floor_s) if r.floor_s else None,
                "remote_batches": r.batches,
                "stages_ms": {key: s for key, _, s in r.stage_summary()},
                "emulator_handling_ms": {key: summary(r.handling[key]) for key, _ in REQUEST_KINDS},
                "duplicate_creates": {f"{r.name}-{i:04d}": n for i, n in sorted(r.duplicates.items())},
                "drops": [
                    {
                        "name": d.name,
                        "latency_ms": ms(latency),
                        **{key: ms(r.stages.get(d.index, {}).get(key)) for key, _ in STAGES},
                    }
                    for d, latency in zip(r.drops, r.latencies_s, strict=True)
                ],
            }
            for r in results
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--drops", type=int, default=100, help="files of the sequential run (default 100; 0: skip)")
    parser.add_argument("--burst", type=int, help="files of the burst (default: as --drops; issue 14: 10000)")
    parser.add_argument("--requests", type=int, default=10, help="requests per file (default 10)")
    parser.add_argument("--pack", type=int, default=0, help="[inbox] pack_max_requests (default 0: packing off)")
    parser.add_argument("--gap", type=float, default=0.1, help="sequential: seconds between a create and the next drop")
    parser.add_argument("--log-level", default="info", choices=["debug", "info"], help="the daemon's log level")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", type=Path, help="use (and keep) this folder, e.g. to read the daemon's log")
    parser.add_argument(
        "--floor", type=int, default=50, help="bare-client submissions measured before the sequential run (0: skip)"
    )
    parser.add_argument("--floor-client", metavar="URL", help=argparse.SUPPRESS)  # run_floor's own subprocess
    args = parser.parse_args(argv)
    if args.floor_client:
        sent = anyio.run(floor_client, args.floor_client, args.floor, args.requests, args.gap)
        print(json.dumps(sent))
        return 0
    if args.burst is None:
        args.burst = args.drops
    if args.pack < 0:
        parser.error("--pack must be 0 (off) or more")
    # The emulator logs every request through structlog; here only its warnings matter.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: the folder must be new or empty (a fresh state dir is measured)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="batchd-bench-intake-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with (root / "daemon.log").open("wb") as daemon_log:
            results, daemon_exit = anyio.run(bench, root, args, daemon_log)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    host = machine()
    if args.json:
        print(json.dumps(as_json(results, daemon_exit, host, args.pack), indent=2))
    else:
        print_table(results, daemon_exit, host, args.pack)
    failed = False
    if daemon_exit != 0:
        print(f"the daemon exited with {daemon_exit} after SIGTERM (expected 0)", file=sys.stderr)
        failed = True
    if any(r.duplicates for r in results):
        # The numbers stand, but DESIGN §2 promises one remote batch per submission.
        print("a submission became more than one remote batch (DESIGN §2 forbids it)", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
