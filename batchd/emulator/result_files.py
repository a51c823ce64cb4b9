"""A finished batch's result files: written from its spool, stored as the service stores them.

Together, OpenAI and Anthropic batches get an output file (2xx answers) and an error file (the
rest); a Gemini batch gets one responses file holding both.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread

from batchd.emulator.gemini_files import FILE_PURPOSE
from batchd.emulator.spool import WrittenResults, write_sorted_results
from batchd.emulator.state import Clock, EmulatorState, StoredBatch, StoredFile

#: OpenAI keeps batch result files 30 days unless told otherwise.
OPENAI_RESULT_TTL_S = 30 * 24 * 3600
#: Gemini's files (uploaded or made by a batch) live 48 hours.
GEMINI_FILE_TTL_S = 48 * 3600


async def write_result_files(state: EmulatorState, batch: StoredBatch, clock: Clock) -> tuple[str | None, str | None]:
    """Write a batch's output and error files from its spool, sorted as the service sorts them;
    return their file ids (None for a file with no line). A Gemini batch's one responses file
    is the output file."""
    out_tmp = state.temp_path("output")
    combined = batch.dialect == "gemini"
    err_tmp = None if combined else state.temp_path("errors")
    written: WrittenResults = await anyio.to_thread.run_sync(
        write_sorted_results, state.spool_path(batch.id), out_tmp, err_tmp
    )
    # The counts follow the files (a cancel may have cut the run between two answers).
    batch.completed, batch.failed = written.output_lines, written.error_lines
    if combined:
        lines, size = written.output_lines + written.error_lines, written.output_bytes + written.error_bytes
        return await _install_result(state, batch, clock, out_tmp, True, lines, size), None
    assert err_tmp is not None
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
    gemini = batch.dialect == "gemini"
    record = StoredFile(
        id=state.new_file_id(batch.dialect),
        seq=state.next_seq(),
        filename=_result_name(batch, output),
        purpose=_purpose(batch),
        file_type="jsonl",
        created_at=created,
        bytes=size,
        line_count=lines,
        processed=True,
        result_of=batch.id,
        expires_at=created + OPENAI_RESULT_TTL_S if openai else created + GEMINI_FILE_TTL_S if gemini else None,
        mime_type="application/jsonl" if gemini else None,
    )
    await state.install_content(record, tmp)
    return record.id


def _purpose(batch: StoredBatch) -> str:
    """OpenAI's own purpose; Gemini's dialect shows a file batch's responses file (an inline batch
    shows its responses in itself); Together's purpose otherwise."""
    if batch.dialect == "openai":
        return "batch_output"
    if batch.dialect == "gemini":
        return FILE_PURPOSE if batch.source_file_id is not None else "gemini-inline-responses"
    return "batch-api"


def _result_name(batch: StoredBatch, output: bool) -> str:
    if batch.dialect == "openai":
        # OpenAI's own names: batch_abc_output.jsonl, batch_abc_error.jsonl.
        return f"{batch.id}_{'output' if output else 'error'}.jsonl"
    if batch.dialect == "gemini":
        return f"batch-{batch.id}-responses.jsonl"
    return f"batch_{batch.id}_{'output' if output else 'errors'}.jsonl"
