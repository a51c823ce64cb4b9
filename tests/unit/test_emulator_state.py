"""The emulator's state over a long history: what it holds per record is forgotten with the record."""

from __future__ import annotations

from pathlib import Path

from batchd.emulator.state import EmulatorState, StoredFile


async def test_files_deleted_leave_nothing_behind_in_memory(tmp_path: Path) -> None:
    state = EmulatorState(tmp_path)
    await state.load()
    for n in range(50):
        record = StoredFile(
            id=state.new_file_id(), seq=state.next_seq(), filename=f"f{n}.jsonl", purpose="batch-api",
            file_type="jsonl", created_at=0, checksum=f"{n:064x}", processed=True,
        )  # fmt: skip
        await state.save_file(record)
        assert state.find_processed_by_checksum(record.checksum or "") is record
        await state.delete_file(record.id)
        assert state.find_processed_by_checksum(record.checksum or "") is None
    # The embedded backend runs for months: one lock and one index entry per file ever seen
    # would grow without end (what a record holds is private; its absence is the point).
    assert state.files() == []
    assert state._write_locks == {} and state._by_checksum == {}
