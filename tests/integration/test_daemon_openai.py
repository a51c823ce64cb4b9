"""The daemon with provider.kind = "openai" against the emulator's OpenAI dialect over loopback.

Real SQLite and PostgreSQL, real HTTP, real files.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from batchd.config import Settings, load_settings
from batchd.daemon import Daemon
from batchd.emulator.app import create_app
from batchd.emulator.server import serve_emulator
from batchd.models import JobState
from batchd.providers.openai import OpenAIProvider
from batchd.retry import RetryPolicy
from batchd.store import Store
from tests.databases import database_url

pytestmark = pytest.mark.each_database


def chat(custom_id: str) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": custom_id}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


@dataclass
class Rig:
    settings: Settings
    store: Store
    daemon: Daemon
    provider: OpenAIProvider
    url: str
    http: httpx.AsyncClient

    def drop(self, name: str, lines: list[dict[str, Any]]) -> None:
        inbox = self.settings.inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        tmp = inbox / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        tmp.rename(inbox / name)

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"{self.url}/_emulator/{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def drain(self, timeout: float = 30) -> None:
        result = await self.daemon.run(once=True, timeout=timeout)
        assert result.drained

    def job(self, name: str) -> Any:
        (job,) = [j for j in self.store.list_jobs() if j.name == name]
        return job

    def outbox(self, name: str, file: str) -> Any:
        text = (self.settings.outbox_dir / name / file).read_text(encoding="utf-8")
        return json.loads(text) if file.endswith(".json") else [json.loads(line) for line in text.splitlines()]


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    config = tmp_path / "batchd.toml"
    config.write_text(
        f'state_dir = "state"\ndatabase_url = "{database_url(tmp_path / "state" / "batchd.db")}"\n'
        '[provider]\nkind = "openai"\nbase_url = "http://127.0.0.1:1/openai/v1"\n'
        "[polling]\nmin_interval_s = 0.02\nmax_interval_s = 0.1\n[inbox]\nsettle_s = 0.0\n",
        encoding="utf-8",
    )
    settings = load_settings(config, environ={"OPENAI_API_KEY": "k"})
    store = Store(settings.database_url)
    store.migrate()
    async with (
        serve_emulator(create_app(tmp_path / "emulator"), host="127.0.0.1", port=0) as url,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        # One attempt per call: the daemon's own step backoff is what these tests watch.
        provider = OpenAIProvider(http, base_url=f"{url}/openai/v1", api_key="k", retry=RetryPolicy(attempts=1))
        daemon = Daemon(settings, store=store, provider=provider)
        try:
            yield Rig(settings, store, daemon, provider, url, http)
        finally:
            store.close()


async def test_a_job_completes_through_the_openai_dialect(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.drop("chats.jsonl", [chat("a"), chat("b"), chat("c")])
        await r.drain()
        job = r.job("chats")
        assert job.state is JobState.COMPLETED
        assert [line["custom_id"] for line in r.outbox("chats", "output.jsonl")] == ["a", "b", "c"]
        meta = r.outbox("chats", "job.json")
        assert meta["status"] == "completed" and meta["provider"] == "openai"
        assert meta["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        (remote_id,) = meta["remote_batch_ids"]
        remote = await r.provider.get_batch(remote_id)
        assert remote.metadata == {"batchd_job_id": job.id}
        stats = await r.control("GET", "stats")
        assert stats["requests"].get("POST /openai/v1/files") == 1
        assert stats["requests"].get("POST /v1/files", 0) == 0


async def test_a_create_whose_answer_was_lost_is_adopted_by_its_metadata(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
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
        (batch,) = r.store.remote_batches(job.id)
        assert batch.create_attempts == 1
        assert batch.remote_id is not None
        assert (await r.provider.get_batch(batch.remote_id)).metadata == {"batchd_job_id": job.id}
