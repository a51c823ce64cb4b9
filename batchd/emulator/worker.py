"""The batch worker: VALIDATING → IN_PROGRESS → a terminal status, with result files.

Each batch runs in its own task under the worker's task group. Whoever moves
a batch (its run, or a cancel) holds that batch's lock, so a cancel and the
run never write the same batch at once. A batch that was not finished when
the process stopped is run again from the start after a restart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from batchd.emulator.engines import Engine
from batchd.emulator.spool import RequestLines, SpoolWriter, WrittenResults, write_sorted_results
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch, StoredFile
from batchd.emulator.triggers import (
    TRIGGER_KEY,
    TriggerError,
    error_line,
    fail_once_key,
    split_trigger,
    status_line,
)
from batchd.models import PROVIDER_LIMITS

log = structlog.get_logger()

#: Together's per-batch limits (DESIGN §3: the local backend uses them too).
LIMITS = PROVIDER_LIMITS["together"]
#: Longest custom_id Together accepts.
MAX_CUSTOM_ID = 64


class Gate:
    """Pause switch: while closed, no batch advances (tests catch jobs in flight without sleeping)."""

    def __init__(self) -> None:
        self._paused = False
        # Created when first waited on: anyio primitives need a running event loop.
        self._resumed: anyio.Event | None = None

    @property
    def paused(self) -> bool:
        """Whether the worker is held."""
        return self._paused

    def pause(self) -> None:
        """Hold every batch where it is."""
        self._paused = True

    def resume(self) -> None:
        """Let every batch go on."""
        self._paused = False
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    async def wait(self) -> None:
        """Return at once unless paused; then wait for resume()."""
        while self._paused:
            if self._resumed is None:
                self._resumed = anyio.Event()
            await self._resumed.wait()


class NotCancellable(Exception):
    """The batch already ended."""


@dataclass(frozen=True)
class InputPlan:
    """What validation learned about a batch's input file."""

    #: requests in the file
    total: int
    #: requests to answer before a stop trigger (== total without one)
    limit: int
    #: the status a stop trigger ends the batch in
    stop: BatchStatus | None = None
    #: the line number of the stop trigger
    stop_line: int = 0
    #: why the input is invalid (the batch FAILS); None when valid
    error: str | None = None


def _check_line(lineno: int, raw: bytes, endpoint: str) -> tuple[str, Any]:
    """Return (custom_id, trigger or None) of a valid request line; raise ValueError otherwise."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ValueError(f"line {lineno}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {lineno}: not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise ValueError(f"line {lineno}: custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"line {lineno}: method must be POST")
    if obj.get("url") != endpoint:
        raise ValueError(f"line {lineno}: url {obj.get('url')!r} is not the batch endpoint {endpoint!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError(f"line {lineno}: body must be a JSON object")
    try:
        trigger, _ = split_trigger(body)
    except TriggerError as exc:
        raise ValueError(f"line {lineno}: {exc}") from None
    return custom_id, trigger


class BatchWorker:
    """Runs batches: validation, answering through the engine, result files.

    `concurrency` bounds the requests of one batch in flight at once (the
    engine may bound them further). Call `run()` in a task group; `enqueue()`
    hands it a new batch; `cancel()` ends one with what it answered so far.
    """

    def __init__(
        self, state: EmulatorState, engine: Engine, gate: Gate, clock: Clock, *, concurrency: int = 64
    ) -> None:
        self._state = state
        self._engine = engine
        self._gate = gate
        self._clock = clock
        self._concurrency = concurrency
        self._send: MemoryObjectSendStream[str] | None = None
        self._runs: dict[str, anyio.CancelScope] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._cancelling: set[str] = set()

    # -- driving --------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Pick up unfinished batches, then every enqueued one, until cancelled."""
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=math.inf)
        self._send = send
        try:
            async with receive, anyio.create_task_group() as tg:
                for batch in self._state.unfinished_batches():
                    log.info("emulator.batch.resumed", batch_id=batch.id, status=batch.status.value)
                    tg.start_soon(self._run_batch, batch.id)
                task_status.started()
                async for batch_id in receive:
                    tg.start_soon(self._run_batch, batch_id)
        finally:
            self._send = None
            send.close()

    def enqueue(self, batch_id: str) -> None:
        """Start working on a newly created batch (kept on disk if the worker is not running)."""
        if self._send is None:
            log.warning("emulator.worker.not_running", batch_id=batch_id)
            return
        self._send.send_nowait(batch_id)

    async def cancel(self, batch_id: str) -> StoredBatch:
        """Stop a batch and end it CANCELLED, keeping the answers it already has.

        Raises KeyError for an unknown batch and NotCancellable for a finished one.
        """
        batch = self._state.batch(batch_id)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status.terminal:
            raise NotCancellable(batch.status.value)
        self._cancelling.add(batch_id)
        try:
            run = self._runs.get(batch_id)
            if run is not None:
                run.cancel()
            # The run gives the lock back once its cancellation has unwound (its spool is flushed).
            async with self._lock(batch_id):
                if batch.status.terminal:
                    raise NotCancellable(batch.status.value)
                await self._finish(batch, BatchStatus.CANCELLED)
        finally:
            self._cancelling.discard(batch_id)
        return batch

    def _lock(self, batch_id: str) -> anyio.Lock:
        return self._locks.setdefault(batch_id, anyio.Lock())

    async def _run_batch(self, batch_id: str) -> None:
        if batch_id in self._runs or batch_id in self._cancelling:
            return
        scope = anyio.CancelScope()
        self._runs[batch_id] = scope
        try:
            with scope:
                async with self._lock(batch_id):
                    batch = self._state.batch(batch_id)
                    if batch is None or batch.status.terminal or batch_id in self._cancelling:
                        return
                    try:
                        await self._process(batch)
                    except Exception as exc:
                        # A bug or a full disk must not leave the batch IN_PROGRESS forever.
                        log.exception("emulator.batch.crashed", batch_id=batch_id)
                        await self._finish(batch, BatchStatus.FAILED, error=f"internal error: {exc}")
        finally:
            self._runs.pop(batch_id, None)

    # -- one batch ------------------------------------------------------------

    async def _process(self, batch: StoredBatch) -> None:
        await self._gate.wait()
        plan = await self._plan(batch)
        if plan.error is not None:
            log.info("emulator.batch.invalid", batch_id=batch.id, error=plan.error)
            await self._finish(batch, BatchStatus.FAILED, error=plan.error)
            return
        batch.total = plan.total
        await self._gate.wait()
        if batch.status is BatchStatus.VALIDATING:
            batch.status = BatchStatus.IN_PROGRESS
            batch.in_progress_at = self._clock()
            await self._state.save_batch(batch)
            log.info("emulator.batch.in_progress", batch_id=batch.id, total=plan.total)
        expired = await self._execute(batch, plan)
        await self._gate.wait()
        if expired:
            await self._finish(batch, BatchStatus.EXPIRED)
        elif plan.stop is BatchStatus.FAILED:
            error = f"batch failed at line {plan.stop_line} ({TRIGGER_KEY}.fail_batch)"
            await self._finish(batch, BatchStatus.FAILED, error=error)
        elif plan.stop is not None:
            await self._finish(batch, plan.stop)
        else:
            await self._finish(batch, BatchStatus.COMPLETED)

    async def _plan(self, batch: StoredBatch) -> InputPlan:
        """Check every line of the input (streamed) and find the first stop trigger."""
        if batch.file_size_bytes > LIMITS.max_bytes:
            return InputPlan(0, 0, error=f"input file is larger than {LIMITS.max_bytes} bytes")
        seen: set[str] = set()
        limit: int | None = None
        stop: BatchStatus | None = None
        stop_line = 0
        async with RequestLines(self._state.content_path(batch.input_file_id)) as lines:
            while block := await lines.next_lines():
                for lineno, raw in block:
                    try:
                        custom_id, trigger = _check_line(lineno, raw, batch.endpoint)
                    except ValueError as exc:
                        return InputPlan(0, 0, error=str(exc))
                    if custom_id in seen:
                        return InputPlan(0, 0, error=f"line {lineno}: duplicate custom_id {custom_id!r}")
                    seen.add(custom_id)
                    if limit is None and trigger is not None and trigger.stops_batch:
                        limit = len(seen) - 1
                        stop = BatchStatus.EXPIRED if trigger.expire_batch else BatchStatus.FAILED
                        stop_line = lineno
                await anyio.lowlevel.checkpoint()
        if not seen:
            return InputPlan(0, 0, error="the input file holds no requests")
        if len(seen) > LIMITS.max_requests:
            return InputPlan(0, 0, error=f"the input file holds more than {LIMITS.max_requests} requests")
        total = len(seen)
        return InputPlan(total, total if limit is None else limit, stop, stop_line)

    async def _execute(self, batch: StoredBatch, plan: InputPlan) -> bool:
        """Answer the first `plan.limit` requests; True when the completion window ran out first."""
        batch.completed = batch.failed = 0
        batch.progress = 0.0
        slots = anyio.Semaphore(self._concurrency)
        dispatched = 0
        expired = False
        input_path = self._state.content_path(batch.input_file_id)
        async with (
            SpoolWriter(self._state.spool_path(batch.id)) as spool,
            RequestLines(input_path) as lines,
            # Innermost: every answer task ends before the spool is closed.
            anyio.create_task_group() as tg,
        ):
            while dispatched < plan.limit and not expired and (block := await lines.next_lines()):
                for _lineno, raw in block[: plan.limit - dispatched]:
                    if self._clock() >= batch.deadline:
                        expired = True
                        break
                    await self._gate.wait()
                    await slots.acquire()
                    tg.start_soon(self._answer_into, batch, raw, spool, slots)
                    dispatched += 1
        return expired

    async def _answer_into(self, batch: StoredBatch, raw: bytes, spool: SpoolWriter, slots: anyio.Semaphore) -> None:
        try:
            ok, custom_id, line = await self._answer(batch, raw)
            # Paused: the answer is held back, so the batch does not advance.
            await self._gate.wait()
            spool.append(ok, custom_id, line)
            if ok:
                batch.completed += 1
            else:
                batch.failed += 1
            batch.progress = round(100.0 * (batch.completed + batch.failed) / max(batch.total, 1), 2)
            if spool.full:
                await spool.flush()
        finally:
            slots.release()

    async def _answer(self, batch: StoredBatch, raw: bytes) -> tuple[bool, str, dict[str, Any]]:
        """One request's result line and whether it belongs in the output file."""
        request = json.loads(raw)  # validated in _plan
        custom_id: str = request["custom_id"]
        trigger, body = split_trigger(request["body"])
        if trigger is not None:
            if trigger.error is not None:
                return False, custom_id, error_line(custom_id, trigger.error)
            if trigger.status is not None:
                return False, custom_id, status_line(custom_id, trigger.status)
            if trigger.fail_once is not None and await self._state.first_failure(fail_once_key(custom_id, body)):
                return False, custom_id, status_line(custom_id, trigger.fail_once)
        try:
            status, reply = await self._engine.respond(batch.endpoint, body)
        except Exception:
            log.exception("emulator.engine.crashed", batch_id=batch.id, custom_id=custom_id)
            return False, custom_id, status_line(custom_id, 500)
        line = {"custom_id": custom_id, "response": {"status_code": status, "body": reply}}
        return 200 <= status < 300, custom_id, line

    async def _finish(self, batch: StoredBatch, status: BatchStatus, *, error: str | None = None) -> None:
        """Write the result files and record the terminal status; never interrupted half-way."""
        with anyio.CancelScope(shield=True):
            output_id, error_id = await self._write_results(batch)
            batch.status = status
            batch.error = error
            batch.output_file_id = output_id
            batch.error_file_id = error_id
            batch.finished_at = self._clock()
            if status is BatchStatus.COMPLETED:
                batch.progress = 100.0
            await self._state.save_batch(batch)
            await anyio.Path(self._state.spool_path(batch.id)).unlink(missing_ok=True)
        log.info(
            "emulator.batch.finished",
            batch_id=batch.id,
            status=status.value,
            completed=batch.completed,
            failed=batch.failed,
            error=error,
        )

    async def _write_results(self, batch: StoredBatch) -> tuple[str | None, str | None]:
        out_tmp = self._state.temp_path("output")
        err_tmp = self._state.temp_path("errors")
        written: WrittenResults = await anyio.to_thread.run_sync(
            write_sorted_results, self._state.spool_path(batch.id), out_tmp, err_tmp
        )
        output_id = await self._install_result(batch, out_tmp, "output", written.output_lines, written.output_bytes)
        error_id = await self._install_result(batch, err_tmp, "errors", written.error_lines, written.error_bytes)
        return output_id, error_id

    async def _install_result(self, batch: StoredBatch, tmp: Path, kind: str, lines: int, size: int) -> str | None:
        if lines == 0:
            await anyio.Path(tmp).unlink(missing_ok=True)
            return None
        record = StoredFile(
            id=self._state.new_file_id(),
            seq=self._state.next_seq(),
            filename=f"batch_{batch.id}_{kind}.jsonl",
            purpose="batch-api",
            file_type="jsonl",
            created_at=int(self._clock().timestamp()),
            bytes=size,
            line_count=lines,
            processed=True,
        )
        await self._state.install_content(record, tmp)
        return record.id
