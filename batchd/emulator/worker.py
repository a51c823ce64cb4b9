"""The batch worker: VALIDATING → IN_PROGRESS → FINALIZING → a terminal status, with result files.

Each batch runs in its own task under the worker's task group. Whoever moves
a batch (its run, or a cancel) holds that batch's lock, so a cancel and the
run never write the same batch at once. Every answer is recorded durably in
the batch's spool as it arrives; a batch that was not finished when the
process stopped is picked up after a restart and only the requests without a
recorded answer are asked again. Checking the input is `inputs.py`'s; writing the
result files, `result_files.py`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from batchd.emulator.answers import (
    CANCELED_CODE,
    CANCELED_MESSAGE,
    EXPIRED_CODE,
    EXPIRED_MESSAGE,
    Answer,
    error_answer,
    render_line,
    status_answer,
)
from batchd.emulator.engines import Engine
from batchd.emulator.feed import RequestFeed
from batchd.emulator.inputs import InputPlan, InputProblem, plan_input
from batchd.emulator.queue import QueueLimit
from batchd.emulator.result_files import write_result_files
from batchd.emulator.spool import RequestLines, Spool, custom_id_hash
from batchd.emulator.state import BatchStatus, Clock, EmulatorState, StoredBatch
from batchd.emulator.timeline import Timeline
from batchd.emulator.triggers import TRIGGER_KEY, fail_once_key, split_trigger

log = structlog.get_logger()


#: What an Anthropic result says of a request its batch never ran, by how the batch ended.
_UNRUN = {
    BatchStatus.CANCELLED: (CANCELED_CODE, CANCELED_MESSAGE),
    BatchStatus.EXPIRED: (EXPIRED_CODE, EXPIRED_MESSAGE),
}


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
    """The batch already ended (or is finalizing)."""


class BatchWorker:
    """Runs batches: validation, answering through the engine, result files.

    `concurrency` bounds the requests of one batch in flight at the engine
    at once (the engine may bound them further, across batches; an answer
    waiting for the disk no longer counts); `timeline` sets how long each state
    lasts at least; `on_end` hears of each batch that ended. Call `run()` in a
    task group; `enqueue()` hands it a new batch; `cancel()` ends one with what
    it answered so far.
    """

    def __init__(
        self,
        state: EmulatorState,
        engine: Engine,
        gate: Gate,
        clock: Clock,
        *,
        concurrency: int = 64,
        timeline: Timeline | None = None,
        on_end: Callable[[StoredBatch], None] | None = None,
    ) -> None:
        self._state = state
        #: the account's queue of enqueued tokens: creates over it are refused (queue.py)
        self.queue = QueueLimit()
        #: told of every batch that ended, once it is saved (the provider webhooks): it must not block
        self._on_end = on_end
        self._engine = engine
        self._gate = gate
        self._clock = clock
        self._concurrency = concurrency
        self.timeline = timeline or Timeline()
        self._send: MemoryObjectSendStream[str] | None = None
        self._tg: TaskGroup | None = None
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
                self._tg = tg
                for batch in self._state.unfinished_batches():
                    log.info("emulator.batch.resumed", batch_id=batch.id, status=batch.status.value)
                    tg.start_soon(self._run_batch, batch.id)
                task_status.started()
                async for batch_id in receive:
                    tg.start_soon(self._run_batch, batch_id)
        finally:
            self._tg = None
            self._send = None
            send.close()

    def enqueue(self, batch_id: str) -> None:
        """Start working on a newly created batch (kept on disk if the worker is not running)."""
        if self._send is None:
            log.warning("emulator.worker.not_running", batch_id=batch_id)
            return
        self._send.send_nowait(batch_id)

    async def cancel(self, batch_id: str, *, wait: bool = True) -> StoredBatch:
        """Stop a batch and end it CANCELLED, keeping the answers it already has.

        With `wait` (Together's dialect) the batch is CANCELLED when this
        returns, even while the emulator is paused. Without it (OpenAI's
        dialect) it is CANCELLING when this returns; the worker ends it after
        `timeline.cancelling_s`, once not paused. Raises KeyError for an
        unknown batch and NotCancellable for a finished or finalizing one.
        """
        batch = self._state.batch(batch_id)
        if batch is None:
            raise KeyError(batch_id)
        if batch.status is BatchStatus.CANCELLING and not wait:
            return batch
        if batch.status.terminal or batch.status is BatchStatus.FINALIZING:
            raise NotCancellable(batch.status.value)
        self._cancelling.add(batch_id)
        try:
            run = self._runs.get(batch_id)
            if run is not None:
                run.cancel()
            # The run gives the lock back once its cancellation has unwound (its spool is closed).
            async with self._lock(batch_id):
                # Looked up again: the run may have moved it meanwhile.
                batch = self._state.batch(batch_id)
                assert batch is not None
                if batch.status is BatchStatus.FINALIZING:
                    # The run was stopped after its last answer: finish what it was finishing.
                    await self._finish(batch, BatchStatus.COMPLETED)
                if batch.status.terminal:
                    raise NotCancellable(batch.status.value)
                if wait:
                    await self._finish(batch, BatchStatus.CANCELLED)
                    return batch
                batch.status = BatchStatus.CANCELLING
                batch.cancelling_at = self._clock()
                await self._state.save_batch(batch)
                log.info("emulator.batch.cancelling", batch_id=batch_id)
        finally:
            self._cancelling.discard(batch_id)
        if self._tg is not None:
            self._tg.start_soon(self._end_cancelling, batch_id)
        return batch

    def _lock(self, batch_id: str) -> anyio.Lock:
        return self._locks.setdefault(batch_id, anyio.Lock())

    async def _end_cancelling(self, batch_id: str) -> None:
        """CANCELLING → CANCELLED after the timeline's wait, once not paused."""
        await anyio.sleep(self.timeline.cancelling_s)
        await self._gate.wait()
        async with self._lock(batch_id):
            batch = self._state.batch(batch_id)
            if batch is not None and batch.status is BatchStatus.CANCELLING:
                await self._finish(batch, BatchStatus.CANCELLED)

    async def _run_batch(self, batch_id: str) -> None:
        if batch_id in self._runs or batch_id in self._cancelling:
            return
        batch = self._state.batch(batch_id)
        if batch is not None and batch.status is BatchStatus.CANCELLING:
            # Stopped while cancelling: the cancel is carried out now.
            await self._end_cancelling(batch_id)
            return
        scope = anyio.CancelScope()
        self._runs[batch_id] = scope
        try:
            with scope:
                async with self._lock(batch_id):
                    batch = self._state.batch(batch_id)
                    if batch is None or batch.status.terminal or batch_id in self._cancelling:
                        return
                    if batch.status is BatchStatus.CANCELLING:
                        return
                    try:
                        await self._process(batch)
                    except Exception as exc:
                        # A bug or a full disk must not leave the batch IN_PROGRESS forever.
                        log.exception("emulator.batch.crashed", batch_id=batch_id)
                        problem = InputProblem(f"internal error: {exc}", "internal_error")
                        await self._finish(batch, BatchStatus.FAILED, problem=problem)
        finally:
            self._runs.pop(batch_id, None)

    # -- one batch ------------------------------------------------------------

    async def _process(self, batch: StoredBatch) -> None:
        started = anyio.current_time()
        await self._gate.wait()
        if batch.status is BatchStatus.FINALIZING:
            # Stopped after its last answer: every answer is in the spool.
            await self._finalize(batch)
            return
        plan = await plan_input(self._state, batch)
        if plan.problem is not None:
            log.info("emulator.batch.invalid", batch_id=batch.id, error=plan.problem.message)
            await self._finish(batch, BatchStatus.FAILED, problem=plan.problem)
            return
        batch.total = plan.total
        if batch.status is BatchStatus.VALIDATING:
            if plan.hold and not batch.held:
                batch.held = True
                await self._state.save_batch(batch)
            if batch.held:
                # `pending_once`: the batch never starts; a cancel (which cancels this run) ends it.
                log.info("emulator.batch.held", batch_id=batch.id, total=plan.total)
                await anyio.sleep_forever()
            await anyio.sleep_until(started + self.timeline.validating_s)
            await self._gate.wait()
            batch.status = BatchStatus.IN_PROGRESS
            batch.in_progress_at = self._clock()
            await self._state.save_batch(batch)
            log.info("emulator.batch.in_progress", batch_id=batch.id, total=plan.total)
        expired = await self._execute(batch, plan)
        await self._gate.wait()
        if expired:
            await self._finish(batch, BatchStatus.EXPIRED)
        elif plan.stop is BatchStatus.FAILED:
            message = f"batch failed at line {plan.stop_line} ({TRIGGER_KEY}.fail_batch)"
            problem = InputProblem(message, "batch_failed", plan.stop_line)
            await self._finish(batch, BatchStatus.FAILED, problem=problem)
        elif plan.stop is not None:
            await self._finish(batch, plan.stop)
        else:
            await self._finalize(batch)

    async def _finalize(self, batch: StoredBatch) -> None:
        if batch.status is not BatchStatus.FINALIZING:
            batch.status = BatchStatus.FINALIZING
            batch.finalizing_at = self._clock()
            await self._state.save_batch(batch)
        await anyio.sleep(self.timeline.finalizing_s)
        await self._gate.wait()
        await self._finish(batch, BatchStatus.COMPLETED)

    async def _execute(self, batch: StoredBatch, plan: InputPlan) -> bool:
        """Answer the first `plan.limit` requests; True when the completion window ran out first."""
        # At most `concurrency` requests at the engine; waiting for the disk does not count.
        slots = anyio.Semaphore(self._concurrency, fast_acquire=True)
        pace = self.timeline.in_progress_min_s
        input_path = self._state.content_path(batch.input_file_id)
        async with Spool(self._state.spool_path(batch.id)) as spool:
            done = spool.summary
            batch.completed, batch.failed = done.completed, done.failed
            batch.input_tokens, batch.output_tokens = done.input_tokens, done.output_tokens
            self._update_progress(batch)
            if done.answered:
                log.info("emulator.batch.resuming", batch_id=batch.id, answered=len(done.answered))
            started = anyio.current_time()
            async with RequestLines(input_path) as lines:
                feed = RequestFeed(
                    lines, limit=plan.limit, answered=done.answered, pace_s=pace, started=started,
                    deadline=batch.deadline, clock=self._clock, gate_wait=self._gate.wait,
                )  # fmt: skip
                # Lanes, each taking the next request when it is done with one, rather than a task
                # per request (spawning one cost more than the worker's own work on it). Twice as
                # many as slots: the answers of half of them may be waiting for the disk.
                # Innermost: every lane ends before the spool is closed.
                async with anyio.create_task_group() as tg:
                    for _ in range(min(2 * self._concurrency, plan.limit)):
                        tg.start_soon(self._lane, batch, feed, spool, slots)
            expired = feed.expired
            if not expired:
                await anyio.sleep_until(started + pace)
            if batch.dialect == "openai" and (expired or plan.stop is BatchStatus.EXPIRED):
                await self._record_unrun(batch, spool, EXPIRED_CODE, EXPIRED_MESSAGE)
        return expired

    async def _lane(self, batch: StoredBatch, feed: RequestFeed, spool: Spool, slots: anyio.Semaphore) -> None:
        """Answer requests from `feed` one after another, each recorded in the spool."""
        while (taken := await feed.next()) is not None:
            key, request = taken
            await slots.acquire()
            try:
                answer = await self._answer(batch, request)
            finally:
                # The slot bounds requests at the engine; waiting for the disk must not idle the engine.
                slots.release()
            # Paused: the answer is held back, so the batch does not advance.
            await self._gate.wait()
            line = render_line(batch.dialect, batch.id, answer)
            await spool.append([(answer.ok, answer.custom_id, line)], keys=[key])
            if answer.ok:
                batch.completed += 1
                used_in, used_out = answer.usage()
                batch.input_tokens += used_in
                batch.output_tokens += used_out
            else:
                batch.failed += 1
            self._update_progress(batch)

    @staticmethod
    def _update_progress(batch: StoredBatch) -> None:
        batch.progress = round(100.0 * (batch.completed + batch.failed) / max(batch.total, 1), 2)

    async def _record_unrun(self, batch: StoredBatch, spool: Spool, code: str, message: str) -> None:
        """An error line for every request the batch never ran: OpenAI's `batch_expired` lines;
        Anthropic's `expired` and `canceled` results (and `errored` after a failure)."""
        async with RequestLines(self._state.content_path(batch.input_file_id)) as lines:
            while block := await lines.next_lines():
                records = []
                for _lineno, raw in block:
                    custom_id: str = json.loads(raw)["custom_id"]
                    if custom_id_hash(custom_id) not in spool.summary.answered:
                        answer = error_answer(custom_id, code, message)
                        records.append((False, custom_id, render_line(batch.dialect, batch.id, answer)))
                if records:
                    await spool.append(records)
                    batch.failed += len(records)
                    batch.unrun += len(records)

    async def _answer(self, batch: StoredBatch, request: dict[str, Any]) -> Answer:
        """One request's answer: from its trigger, else from the engine."""
        custom_id: str = request["custom_id"]
        trigger, body = split_trigger(request["body"])
        if trigger is not None:
            if trigger.error is not None:
                return error_answer(custom_id, trigger.error)
            if trigger.status is not None:
                return status_answer(custom_id, trigger.status)
            if trigger.fail_once is not None and await self._state.first_failure(fail_once_key(custom_id, body)):
                return status_answer(custom_id, trigger.fail_once)
        try:
            status, reply = await self._engine.respond(batch.endpoint, body)
        except Exception:
            log.exception("emulator.engine.crashed", batch_id=batch.id, custom_id=custom_id)
            return status_answer(custom_id, 500)
        return Answer(custom_id, status_code=status, body=reply)

    async def _finish(self, batch: StoredBatch, status: BatchStatus, *, problem: InputProblem | None = None) -> None:
        """Write the result files and record the terminal status; never interrupted half-way."""
        with anyio.CancelScope(shield=True):
            if batch.dialect == "anthropic" and status is not BatchStatus.COMPLETED:
                # Anthropic's results hold a line for every request, the ones never run included.
                code, message = _UNRUN.get(status, ("batch_failed", "The batch failed before this request ran."))
                async with Spool(self._state.spool_path(batch.id)) as spool:
                    await self._record_unrun(batch, spool, code, message)
            output_id, error_id = await write_result_files(self._state, batch, self._clock)
            now = self._clock()
            batch.status = status
            batch.error = problem.message if problem is not None else None
            batch.error_code = problem.code if problem is not None else None
            batch.error_line = problem.line if problem is not None else None
            batch.error_param = problem.param if problem is not None else None
            batch.output_file_id = output_id
            batch.error_file_id = error_id
            if status is BatchStatus.CANCELLED and batch.cancelling_at is None:
                batch.cancelling_at = now
            batch.finished_at = now
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
            error=batch.error,
        )
        if self._on_end is not None:
            try:
                self._on_end(batch)
            except Exception:
                # Telling others is best effort: the batch has ended whatever becomes of that.
                log.exception("emulator.batch.on_end_failed", batch_id=batch.id)
