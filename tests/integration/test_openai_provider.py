"""OpenAIProvider and Client(provider="openai") against the emulator's OpenAI dialect over loopback.

The dialect is served under `/openai/v1` (DESIGN §7).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batchd import AsyncClient
from batchd.backoff import RetryPolicy
from batchd.emulator import create_app, serve_emulator
from batchd.models import RemoteBatch, RemoteStatus
from batchd.providers import openai as openai_wire
from batchd.providers.base import ProviderError
from batchd.providers.openai import OpenAIProvider
from tests.hand_clock import RecordingSleep
from tests.integration.emulator_helpers import request_line, to_jsonl

KEY = "openai-test-key"


@dataclass
class Env:
    url: str
    base: str
    control: httpx.AsyncClient
    provider: OpenAIProvider
    sleep: RecordingSleep

    async def fault(self, **spec: Any) -> None:
        (await self.control.post("/_emulator/faults", json=spec)).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self.control.get("/_emulator/stats")).json()
        return stats


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Env]:
    """The emulator on a loopback port and an OpenAI provider talking to its /openai/v1."""
    sleep = RecordingSleep()
    async with (
        serve_emulator(create_app(tmp_path / "emulator")) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as control,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        base = f"{url}/openai/v1"
        provider = OpenAIProvider(http, base_url=base, api_key=KEY, retry=RetryPolicy(attempts=3), sleep=sleep)
        yield Env(url, base, control, provider, sleep)


def write_batch(path: Path, lines: list[dict[str, Any]]) -> tuple[Path, str]:
    data = to_jsonl(lines)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def until_terminal(provider: OpenAIProvider, batch_id: str) -> RemoteBatch:
    with anyio.fail_after(20):
        while not (batch := await provider.get_batch(batch_id)).status.terminal:  # noqa: ASYNC110 - over HTTP
            await anyio.sleep(0.02)
    return batch


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_upload_create_poll_list_download(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line(f"r{i}", f"text {i}") for i in range(3)])
        stored = await env.provider.upload(source, filename="in.jsonl", sha256=sha256)
        assert stored.id and stored.purpose == "batch" and stored.bytes == source.stat().st_size

        created = await env.provider.create_batch(
            input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h", job_id="job-42"
        )
        assert created.metadata == {"batchd_job_id": "job-42"}
        assert created.created_at is not None and created.input_file_id == stored.id

        done = await until_terminal(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED
        assert done.request_counts == {"total": 3, "completed": 3, "failed": 0}
        assert done.output_file_id is not None and done.error_file_id is None
        assert done.metadata == {"batchd_job_id": "job-42"}

        listed = await env.provider.list_batches()
        assert [b.id for b in listed] == [created.id]

        dest = tmp_path / "out.jsonl"
        assert await env.provider.download_file(done.output_file_id, dest) == dest.stat().st_size
        lines = jsonl(dest)
        assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2"]
        assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
        assert env.sleep.calls == []


async def test_list_follows_the_cursor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages of two, so five batches take three pages (the real limit is 100).
    monkeypatch.setattr(openai_wire, "PAGE_LIMIT", 2)
    async with running(tmp_path) as env:
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line("a")])
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        ids = set()
        for i in range(5):
            created = await env.provider.create_batch(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id=f"j{i}"
            )
            ids.add(created.id)
        before = (await env.stats())["requests"].get("GET /openai/v1/batches", 0)
        listed = await env.provider.list_batches()
        after = (await env.stats())["requests"]["GET /openai/v1/batches"]
        assert {b.id for b in listed} == ids and len(listed) == 5
        assert {b.metadata["batchd_job_id"] for b in listed if b.metadata} == {f"j{i}" for i in range(5)}
        assert after - before == 3


async def test_a_lost_create_answer_is_outcome_unknown_and_the_batch_is_listed(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line("a")])
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        await env.fault(method="POST", path="/openai/v1/batches", status=503, act=True)
        with pytest.raises(ProviderError) as info:
            await env.provider.create_batch(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="job-lost"
            )
        assert info.value.outcome_unknown
        (found,) = await env.provider.list_batches()
        assert found.metadata == {"batchd_job_id": "job-lost"} and found.input_file_id == file_id
        assert len((await env.stats())["batch_creates"]) == 1


async def test_faults_are_retried_on_idempotent_calls(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line("a")])
        await env.fault(method="POST", path="/openai/v1/files", status=500)
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="j"
        )
        await env.fault(method="GET", path="/openai/v1/batches/*", status=429, retry_after=2)
        done = await until_terminal(env.provider, created.id)
        assert done.output_file_id is not None
        assert 2.0 in env.sleep.calls
        await env.fault(method="GET", path=f"/openai/v1/files/{done.output_file_id}/content", truncate_at=20)
        dest = tmp_path / "out.jsonl"
        await env.provider.download_file(done.output_file_id, dest)
        assert [line["custom_id"] for line in jsonl(dest)] == ["a"]


async def test_a_batch_failing_validation_names_the_line(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        bad = request_line("b")
        del bad["custom_id"]
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line("a"), bad])
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="j"
        )
        done = await until_terminal(env.provider, created.id)
        assert done.status is RemoteStatus.FAILED
        assert done.error is not None and done.error.startswith("line 2: ")


async def test_cancel(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        (await env.control.post("/_emulator/pause")).raise_for_status()
        source, sha256 = write_batch(tmp_path / "in.jsonl", [request_line("a")])
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="j"
        )
        answer = await env.provider.cancel_batch(created.id)
        assert answer.status in (RemoteStatus.CANCELLING, RemoteStatus.CANCELLED)
        # Paused, nothing advances: not even from cancelling to cancelled.
        (await env.control.post("/_emulator/resume")).raise_for_status()
        assert (await until_terminal(env.provider, created.id)).status is RemoteStatus.CANCELLED


async def test_client_with_provider_openai(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(tmp_path) as env:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", env.base)
        async with AsyncClient(provider="openai") as client:
            source, _ = write_batch(tmp_path / "in.jsonl", [request_line("a"), request_line("b")])
            uploaded = await client.files.upload(file=source, purpose="batch-api")
            assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == ("batch", "in.jsonl", source.stat().st_size)
            created = await client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")
            assert created.metadata is None
            with anyio.fail_after(20):
                while (batch := await client.batches.get_batch(created.id)).status != "COMPLETED":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            assert batch.status == "completed" and batch.object == "batch"
            assert batch.request_counts == {"total": 2, "completed": 2, "failed": 0}
            assert batch.completion_window == "24h"
            assert batch.in_progress_at is not None and batch.completed_at is not None
            assert batch.expires_at == batch.created_at + 86400
            assert batch.failed_at is None and batch.errors is None
            assert [b.id for b in await client.batches.list_batches()] == [created.id]
            assert batch.output_file_id is not None
            got = await client.files.retrieve_content(id=batch.output_file_id, output=tmp_path / "results.jsonl")
            assert sorted(line["custom_id"] for line in jsonl(Path(got.filename))) == ["a", "b"]


async def test_result_files_are_deleted_and_their_expiry_is_known(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        lines = [request_line("ok", "x"), request_line("bad", "y", trigger={"status": 400})]
        source, sha256 = write_batch(tmp_path / "in.jsonl", lines)
        file_id = await env.provider.upload_file(source, filename="in.jsonl", sha256=sha256)
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="j"
        )
        assert created.results_expire_at is None  # not ended: no results yet
        done = await until_terminal(env.provider, created.id)
        assert done.output_file_id is not None and done.error_file_id is not None
        # No output_expires_after on the batch: OpenAI's default, 30 days from the batch's end.
        assert done.results_expire_at is not None
        assert done.results_expire_at.timestamp() == done.raw["completed_at"] + 30 * 86400
        for each in (file_id, done.output_file_id, done.error_file_id):
            await env.provider.delete_file(each)
        listed = (await env.control.get("/openai/v1/files", headers={"Authorization": "Bearer k"})).json()["data"]
        assert listed == []
        await env.provider.delete_file(done.output_file_id)  # gone already: counted as deleted
        with pytest.raises(ProviderError) as gone:
            await env.provider.download_file(done.error_file_id, tmp_path / "errors.jsonl")
        assert gone.value.status_code == 404


def test_an_output_expiry_policy_on_the_batch_is_read() -> None:
    wire = {"id": "batch_1", "object": "batch", "status": "completed", "completed_at": 1_000_000,
            "output_expires_after": {"anchor": "created_at", "seconds": 7200}}  # fmt: skip
    batch = openai_wire.parse_batch(wire)
    assert batch.results_expire_at is not None and batch.results_expire_at.timestamp() == 1_000_000 + 7200
    expired = openai_wire.parse_batch({**wire, "status": "expired", "completed_at": None, "expired_at": 2_000_000})
    assert expired.results_expire_at is not None and expired.results_expire_at.timestamp() == 2_000_000 + 7200
    running_batch = openai_wire.parse_batch({**wire, "status": "in_progress", "completed_at": None})
    assert running_batch.results_expire_at is None
