"""Outbox folders (DESIGN §4): their names, and job.json, the file that says a folder is complete.

`merge_results` (results.py) writes a folder's output.jsonl and errors.jsonl;
`job_document` and `write_job_json` then describe the job in job.json, last.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchd import chaos
from batchd.durable_files import write_atomic
from batchd.lifecycle import RESULTS_EXPIRED, results_lost
from batchd.models import Job, JobState, RemoteBatchRecord
from batchd.results import MergeResult
from batchd.safe_fs import NAME_MAX, make_dirs

__all__ = [
    "OUTBOX_FILES",
    "SHORT_ID_LENGTH",
    "iso",
    "job_document",
    "make_outbox_folder",
    "outbox_candidates",
    "outbox_name",
    "reason_for",
    "write_job_json",
]

#: The files a finished job's outbox folder may hold (DESIGN §4), job.json last.
OUTBOX_FILES = ("output.jsonl", "errors.jsonl", "job.json")
#: Characters of the job id in a second folder of the same name, `NAME.<short job id>/`.
SHORT_ID_LENGTH = 8


def outbox_name(source: str) -> str:
    """The outbox folder name for a dropped file: its name without the last extension.

    Spaces and non-ASCII are kept; control characters become ``_``.
    """
    stem, dot, _extension = source.rpartition(".")
    name = stem if dot and stem else source
    name = "".join("_" if unicodedata.category(char) == "Cc" else char for char in name)
    # "." and ".." are not folder names one can create; "" is no name at all.
    if name.strip(".") == "":
        name = name.replace(".", "_") or "_"
    return name


def outbox_candidates(outbox_dir: Path, name: str, job_id: str) -> list[Path]:
    """The folders a job's results may go to, in order of preference (DESIGN §4).

    ``outbox_dir/NAME/`` when free, else ``NAME.<short job id>/`` (the first 8
    characters of `job_id`), and as a last resort ``NAME.<job id>/``. The Store
    reserves one of them for the job before it is created (see the daemon).
    """
    names = dict.fromkeys([name, _with_id(name, job_id[:SHORT_ID_LENGTH]), _with_id(name, job_id)])
    return [outbox_dir / n for n in names]


def _with_id(name: str, suffix: str) -> str:
    """`NAME.<suffix>`, the name cut short when both would not fit in a file name."""
    room = NAME_MAX - len(suffix.encode()) - 1
    return f"{name.encode()[:room].decode('utf-8', 'ignore')}.{suffix}"


def make_outbox_folder(outbox_dir: Path, folder: Path) -> Path:
    """Create a job's outbox folder (2750: group batchd reads it), or check the one a crash left."""
    return make_dirs(outbox_dir, [folder.name])


def write_job_json(folder: Path, doc: Mapping[str, Any]) -> Path:
    """Write ``folder/job.json`` atomically (temp, fsync, rename, fsync of the folder).

    Pretty-printed UTF-8 with non-ASCII kept. Its presence means the folder is
    complete, so callers write it last.
    """
    dest = folder / "job.json"
    chaos.file_fault(dest)
    write_atomic(dest, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return dest


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with a Z, as job.json and webhooks show times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def reason_for(batches: Sequence[RemoteBatchRecord], merge: MergeResult, code: str) -> str:
    """Why a job ended without every request answered, in a line."""
    text = f"{merge.unanswered} of {merge.total} requests unanswered ({code})"
    if code == RESULTS_EXPIRED:
        return f"{text}: " + "; ".join(_expired(b) for b in batches if results_lost(b))
    errors = [b.error for b in batches if b.error]
    last = max((b.round for b in batches), default=0)
    stuck = [b for b in batches if b.round == last and b.stuck_at is not None]
    if stuck and code == "batch_expired":
        ids = ", ".join(str(b.remote_id) for b in stuck)
        text += f"; batchd cancelled {ids}: it did not run, or made no progress, within the stuck limit"
    return f"{text}: {errors[-1]}" if errors else text


def _expired(batch: RemoteBatchRecord) -> str:
    until = iso(batch.results_expire_at)
    kept = f" (kept until {until})" if until is not None else ""
    return f"the results of batch {batch.remote_id} expired at the provider{kept} before batchd downloaded them"


def job_document(
    job: Job,
    state: JobState,
    merge: MergeResult,
    batches: Sequence[RemoteBatchRecord],
    folder: Path,
    *,
    finished_at: float,
    reason: str | None,
    cost: Mapping[str, Any] | None = None,
    source_changed: str | None = None,
    delete_files: str | None = None,
) -> dict[str, Any]:
    """The content of job.json (DESIGN §4, plus `rounds`, `cost`, `reason`, `model`, `input_sha256`,
    `source_changed`, `provider_name`, `unanswered`, `delete_files`)."""
    output = folder / "output.jsonl"
    errors = folder / "errors.jsonl"
    return {
        "id": job.id,
        "name": job.name,
        "status": state.value,
        "source": job.source,
        "endpoint": job.endpoint,
        "provider": job.provider,
        # which configured provider: "default" ([provider]) or a [providers.NAME] table's NAME
        "provider_name": job.provider_name,
        "remote_batch_ids": [b.remote_id for b in batches if b.remote_id],
        "request_counts": {"total": merge.total, "completed": merge.completed, "failed": merge.failed},
        # of `failed`, the requests the provider never answered (synthesized lines in errors.jsonl)
        "unanswered": merge.unanswered,
        "usage": dict(merge.usage),
        "created_at": iso(job.created_at),
        "finished_at": iso(finished_at),
        "output_file": str(output.resolve()) if output.exists() else None,
        "error_file": str(errors.resolve()) if errors.exists() else None,
        "metadata": dict(job.metadata),
        "reason": reason,
        "model": job.model,
        "input_sha256": job.sha256,
        "rounds": _rounds(batches),
        "cost": dict(cost) if cost else None,
        # Why the dropped file no longer matches what was submitted (it changed after it was taken).
        "source_changed": source_changed,
        # What batchd deletes at the provider: with "all", the result files go right after this
        # file is written (each batch's `provider_files` says what was done before).
        "delete_files": delete_files,
    }


def _rounds(batches: Sequence[RemoteBatchRecord]) -> list[dict[str, Any]]:
    """Every round and its remote batches, as job.json and `batchd show` list them."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    for b in batches:
        rounds.setdefault(b.round, []).append(
            {"shard": b.shard, "remote_batch_id": b.remote_id, "status": b.status, "requests": b.request_count,
             "error": b.error, "stuck_at": iso(b.stuck_at), "results_expire_at": iso(b.results_expire_at),
             "provider_files": dict(b.provider_files or {})}
        )  # fmt: skip
    return [{"round": r, "batches": rounds[r]} for r in sorted(rounds)]
