"""The worker's request feed (emulator/feed.py): what is handed to the lanes, in what order, and when it stops."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from batchd.emulator.feed import RequestFeed
from batchd.emulator.spool import RequestLines, custom_id_hash

START = datetime(2026, 1, 1, tzinfo=UTC)


def write_input(path: Path, count: int) -> Path:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"i": i}} for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


async def no_pause() -> None:
    return None


async def drain(feed: RequestFeed) -> list[str]:
    ids = []
    while (taken := await feed.next()) is not None:
        key, request = taken
        assert key == custom_id_hash(request["custom_id"])
        ids.append(request["custom_id"])
    return ids


async def test_requests_come_in_order_up_to_the_limit_without_those_answered_before(tmp_path: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", 10)
    async with RequestLines(path, block_size=64) as lines:
        feed = RequestFeed(
            lines, limit=8, answered={custom_id_hash("r1"), custom_id_hash("r5")}, pace_s=0.0, started=0.0,
            deadline=START + timedelta(days=1), clock=lambda: START, gate_wait=no_pause,
        )  # fmt: skip
        assert await drain(feed) == ["r0", "r2", "r3", "r4", "r6", "r7"]
    assert (feed.position, feed.expired) == (8, False)


async def test_the_feed_stops_at_the_deadline(tmp_path: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", 5)
    now = [START]

    def clock() -> datetime:
        now[0] += timedelta(hours=1)
        return now[0]

    async with RequestLines(path) as lines:
        feed = RequestFeed(
            lines, limit=5, answered=set(), pace_s=0.0, started=0.0, deadline=START + timedelta(hours=2, minutes=30),
            clock=clock, gate_wait=no_pause,
        )  # fmt: skip
        assert await drain(feed) == ["r0", "r1"]
        assert feed.expired and await feed.next() is None


async def test_lanes_share_the_feed_and_each_request_goes_to_one_of_them(tmp_path: Path) -> None:
    path = write_input(tmp_path / "in.jsonl", 200)
    got: list[str] = []

    async with RequestLines(path, block_size=512) as lines:
        feed = RequestFeed(
            lines, limit=200, answered=set(), pace_s=0.0, started=0.0, deadline=START + timedelta(days=1),
            clock=lambda: START, gate_wait=anyio.lowlevel.checkpoint,
        )  # fmt: skip

        async def lane() -> None:
            got.extend(await drain(feed))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(lane)
    assert sorted(got) == sorted(f"r{i}" for i in range(200))
