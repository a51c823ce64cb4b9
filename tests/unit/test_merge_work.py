"""Unit tests of the pieces of a merge's join on disk: spill files, usage sums, the phases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from batchd import merge_helper, merge_plan, spill
from batchd.merge_counts import Usage
from batchd.merge_plan import plan_merge
from batchd.merge_work import Worker, read_exactly, starts
from batchd.spill import Spill


def test_spill_keeps_each_partition_in_the_order_added(tmp_path: Path) -> None:
    store = Spill(tmp_path, "t", 3, "sq", held=4)
    added: dict[int, list[tuple[str, int]]] = {0: [], 1: [], 2: []}
    room = store.room()
    for n in range(23):
        part = n * 7 % 3
        ids, numbers = store.waiting[part]
        ids.append(f"id-{n}-é")
        numbers.append(n << 40)
        added[part].append((f"id-{n}-é", n << 40))
        room -= 1
        if not room:
            store.flush()
            room = store.room()
    store.flush()
    for part in range(3):
        rows = [row for ids, numbers in store.read(part) for row in zip(ids, numbers, strict=True)]
        assert rows == added[part]
    # At most `held` rows ever waited: every chunk is that small.
    assert all(len(ids) <= 4 for part in range(3) for ids, _ in store.read(part))


def test_spill_reads_nothing_for_a_partition_never_written(tmp_path: Path) -> None:
    store = Spill(tmp_path, "t", 2, "sqb")
    store.waiting[1][0].append("x")
    store.waiting[1][1].append(1)
    store.waiting[1][2].append(True)
    store.flush()
    assert list(store.read(0)) == []
    assert [[list(column) for column in chunk] for chunk in store.read(1)] == [[["x"], [1], [1]]]


def test_spill_flushes_when_full(tmp_path: Path) -> None:
    store = Spill(tmp_path, "t", 1, "q", held=3)
    store.waiting[0][0].extend([1, 2])
    store.flush_if_full()
    assert list(store.read(0)) == []
    store.waiting[0][0].extend([3])
    store.flush_if_full()
    assert [list(chunk[0]) for chunk in store.read(0)] == [[1, 2, 3]]


def usage_reference(usages: list[dict[str, Any]]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0) + value
    return sums


def test_usage_sums_integers_only_and_takes_back_exactly() -> None:
    kept: list[dict[str, Any]] = [
        {"prompt_tokens": 3, "total_tokens": 7, "details": {"x": 1}, "flag": True},
        {"prompt_tokens": 10, "cached": 0},
        {"prompt_tokens": 1.5, "total_tokens": 2},
        {},
    ]
    dropped: list[dict[str, Any]] = [{"prompt_tokens": 1000, "only_in_dropped": 5, "cached": 4}]
    usage = Usage()
    usage.add(kept + dropped)
    usage.add(dropped, sign=-1)
    assert usage.totals() == usage_reference(kept) == {"prompt_tokens": 13, "total_tokens": 9, "cached": 0}


def test_usage_merges_what_two_processes_counted() -> None:
    first, second = Usage(), Usage()
    first.add([{"a": 1}, {"a": 2, "b": 3}])
    second.add([{"a": 10}])
    second.add([{"b": 3}], sign=-1)
    first.merge(second)
    assert first.totals() == {"a": 13}


def test_read_exactly_refuses_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_exactly(fd, 2, 3) == b"cde"
        with pytest.raises(OSError, match="shrank"):
            read_exactly(fd, 4, 5)
    finally:
        os.close(fd)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_scan_items_split_answer_files_on_line_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Whatever the item size, every answer line is read once, whole, at its position."""
    monkeypatch.setattr(merge_plan, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(merge_plan, "PART_BYTES", 40)
    monkeypatch.setattr(spill, "HELD_ROWS", 3)
    upload = tmp_path / "upload.jsonl"
    ids = [f"r{i}" for i in range(12)]
    upload.write_bytes(b"".join(json.dumps({"custom_id": c}).encode() + b"\n" for c in ids))
    lines = [json.dumps({"custom_id": c, "response": {"status_code": 200, "body": {}}}).encode() for c in ids]
    # A long line, CRLF ends, a blank line, no end on the last line.
    lines[3] = json.dumps({"custom_id": "r3", "response": {"status_code": 500, "pad": "x" * 300}}).encode()
    first = tmp_path / "a.jsonl"
    first.write_bytes(b"\r\n".join(lines[:6]) + b"\r\n\n")
    second = tmp_path / "b.jsonl"
    second.write_bytes(b"\n".join(lines[6:]))
    folder = tmp_path / "work"
    folder.mkdir()
    plan = plan_merge(folder, upload, [first, second], "not_returned", cap=10)
    assert plan.parts == math.ceil(upload.stat().st_size / 40)
    assert len(plan.chunks) == sum(math.ceil(path.stat().st_size / chunk) for path in (first, second))
    worker = Worker(plan, "main", read_exactly)
    scanned = worker.scan()
    assert (scanned.total, scanned.unreadable) == (12, 0)
    joined = worker.join(12)
    assert (joined.completed, joined.failed, joined.unanswered) == (11, 1, 0)
    out, err = tmp_path / "out", tmp_path / "err"
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT) for path in (out, err)]
    try:
        worker.write(12, (fds[0], starts(joined.output_bytes)), (fds[1], starts(joined.error_bytes)))
    finally:
        worker.close()
        for fd in fds:
            os.close(fd)
    assert out.read_bytes() == b"".join(line + b"\n" for n, line in enumerate(lines) if n != 3)
    assert err.read_bytes() == lines[3] + b"\n"


def test_a_helper_only_for_a_big_merge_with_a_second_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert merge_helper.helper_wanted(merge_helper.HELPER_FROM_BYTES)
    assert not merge_helper.helper_wanted(merge_helper.HELPER_FROM_BYTES - 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert not merge_helper.helper_wanted(merge_helper.HELPER_FROM_BYTES * 100)
