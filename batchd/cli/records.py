"""What `jobs`, `show`, `watch`, `status` and `webhooks` print: pure records and tables.

The records are the `--json` shapes documented in docs/reference/json.md:
stable, keys are only ever added. The tables and lines are the human output. Every URL
in them is shown through batchd.urls.redact_url: credentials never reach a terminal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd.config import Settings
from batchd.models import Delivery, EndpointStats, Job, JobState, RemoteBatchRecord
from batchd.outbox import OUTBOX_FILES, iso
from batchd.store import Store, daemon_state
from batchd.text import counted, dollars
from batchd.urls import redact_url

#: Below this many jobs, their remote batches are read by id; above, all at once.
_BY_ID_LIMIT = 500


# ---------------------------------------------------------------- records (the --json shape)


#: The request counts a record shows (the store keeps `unanswered` beside them, for progress).
COUNT_KEYS = ("total", "completed", "failed")


def progress_of(job: Job, batches: Sequence[RemoteBatchRecord]) -> float | None:
    """Percent of the job's requests that got an answer (a success or an error line of the
    provider's); None when unknown (rejected, or no word yet).

    A finished job counts `completed + failed - unanswered` over `total`: a cancelled job with
    13 of 20 requests answered shows 65, not 100 (`failed` also holds the lines batchd wrote for
    requests never answered). In flight, the provider's own figure.
    """
    if job.state == JobState.REJECTED:
        return None
    if job.state.terminal:
        counts = job.request_counts or {}
        total = counts.get("total")
        if job.state is JobState.COMPLETED or total == 0:
            # Completed: every request ended in a success or a permanent error (DESIGN §2).
            return 100.0
        if total is None or "unanswered" not in counts:
            return None  # finished before batchd kept the unanswered figure, or never counted
        answered = counts.get("completed", 0) + counts.get("failed", 0) - counts["unanswered"]
        return round(100.0 * max(0, answered) / total, 2)
    if job.state in (JobState.RECEIVED, JobState.QUEUED, JobState.UPLOADING, JobState.SUBMITTING):
        return 0.0
    bound = [b for b in batches if b.remote_id is not None]
    if not bound:
        return None
    known = [b.progress for b in bound if b.progress is not None]
    if len(known) != len(bound):
        return None
    return round(sum(known) / len(known), 2)


def job_record(job: Job, batches: Sequence[RemoteBatchRecord], now: float) -> dict[str, Any]:
    """One job as `batchd jobs --json` shows it (stable: keys are only ever added)."""
    counts = {k: v for k, v in job.request_counts.items() if k in COUNT_KEYS} if job.request_counts else None
    return {
        "id": job.id,
        "name": job.name,
        # `status`, as job.json and webhooks name it; `state` is the same value under the name
        # this record used first, kept for the programs that read it
        "status": job.state.value,
        "state": job.state.value,
        "source": job.source,
        "provider": job.provider,
        "provider_name": job.provider_name,
        "endpoint": job.endpoint,
        "requests": job.request_count,
        "request_counts": counts,
        "progress": progress_of(job, batches),
        "remote_batch_ids": [b.remote_id for b in batches if b.remote_id],
        "outbox": job.outbox_path,
        "reason": job.reason,
        "last_error": job.last_error,
        "cancel_requested": job.cancel_requested,
        # parked after repeated unexpected errors: the daemon leaves it alone until `batchd resume`
        "parked": job.parked_at is not None,
        "parked_reason": job.parked_reason,
        # while `queued`: why it waits for admission (its provider's room, a spend budget)
        "wait_reason": job.wait_reason if job.state is JobState.QUEUED else None,
        # packing: the pack whose remote batch carried (or carries) its first round
        "pack_id": job.pack_id,
        "owner": job.owner,
        "created_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
        "age_s": round(max(0.0, now - job.created_at), 3),
    }


def _provider_files_text(batch: dict[str, Any]) -> str:
    """`  at provider: input deleted, output downloaded; results kept until …` (or nothing)."""
    facts = ", ".join(f"{kind} {fate}" for kind, fate in batch["provider_files"].items())
    until = f"results kept until {batch['results_expire_at']}" if batch["results_expire_at"] else ""
    said = "; ".join(part for part in (facts, until) if part)
    return f"  at provider: {said}" if said else ""


def show_record(
    job: Job, batches: Sequence[RemoteBatchRecord], deliveries: Sequence[Delivery], now: float
) -> dict[str, Any]:
    """Everything about one job (`batchd show --json`): the `jobs` record plus remote batches,
    timings, files and webhook deliveries."""
    record = job_record(job, batches, now)
    outbox = Path(job.outbox_path) if job.outbox_path else None
    record.update(
        {
            "completion_window": job.completion_window,
            "model": job.model,
            "metadata": dict(job.metadata),
            "usage": dict(job.usage) if job.usage else None,
            "round": job.round,
            "cost": _cost(outbox),
            "priority": job.priority,
            "estimated_tokens": {"prompt": job.estimated_input_tokens, "output": job.estimated_output_tokens},
            "estimated_cost_usd": job.estimated_cost_usd,
            "webhook_url": None if job.webhook_url is None else redact_url(job.webhook_url),
            "input_file_id": job.input_file_id,
            "sha256": job.sha256,
            "size_bytes": job.size_bytes,
            # why the dropped file no longer matches what was submitted (it changed after the take)
            "source_changed": job.source_changed,
            "attempts": job.attempts,
            "timings": {
                "created_at": iso(job.created_at),
                "updated_at": iso(job.updated_at),
                "finished_at": iso(job.finished_at),
                "next_check_at": iso(job.next_check_at),
                "poll_interval_s": job.poll_interval_s,
                "duration_s": round((job.finished_at or now) - job.created_at, 3),
            },
            "files": {
                "claimed": job.claimed_path,
                "spec": job.spec_path,
                "upload": job.upload_path,
                "outbox": job.outbox_path,
                **{
                    name.replace(".", "_"): str(outbox / name)
                    for name in OUTBOX_FILES
                    if outbox is not None and (outbox / name).is_file()
                },
                "report": job.report_path,
                "rejected": job.rejected_path,
            },
            "remote_batches": [
                {
                    "remote_id": b.remote_id,
                    "status": b.status,
                    "progress": b.progress,
                    "round": b.round,
                    "shard": b.shard,
                    "input_file_id": b.input_file_id,
                    "output_file_id": b.output_file_id,
                    "error_file_id": b.error_file_id,
                    "error": b.error,
                    "results_expire_at": iso(b.results_expire_at),
                    "provider_files": dict(b.provider_files or {}),
                    "create_attempts": b.create_attempts,
                    "intent_at": iso(b.intent_at),
                    "created_at": iso(b.remote_created_at),
                    "updated_at": iso(b.updated_at),
                    # when batchd last saw it move, and when it found it stuck and cancelled it
                    "progress_at": iso(b.progress_at),
                    "stuck_at": iso(b.stuck_at),
                }
                for b in batches
            ],
            "webhooks": [
                {
                    "event_id": d.event_id,
                    "type": d.event_type,
                    "url": redact_url(d.url),
                    "state": d.state.value,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "last_error": d.last_error,
                    "delivered_at": iso(d.delivered_at),
                }
                for d in deliveries
            ],
        }
    )
    return record


# ---------------------------------------------------------------- human output


def human_age(seconds: float) -> str:
    """45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def progress_text(progress: float | None, width: int = 0) -> str:
    """`45%`, or with a width a bar too: `[#########...........]  45%`; `-` when unknown."""
    if progress is None:
        return "-" if not width else " " * (width + 2) + "    -"
    percent = f"{math.floor(progress):>3d}%"
    if not width:
        return percent
    filled = min(width, int(width * progress / 100))
    return f"[{'#' * filled}{'.' * (width - filled)}] {percent}"


def _state_text(record: dict[str, Any]) -> str:
    """The STATE column: `parked` says more than the state the job was parked in."""
    return "parked" if record.get("parked") else str(record["state"])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def jobs_table(records: Sequence[dict[str, Any]], *, bar: int = 0) -> list[str]:
    """The `batchd jobs` table: one line per job."""
    name_width = min(32, max([4, *(len(r["name"]) for r in records)]))
    progress_width = (bar + 7) if bar else 8
    lines = [
        f"{'ID':<8}  {'NAME':<{name_width}}  {'STATE':<11}  {'PROGRESS':<{progress_width}}  "
        f"{'REQUESTS':>8}  {'OK':>6}  {'FAILED':>6}  {'AGE':>4}  {'PROVIDER':<10}  OWNER"
    ]
    for r in records:
        counts = r["request_counts"] or {}
        lines.append(
            f"{r['id'][:8]:<8}  {_cut(r['name'], name_width):<{name_width}}  {_state_text(r):<11}  "
            f"{progress_text(r['progress'], bar):<{progress_width}}  {r['requests'] or '-'!s:>8}  "
            f"{counts.get('completed', '-')!s:>6}  {counts.get('failed', '-')!s:>6}  {human_age(r['age_s']):>4}  "
            f"{_cut(r.get('provider_name') or '-', 10):<10}  {(r.get('owner') or '-')[:8]}"
        )
        if r.get("wait_reason"):
            lines.append(f"{'':<8}  waits: {r['wait_reason']}")
    return lines


def daemon_records(rows: Sequence[dict[str, Any]], lease_s: float, now: float) -> list[dict[str, Any]]:
    """`batchd status --json`: every daemon the database knows, newest first."""
    records = []
    for row in rows:
        state = daemon_state(row["stopped_at"], row["heartbeat_at"], now, lease_s)
        records.append(
            {
                "id": row["id"],
                "host": row["host"],
                "pid": row["pid"],
                "state": state,
                "jobs": row["jobs"],
                "started_at": iso(row["started_at"]),
                "heartbeat_at": iso(row["heartbeat_at"]),
                "heartbeat_age_s": round(max(0.0, now - row["heartbeat_at"]), 3),
                "stopped_at": iso(row["stopped_at"]),
            }
        )
    return records


def daemons_table(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"{'ID':<8}  {'STATE':<8}  {'HOST':<20}  {'PID':>7}  {'JOBS':>5}  {'HEARTBEAT':>9}  STARTED"]
    for r in records:
        lines.append(
            f"{r['id'][:8]:<8}  {r['state']:<8}  {_cut(r['host'], 20):<20}  {r['pid']:>7}  {r['jobs']:>5}  "
            f"{human_age(r['heartbeat_age_s']) + ' ago':>9}  {r['started_at']}"
        )
    return lines


def _cost(outbox: Path | None) -> dict[str, Any] | None:
    """The estimated cost job.json recorded (with a [pricing] entry for the job's model)."""
    if outbox is None:
        return None
    try:
        cost = json.loads((outbox / "job.json").read_text(encoding="utf-8")).get("cost")
    except (OSError, ValueError):
        return None
    return cost if isinstance(cost, dict) else None


def _source_facts(r: dict[str, Any]) -> str:
    """What `show` says of the dropped file: its size and requests, or for a rejected one where
    its report is (it was never counted)."""
    if r["state"] == JobState.REJECTED.value:
        return f"rejected: see {r['files']['report'] or 'its report'}"
    requests = counted(r["requests"], "request") if r["requests"] is not None else "? requests"
    size = counted(r["size_bytes"], "byte") if r["size_bytes"] is not None else "size unknown"
    return f"{requests}, {size}"


def show_lines(record: dict[str, Any]) -> list[str]:
    """`batchd show` for a person: one labelled line per fact."""
    r = record
    counts = r["request_counts"] or {}
    t = r["timings"]
    lines = [
        f"job        {r['id']}  ({r['name']})",
        f"state      {r['state']}  {progress_text(r['progress'])}"
        + ("  cancel requested" if r["cancel_requested"] else ""),
        f"source     {r['source']}  " + _source_facts(r),
        f"provider   {r['provider_name']} ({r['provider']})  {r['endpoint'] or '-'}  "
        f"window {r['completion_window'] or '-'}" + (f"  model {r['model']}" if r["model"] else ""),
        f"requests   ok {counts.get('completed', '-')}, failed {counts.get('failed', '-')}"
        + (f"  usage {json.dumps(r['usage'])}" if r["usage"] else "")
        + (f"  cost ~{dollars(r['cost']['estimated_usd'])}" if r["cost"] else ""),
        f"created    {t['created_at']}  ({human_age(r['age_s'])} ago)",
        f"finished   {t['finished_at'] or '-'}  (took {human_age(t['duration_s'])})"
        if t["finished_at"]
        else f"next check {t['next_check_at'] or '-'}  poll every {t['poll_interval_s'] or '-'} s",
    ]
    for b in r["remote_batches"]:
        lines.append(
            f"remote     r{b['round']}/s{b['shard']}  {b['remote_id'] or '(not created)'}  {b['status']}  "
            f"{progress_text(b['progress'])}  "
            f"input {b['input_file_id']}  output {b['output_file_id'] or '-'}  errors {b['error_file_id'] or '-'}"
            + (f"  error: {b['error']}" if b["error"] else "")
            + (f"  stuck: cancelled by batchd at {b['stuck_at']}" if b.get("stuck_at") else "")
            + _provider_files_text(b)
        )
    files = [(k, v) for k, v in r["files"].items() if v]
    for i, (kind, path) in enumerate(files):
        lines.append(f"{'files' if i == 0 else '':<10} {kind:<13}{path}")
    for d in r["webhooks"]:
        status = f" (HTTP {d['last_status']})" if d["last_status"] else ""
        lines.append(f"webhook    {d['type']} → {d['url']}  {d['state']}{status}, {counted(d['attempts'], 'attempt')}")
    if r["source_changed"]:
        lines.append(f"changed    {r['source']} changed after it was taken: {r['source_changed']}")
    if r.get("wait_reason"):
        lines.append(f"waits      {r['wait_reason']}")
    if r.get("pack_id"):
        lines.append(f"pack       {r['pack_id']}  (its first round shared a remote batch with other small files)")
    if r["reason"]:
        lines.append(f"reason     {r['reason']}")
    if r["last_error"]:
        lines.append(f"last error {r['last_error']}")
    if r.get("parked"):
        lines.append(f"parked     {r['parked_reason'] or '-'}  (`batchd resume {r['id'][:8]}` takes it up again)")
    return lines


def read_records(store: Store, states: Sequence[JobState] | None, now: float) -> list[dict[str, Any]]:
    found = store.jobs.select(states or None)
    packs = {j.pack_id for j in found if j.pack_id}
    ids = [j.id for j in found] + sorted(packs) if len(found) + len(packs) <= _BY_ID_LIMIT else None
    batches = store.batches.by_job(ids)
    return [job_record(j, batches_of(j, batches), now) for j in found]


def batches_of(job: Job, batches: Mapping[str, Sequence[RemoteBatchRecord]]) -> list[RemoteBatchRecord]:
    """A job's remote batches, a file's pack's first (they carried its round 0), from `batches` by job id."""
    carried = list(batches.get(job.pack_id, [])) if job.pack_id else []
    return carried + list(batches.get(job.id, []))


def job_batches(store: Store, job: Job) -> list[RemoteBatchRecord]:
    """One job's remote batches, read from the store as `batches_of` orders them."""
    return batches_of(job, {i: store.batches.of_job(i) for i in (job.pack_id, job.id) if i})


# ---------------------------------------------------------------- webhook endpoints


def _iso(ts: float | None) -> str | None:
    """ISO-8601 UTC to the second, as the webhooks table shows times (results.iso keeps the microseconds)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def endpoint_rows(settings: Settings, stats: list[EndpointStats]) -> list[dict[str, Any]]:
    """One row per configured endpoint (even if idle), then every other URL deliveries went to."""
    configured = {ep.url: ep for ep in settings.webhooks}
    by_url = {s.url: s for s in stats}
    urls = list(configured) + sorted(url for url in by_url if url not in configured)
    rows = []
    for url in urls:
        s = by_url.get(url) or EndpointStats(url)
        endpoint = configured.get(url)
        rows.append(
            {
                "url": redact_url(url),
                # "spec": a job's own webhook_url (signed with the inbox secret)
                "kind": "config" if endpoint is not None or s.secret_ref == "config" else "spec",
                "configured": endpoint is not None,
                "events": list(endpoint.events) if endpoint is not None else None,
                "endpoint_disabled": s.disabled_at is not None,
                "disabled_at": _iso(s.disabled_at),
                "disabled_reason": s.disabled_reason,
                "pending": s.pending,
                "delivered": s.delivered,
                "failed_attempts": s.failed_attempts,
                "dead": s.dead,
                "disabled": s.disabled,
                "replayed": s.replayed,
                "next_attempt_at": _iso(s.next_attempt_at),
                "last_error": s.last_error,
            }
        )
    return rows
