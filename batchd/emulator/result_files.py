"""A finished batch's result files: written from its spool, stored as the service stores them."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread

from batchd.emulator.spool import WrittenResults, write_sorted_results
from batchd.emulator.state import Clock, EmulatorState, StoredBatch, StoredFile

#: OpenAI keeps batch result files 30 days unless told otherwise.
OPENAI_RESULT_TTL_S = 30 * 24 * 3600


async def write_result_files(state: EmulatorState, batch: StoredBatch, clock: Clock) -> tuple[str | None, str | None]:
    """Write a batch's output and error files from its spool, sorted as the service sorts them;
    return their file ids (None for a file with no line)."""
    out_tmp = state.temp_path("output")
    err_tmp = state.temp_path("errors")
    written: WrittenResults = await anyio.to_thread.run_sync(
        write_sorted_results, state.spool_path(batch.id), out_tmp, err_tmp
    )
    # The counts follow the files (a cancel may have cut the run between two answers).
    batch.completed, batch.failed = written.output_lines, written.error_lines
    output_id = await _install_result(state, batch, clock, out_tmp, True, written.output_lines, written.output_bytes)
    error_id = await _install_result(state, batch, clock, err_tmp, False, written.error_lines, written.error_bytes)
    return output_id, error_id


async def _install_result(
    state: EmulatorState, batch: StoredBatch, clock: Clock, tmp: Path, output: bool, lines: int, size: int
) -> str | None:
    if lines == 0:
        await anyio.Path(tmp).unlink(missing_ok=True)
        return None
    created = int(clock().timestamp())
    openai = batch.dialect == "openai"
    record = StoredFile(
        id=state.new_file_id(),
        seq=state.next_seq(),
        filename=_result_name(batch, output),
        purpose="batch_output" if openai else "batch-api",
        file_type="jsonl",
        created_at=created,
        bytes=size,
        line_count=lines,
        processed=True,
        result_of=batch.id,
        expires_at=created + OPENAI_RESULT_TTL_S if openai else None,
    )
    await state.install_content(record, tmp)
    return record.id


def _result_name(batch: StoredBatch, output: bool) -> str:
    if batch.dialect == "openai":
        # OpenAI's own names: batch_abc_output.jsonl, batch_abc_error.jsonl.
        return f"{batch.id}_{'output' if output else 'error'}.jsonl"
    return f"batch_{batch.id}_{'output' if output else 'errors'}.jsonl"
