"""The spool: answers fsynced in groups as they come, recovered after a crash, and batches picked up
again after a restart in whatever state they were left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.emulator import Timeline
from batchd.emulator.spool import Spool, recover_spool, spool_record
from tests.integration.emulator_helpers import (
    OPENAI,
    asgi_emulator,
    openai_create,
    openai_download,
    openai_upload,
    openai_wait,
    request_line,
    to_jsonl,
)


def ok_line(custom_id: str, tokens: int = 1) -> dict[str, Any]:
    usage = {"prompt_tokens": tokens, "completion_tokens": 2 * tokens}
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": {"usage": usage}}}


async def test_concurrent_appends_share_fsyncs_and_are_all_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.jsonl"
    writes: list[int] = []
    async with Spool(path) as spool:
        original = spool._write_sync

        def counting(data: bytes) -> None:
            writes.append(data.count(b"\n"))
            original(data)

        monkeypatch.setattr(spool, "_write_sync", counting)
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(spool.append, [(True, f"r{i}", ok_line(f"r{i}"))])
    assert sum(writes) == 50 and len(writes) < 50  # group commit: fewer fsyncs than answers
    summary = recover_spool(path)
    assert summary.completed == 50 and summary.failed == 0 and len(summary.answered) == 50
    assert (summary.input_tokens, summary.output_tokens) == (50, 100)


def test_recovery_cuts_a_torn_tail_and_ignores_a_repeat(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    whole = spool_record(True, "a", ok_line("a", 3)) + spool_record(False, "b", {"custom_id": "b", "error": {}})
    repeat = spool_record(True, "a", ok_line("a", 3))
    torn = spool_record(True, "c", ok_line("c"))[:-10]
    path.write_bytes(whole + repeat + torn)
    summary = recover_spool(path)
    assert (summary.completed, summary.failed, summary.input_tokens) == (1, 1, 3)
    assert len(summary.answered) == 2
    assert path.read_bytes() == whole + repeat  # the torn record is gone from the disk too
    assert recover_spool(tmp_path / "missing.jsonl").answered == set()


async def test_an_append_cancelled_at_once_is_still_written(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    async with Spool(path) as spool:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await spool.append([(True, "late", ok_line("late"))])
    assert recover_spool(path).completed == 1


async def test_restart_while_finalizing_completes_without_asking_again(tmp_path: Path) -> None:
    lines = [request_line(f"r{i}") for i in range(5)]
    async with asgi_emulator(tmp_path, timeline=Timeline(finalizing_s=60)) as client:
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(lines))))["id"]
        await openai_wait(client, batch_id, until=lambda b: b["status"] == "finalizing")
    async with asgi_emulator(tmp_path) as client:
        batch = await openai_wait(client, batch_id)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 5
        assert len(await openai_download(client, batch["output_file_id"])) == 5
        assert (await client.get("/_emulator/stats")).json()["requests"].get(f"POST {OPENAI}/batches") is None


async def test_restart_while_cancelling_ends_cancelled(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl([request_line("a")]))))["id"]
        assert (await client.post(f"{OPENAI}/batches/{batch_id}/cancel")).json()["status"] == "cancelling"
    async with asgi_emulator(tmp_path) as client:
        batch = await openai_wait(client, batch_id)
    assert batch["status"] == "cancelled" and batch["cancelling_at"] is not None
