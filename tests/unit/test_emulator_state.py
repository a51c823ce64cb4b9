"""The emulator's state over a long history (what it holds per record is forgotten with the
record), and its upload sink (whole, counted, and nothing left behind when the disk fails)."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from batchd.emulator import transfer
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


async def test_an_upload_whose_last_write_fails_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("batchd.emulator.transfer.os.fsync", full)
    path = tmp_path / "upload.tmp"
    with pytest.raises(OSError, match="No space left"):
        async with transfer.ContentSink(path) as sink:
            await sink.write(b'{"custom_id": "a"}\n')
    assert not path.exists()


async def test_an_upload_in_many_chunks_is_whole_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "upload.tmp"
    line = b'{"custom_id": "a", "pad": "' + b"x" * 1000 + b'"}\n'
    async with transfer.ContentSink(path) as sink:
        for _ in range(200):  # about 200 KB: written in several pieces of at most a chunk
            await sink.write(line)
    assert path.read_bytes() == line * 200
    assert sink.size == len(line) * 200 and sink.line_count == 200
    assert sink.sha256 == hashlib.sha256(line * 200).hexdigest()
