"""The daemon with provider.kind = "openai" against the emulator's OpenAI dialect over loopback.

Real SQLite and PostgreSQL, real HTTP, real files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from batchd.models import JobState
from tests.integration.daemon_rig import chat, rig

pytestmark = pytest.mark.each_database


async def test_a_job_completes_through_the_openai_dialect(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="openai") as r:
        r.drop("chats.jsonl", [chat("a"), chat("b"), chat("c")])
        await r.drain()
        job = r.job("chats")
        assert job.state is JobState.COMPLETED
        assert [line["custom_id"] for line in r.outbox_lines("chats", "output.jsonl")] == ["a", "b", "c"]
        meta = r.job_json("chats")
        assert meta["status"] == "completed" and meta["provider"] == "openai"
        assert meta["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        (remote_id,) = meta["remote_batch_ids"]
        remote = await r.provider.get_batch(remote_id)
        assert remote.metadata == {"batchd_job_id": job.id}
        stats = await r.control("GET", "stats")
        assert stats["requests"].get("POST /openai/v1/files") == 1
        assert stats["requests"].get("POST /v1/files", 0) == 0


async def test_a_create_whose_answer_was_lost_is_adopted_by_its_metadata(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="openai") as r:
        # The batch is really created, but the daemon sees a 503.
        fault = {"method": "POST", "path": "/openai/v1/batches", "status": 503, "act": True}
        await r.control("POST", "faults", json=fault)
        r.drop("lost.jsonl", [chat("a"), chat("b")])
        with capture_logs() as logs:
            await r.drain()
        job = r.job("lost")
        assert job.state is JobState.COMPLETED
        assert len((await r.control("GET", "stats"))["batch_creates"]) == 1
        assert "job.batch_adopted" in [e["event"] for e in logs]
        (batch,) = r.store.batches.of_job(job.id)
        assert batch.create_attempts == 1
        assert batch.remote_id is not None
        assert (await r.provider.get_batch(batch.remote_id)).metadata == {"batchd_job_id": job.id}
