"""Persistent state of the emulator: stored files and batches under a data dir.

The records are dialect-neutral: each dialect renders the same `StoredFile` /
`StoredBatch` in its own wire shape, so a file uploaded through one dialect
can feed a batch created through another, and the Together and OpenAI
dialects list every batch (Anthropic and Gemini list their own).

Layout of the data dir (one emulator process per data dir)::

    files/<file id>.json      metadata of a stored file
    files/<file id>.data      its content (absent until uploaded)
    batches/<batch id>.json   a batch record
    spool/<batch id>.jsonl    answers of a running batch, in completion order, fsynced as they
                              come (a restart resumes the batch without asking again)
    fail_once/<sha256>        one empty marker per request that already failed once
    tmp/                      uploads and atomic writes in progress (emptied at start)
    secret                    the key that signs presigned-style upload URLs

Every record is written atomically (temp file, fsync, rename, fsync of the
folder), so a crash leaves either the old or the new version. The in-memory
records are the truth while the process runs; they are loaded once at start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from batchd.durable_files import fsync_dir

log = structlog.get_logger()

#: The signing secret's mode: the service user's alone, whatever the umask.
SECRET_MODE = 0o600
#: Where every "now" of the emulator comes from (aware, UTC); tests inject their own.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock: the real time, in UTC."""
    return datetime.now(UTC)


def iso_z(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC with a `Z`, microseconds kept (as Go's RFC 3339 output does)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class BatchStatus(StrEnum):
    """A batch's status, whatever the dialect that shows it."""

    #: the input file is being checked
    VALIDATING = "validating"
    #: requests are being answered
    IN_PROGRESS = "in_progress"
    #: every request is answered; the result files are being written
    FINALIZING = "finalizing"
    #: a cancel was asked for; the batch ends CANCELLED with what it answered so far
    CANCELLING = "cancelling"
    #: every request was answered (some answers may be errors)
    COMPLETED = "completed"
    #: the input was bad, or a `fail_batch` trigger stopped it
    FAILED = "failed"
    #: the completion window ran out, or an `expire_batch` trigger stopped it
    EXPIRED = "expired"
    #: cancelled by the client
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the batch will never change again."""
        return self not in (
            BatchStatus.VALIDATING,
            BatchStatus.IN_PROGRESS,
            BatchStatus.FINALIZING,
            BatchStatus.CANCELLING,
        )


@dataclass
class StoredFile:
    """A file known to the emulator: an uploaded input or a result file."""

    id: str
    #: creation order, to sort records whose `created_at` ties
    seq: int
    filename: str
    purpose: str
    file_type: str
    #: unix seconds
    created_at: int
    bytes: int = 0
    line_count: int = 0
    #: sha256 hex of the content: declared by the client, then verified at upload
    checksum: str | None = None
    #: the content is on disk
    uploaded: bool = False
    #: the client called preprocess (or the file was uploaded in one step)
    processed: bool = False
    #: the batch whose result file this is (None for an uploaded file)
    result_of: str | None = None
    #: unix seconds after which the file would be deleted (shown by the OpenAI dialect; never enforced)
    expires_at: int | None = None
    #: the MIME type a Gemini upload declared (None for the other dialects' files)
    mime_type: str | None = None


@dataclass
class StoredBatch:
    """A batch job and how far it got."""

    id: str
    seq: int
    #: the dialect that created it ("together", "openai", "anthropic" or "gemini"): its limits and
    #: result-line shapes apply
    dialect: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: datetime
    deadline: datetime
    file_size_bytes: int
    model_id: str | None = None
    priority: int | None = None
    metadata: dict[str, str] | None = None
    status: BatchStatus = BatchStatus.VALIDATING
    #: 0–100; only persisted at transitions (a restart recomputes it)
    progress: float = 0.0
    #: requests in the input file
    total: int = 0
    #: requests answered with a 2xx response
    completed: int = 0
    #: requests answered with an error line or a non-2xx response
    failed: int = 0
    #: of those, the error lines of requests the batch never ran (cancelled, expired or failed
    #: first): Anthropic counts them as `canceled` or `expired`, not `errored`
    unrun: int = 0
    #: usage summed over the 2xx answers (`prompt_tokens` / `completion_tokens` of their bodies)
    input_tokens: int = 0
    output_tokens: int = 0
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    cancelling_at: datetime | None = None
    #: when it reached its terminal status
    finished_at: datetime | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: why it FAILED, in words (Together's `error`); the next three structure it for OpenAI's `errors`
    error: str | None = None
    error_code: str | None = None
    error_line: int | None = None
    error_param: str | None = None
    #: Gemini: the batch's `displayName`
    display_name: str | None = None
    #: what the batch holds of the account's queue from its create until it ends (queue.py)
    enqueued_tokens: int = 0
    #: Gemini: the uploaded file the client named (`input_file_id` is the emulator's own lines made
    #: from it); None for a batch whose requests came inline
    source_file_id: str | None = None
    #: a `pending_once` trigger holds it before running: it stays VALIDATING until cancelled
    #: (kept, so a restart does not let it run)
    held: bool = False


_BATCH_TIMES = ("created_at", "deadline", "in_progress_at", "finalizing_at", "cancelling_at", "finished_at")


def _batch_to_json(batch: StoredBatch) -> dict[str, Any]:
    data = asdict(batch)
    for key in _BATCH_TIMES:
        value = data[key]
        data[key] = value.isoformat() if value is not None else None
    data["status"] = batch.status.value
    return data


def _batch_from_json(data: dict[str, Any]) -> StoredBatch:
    known = {f.name for f in fields(StoredBatch)}
    values = {k: v for k, v in data.items() if k in known}
    for key in _BATCH_TIMES:
        if values.get(key) is not None:
            values[key] = datetime.fromisoformat(values[key])
    values["status"] = BatchStatus(values["status"])
    return StoredBatch(**values)


def _file_from_json(data: dict[str, Any]) -> StoredFile:
    known = {f.name for f in fields(StoredFile)}
    return StoredFile(**{k: v for k, v in data.items() if k in known})


def atomic_write_bytes(path: Path, data: bytes, *, tmp_dir: Path, mode: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new content, never a mix.

    With `mode`, the file gets exactly that mode, whatever the umask.
    """
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.tmp"
    with tmp.open("wb") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def install_file(src: Path, dest: Path) -> None:
    """Move a fully written (and fsynced) temp file into place, durably."""
    src.replace(dest)
    fsync_dir(dest.parent)


class EmulatorState:
    """Files and batches of one emulator, kept in memory and on disk.

    Construction does no I/O; `load()` (run by the app's lifespan) creates the
    folders and reads every record. Mutations change the in-memory record
    first and then persist a snapshot with `save_file` / `save_batch`.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.batches_dir = data_dir / "batches"
        self.spool_dir = data_dir / "spool"
        self.fail_once_dir = data_dir / "fail_once"
        self.tmp_dir = data_dir / "tmp"
        self._files: dict[str, StoredFile] = {}
        #: sha256 → the ids of the files stored with it: Together's 409 reuse looks up one
        #: checksum, not every file the emulator ever kept
        self._by_checksum: dict[str, set[str]] = {}
        self._batches: dict[str, StoredBatch] = {}
        #: batch ids newest first, kept until a batch is added (creation times never change): a
        #: list call pages through a long history without sorting all of it for every page
        self._newest_first: list[str] | None = None
        self._seq = 0
        self._secret = b""
        # One lock per record path so that concurrent saves land in order.
        self._write_locks: dict[Path, anyio.Lock] = {}
        self.loaded = False

    # -- start-up -------------------------------------------------------------

    async def load(self) -> None:
        """Create the layout if needed and read every record (idempotent)."""
        if self.loaded:
            return
        await anyio.to_thread.run_sync(self._load_sync)
        self.loaded = True
        log.info(
            "emulator.state.loaded",
            data_dir=str(self.data_dir),
            files=len(self._files),
            batches=len(self._batches),
        )

    def _load_sync(self) -> None:
        for folder in (self.files_dir, self.batches_dir, self.spool_dir, self.fail_once_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Whatever sits in tmp/ is an upload or a write that a crash interrupted.
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        secret_path = self.data_dir / "secret"
        if not secret_path.exists():
            atomic_write_bytes(secret_path, secrets.token_bytes(32), tmp_dir=self.tmp_dir, mode=SECRET_MODE)
        elif stat.S_IMODE(secret_path.stat().st_mode) != SECRET_MODE:
            # Written by an older release under a loose umask.
            secret_path.chmod(SECRET_MODE)
        self._secret = secret_path.read_bytes()
        for meta in self.files_dir.glob("*.json"):
            self._keep(_file_from_json(json.loads(meta.read_bytes())))
        for meta in self.batches_dir.glob("*.json"):
            batch = _batch_from_json(json.loads(meta.read_bytes()))
            self._batches[batch.id] = batch
        seqs = [r.seq for r in self._files.values()] + [b.seq for b in self._batches.values()]
        self._seq = max(seqs, default=0)

    def next_seq(self) -> int:
        """A number larger than that of every record so far."""
        self._seq += 1
        return self._seq

    # -- files ----------------------------------------------------------------

    @staticmethod
    def new_file_id(dialect: str = "together") -> str:
        """A Together-style file id (it matches the SDK's safe-id pattern); Gemini's are lower-case
        letters and digits (its SDK reads a file's id out of its URI as `[a-z0-9]+`)."""
        if dialect == "gemini":
            return uuid.uuid4().hex
        return f"file-{uuid.uuid4()}"

    def file(self, file_id: str) -> StoredFile | None:
        """The file with this id, if any."""
        return self._files.get(file_id)

    def files(self) -> list[StoredFile]:
        """Every file, newest first."""
        return sorted(self._files.values(), key=lambda f: (f.created_at, f.seq), reverse=True)

    def find_processed_by_checksum(self, checksum: str) -> StoredFile | None:
        """The oldest processed file with this sha256, for Together's 409 reuse."""
        found = (self._files.get(file_id) for file_id in self._by_checksum.get(checksum, ()))
        matches = [f for f in found if f is not None and f.processed and f.checksum == checksum]
        return min(matches, key=lambda f: f.seq, default=None)

    def _keep(self, record: StoredFile) -> None:
        """Hold a file's record in memory, found by its id and its checksum."""
        self._files[record.id] = record
        if record.checksum is not None:
            self._by_checksum.setdefault(record.checksum, set()).add(record.id)

    def content_path(self, file_id: str) -> Path:
        """Where a file's content lives."""
        return self.files_dir / f"{file_id}.data"

    def temp_path(self, hint: str = "upload") -> Path:
        """A fresh path under tmp/ (same filesystem as the stores, so renames are atomic)."""
        return self.tmp_dir / f"{hint}.{uuid.uuid4().hex}.tmp"

    async def save_file(self, record: StoredFile) -> None:
        """Record a new or changed file's metadata durably."""
        self._keep(record)
        await self._write_json(self.files_dir / f"{record.id}.json", lambda: asdict(record))

    async def delete_file(self, file_id: str) -> None:
        """Forget a file: its metadata first (so a crash never leaves a record without content)."""
        record = self._files.pop(file_id, None)
        if record is None:
            return
        if record.checksum is not None:
            # (An id filed under a checksum the record no longer has is skipped by the lookup.)
            same = self._by_checksum.get(record.checksum, set())
            same.discard(file_id)
            if not same:
                self._by_checksum.pop(record.checksum, None)
        meta = self.files_dir / f"{file_id}.json"
        async with self._write_locks.setdefault(meta, anyio.Lock()):
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_unlink_durably, meta)
                await anyio.to_thread.run_sync(_unlink_durably, self.content_path(file_id))
        # Forgotten with the record: the locks of a long history must not pile up in memory.
        self._write_locks.pop(meta, None)

    def reader_of(self, file_id: str) -> StoredBatch | None:
        """The unfinished batch that still reads this file as its input, if any: its worker streams
        the requests from it until the batch ends, so the file may not go before."""
        return next((b for b in self._batches.values() if b.input_file_id == file_id and not b.status.terminal), None)

    async def install_content(self, record: StoredFile, tmp: Path) -> None:
        """Move fsynced content from tmp/ into place, then save the metadata that points at it
        (both in one worker-thread call: an upload's answer waits for one hop, not two)."""
        dest = self.content_path(record.id)
        # Said to be uploaded on disk first, in memory once the content and the record are durable.
        await self._write_json(
            self.files_dir / f"{record.id}.json",
            lambda: {**asdict(record), "uploaded": True},
            before=lambda: install_file(tmp, dest),
        )
        record.uploaded = True
        self._keep(record)

    # -- batches --------------------------------------------------------------

    @staticmethod
    def new_batch_id(dialect: str = "together") -> str:
        """Together batch ids are bare UUIDs; OpenAI's look like `batch_<hex>`; Gemini's are hex
        (its name is `batches/<id>`)."""
        if dialect == "openai":
            return f"batch_{uuid.uuid4().hex}"
        if dialect == "gemini":
            return uuid.uuid4().hex
        return str(uuid.uuid4())

    def batch(self, batch_id: str) -> StoredBatch | None:
        """The batch with this id, if any."""
        return self._batches.get(batch_id)

    def batches(self) -> list[StoredBatch]:
        """Every batch, newest first."""
        if self._newest_first is None:
            ordered = sorted(self._batches.values(), key=lambda b: (b.created_at, b.seq), reverse=True)
            self._newest_first = [b.id for b in ordered]
        return [self._batches[batch_id] for batch_id in self._newest_first]

    def unfinished_batches(self) -> list[StoredBatch]:
        """Batches a restart must pick up again, oldest first."""
        return sorted(
            (b for b in self._batches.values() if not b.status.terminal),
            key=lambda b: (b.created_at, b.seq),
        )

    async def save_batch(self, batch: StoredBatch) -> None:
        """Record a new or changed batch durably."""
        if batch.id not in self._batches:
            self._newest_first = None
        self._batches[batch.id] = batch
        await self._write_json(self.batches_dir / f"{batch.id}.json", lambda: _batch_to_json(batch))

    async def delete_batch(self, batch_id: str) -> None:
        """Forget a finished batch (its result files stay, as files)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return
        assert batch.status.terminal, "only a finished batch is deleted"
        del self._batches[batch_id]
        self._newest_first = None
        meta = self.batches_dir / f"{batch_id}.json"
        async with self._write_locks.setdefault(meta, anyio.Lock()):
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_unlink_durably, meta)
        self._write_locks.pop(meta, None)

    def spool_path(self, batch_id: str) -> Path:
        """Where a running batch collects its answers."""
        return self.spool_dir / f"{batch_id}.jsonl"

    # -- fail_once memory -----------------------------------------------------

    async def first_failure(self, key: str) -> bool:
        """True the first time `key` is seen (and remember it durably); False afterwards."""
        marker = self.fail_once_dir / hashlib.sha256(key.encode()).hexdigest()
        return await anyio.to_thread.run_sync(_create_marker, marker)

    # -- upload signatures ----------------------------------------------------

    def sign(self, file_id: str) -> str:
        """The signature of a presigned-style upload URL for this file."""
        return hmac.new(self._secret, file_id.encode(), hashlib.sha256).hexdigest()

    def verify(self, file_id: str, signature: str) -> bool:
        """Whether `signature` was issued by this emulator for this file."""
        return bool(self._secret) and hmac.compare_digest(self.sign(file_id), signature)

    # -- plumbing -------------------------------------------------------------

    async def _write_json(
        self, path: Path, snapshot: Callable[[], dict[str, Any]], *, before: Callable[[], None] | None = None
    ) -> None:
        """Write the record `snapshot()` to `path` durably; `before`, if given, runs first in the
        same worker thread (what the record points at, made durable before it)."""
        lock = self._write_locks.setdefault(path, anyio.Lock())
        async with lock:
            # Serialise inside the lock: the last writer writes the latest state.
            data = json.dumps(snapshot(), sort_keys=True).encode()

            def write() -> None:
                if before is not None:
                    before()
                atomic_write_bytes(path, data, tmp_dir=self.tmp_dir)

            # Shielded: a record write that starts is finished even when its caller is cancelled.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(write)


def _unlink_durably(path: Path) -> None:
    """Remove a file (if there) and make the removal durable."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _create_marker(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.fsync(fd)
    os.close(fd)
    fsync_dir(marker.parent)
    return True
