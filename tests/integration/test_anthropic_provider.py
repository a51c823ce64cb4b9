"""AnthropicProvider against the emulator's Anthropic dialect (`/anthropic`) over loopback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batchd.backoff import RetryPolicy
from batchd.emulator import create_app, serve_emulator
from batchd.models import RemoteBatch, RemoteStatus
from batchd.providers import anthropic as anthropic_wire
from batchd.providers.anthropic import AnthropicProvider, request_total
from batchd.providers.base import ProviderError
from tests.hand_clock import RecordingSleep

KEY = "anthropic-test-key"
CREATE = "POST /anthropic/v1/messages/batches"


@dataclass
class Env:
    url: str
    control: httpx.AsyncClient
    provider: AnthropicProvider
    sleep: RecordingSleep

    async def fault(self, **spec: Any) -> None:
        (await self.control.post("/_emulator/faults", json=spec)).raise_for_status()

    async def requests(self, key: str) -> int:
        counts: dict[str, int] = (await self.control.get("/_emulator/stats")).json()["requests"]
        return counts.get(key, 0)


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Env]:
    sleep = RecordingSleep()
    async with (
        serve_emulator(create_app(tmp_path / "emulator", api_key=KEY)) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, headers={"authorization": f"Bearer {KEY}"}) as control,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        provider = AnthropicProvider(
            http, base_url=f"{url}/anthropic", api_key=KEY, retry=RetryPolicy(attempts=3), sleep=sleep
        )
        yield Env(url, control, provider, sleep)


def line(custom_id: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    params = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": text}], **extra}
    return {"custom_id": custom_id, "params": params}


def write_lines(path: Path, lines: list[dict[str, Any]], *, blank_lines: bool = False) -> tuple[Path, str]:
    text = "".join(json.dumps(x) + ("\r\n\n" if blank_lines else "\n") for x in lines)
    data = text.encode()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def until_ended(provider: AnthropicProvider, batch_id: str) -> RemoteBatch:
    with anyio.fail_after(20):
        while not (batch := await provider.get_batch(batch_id)).status.terminal:  # noqa: ASYNC110 - over HTTP
            await anyio.sleep(0.02)
    return batch


async def create(env: Env, path: Path, sha256: str) -> RemoteBatch:
    file_id = await env.provider.upload_file(path, filename=path.name, sha256=sha256)
    return await env.provider.create_batch(
        input_file_id=file_id, endpoint="/v1/messages", completion_window="24h", job_id="j", input_path=path
    )


async def test_create_inline_poll_list_and_download_the_results(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        # Blank lines and CRLF ends are left out of the inline body, never sent as requests.
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line(f"r{i}") for i in range(3)], blank_lines=True)
        file_id = await env.provider.upload_file(path, filename="in.jsonl", sha256=sha256)
        assert file_id == f"inline:{sha256}"
        assert await env.requests("POST /v1/files") == 0  # nothing was uploaded anywhere
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/messages", completion_window="24h", job_id="j", input_path=path
        )
        assert created.status is RemoteStatus.IN_PROGRESS and created.id.startswith("msgbatch_")
        assert request_total(created) == 3 and created.created_at is not None
        assert created.output_file_id is None

        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED
        assert done.request_counts is not None
        assert (done.request_counts["total"], done.request_counts["completed"], done.request_counts["failed"]) == (
            3, 3, 0,
        )  # fmt: skip
        assert done.output_file_id == f"{env.url}/anthropic/v1/messages/batches/{created.id}/results"

        assert [b.id for b in await env.provider.list_batches()] == [created.id]
        dest = tmp_path / "results.jsonl"
        assert await env.provider.download_file(done.output_file_id, dest) == dest.stat().st_size
        results = [json.loads(x) for x in dest.read_text().splitlines()]
        assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
        assert all(r["result"]["type"] == "succeeded" for r in results)
        assert env.sleep.calls == []


async def test_the_create_body_is_streamed_and_a_large_file_goes_whole(tmp_path: Path) -> None:
    # Several read chunks' worth of lines: every request arrives, in order, none cut at a chunk edge.
    async with running(tmp_path) as env:
        lines = [line(f"r{i}", "x" * 200) for i in range(12_000)]
        path, sha256 = write_lines(tmp_path / "in.jsonl", lines)
        assert path.stat().st_size > 2 * anthropic_wire._READ_BYTES
        created = await create(env, path, sha256)
        assert request_total(created) == 12_000


async def test_listing_pages_by_after_id_and_stops_at_since(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic_wire, "PAGE_LIMIT", 2)
    async with running(tmp_path) as env:
        await env.control.post("/_emulator/pause")
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        ids = [(await create(env, path, sha256)).id for _ in range(5)]
        before = await env.requests("GET /anthropic/v1/messages/batches")
        assert [b.id for b in await env.provider.list_batches()] == ids[::-1]
        assert await env.requests("GET /anthropic/v1/messages/batches") - before == 3
        # The newest is wanted: one page, not three.
        before = await env.requests("GET /anthropic/v1/messages/batches")
        (found,) = await env.provider.list_batches(wanted=[ids[-1]])
        assert found.id == ids[-1] and found.raw == {}
        assert await env.requests("GET /anthropic/v1/messages/batches") - before == 1
        # Everything is newer than an hour ago: `since` does not cut a listing short of what is newer.
        recent = await env.provider.list_batches(since=datetime.now(UTC) - timedelta(hours=1))
        assert len(recent) == 5


async def test_a_lost_create_answer_is_outcome_unknown_and_the_batch_is_listed(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a"), line("b")])
        await env.fault(method="POST", path="/anthropic/v1/messages/batches", status=529, act=True)
        with pytest.raises(ProviderError) as info:
            await create(env, path, sha256)
        assert info.value.outcome_unknown and info.value.retryable
        (found,) = await env.provider.list_batches()
        assert request_total(found) == 2
        assert await env.requests(CREATE) == 1  # never retried blindly


async def test_a_refused_create_is_not_outcome_unknown(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("bad id!")])
        with pytest.raises(ProviderError) as info:
            await create(env, path, sha256)
        assert not info.value.outcome_unknown and not info.value.retryable
        assert info.value.status_code == 400 and "custom_id" in info.value.message


async def test_overloaded_and_rate_limited_calls_are_retried(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        created = await create(env, path, sha256)
        await env.fault(method="GET", path="/anthropic/v1/messages/batches/*", status=529)
        await env.fault(method="GET", path="/anthropic/v1/messages/batches/*", status=429, retry_after=3)
        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED and 3.0 in env.sleep.calls


async def test_cancel_ends_cancelled_with_canceled_results(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        await env.control.post("/_emulator/pause")
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a"), line("b")])
        created = await create(env, path, sha256)
        cancelling = await env.provider.cancel_batch(created.id)
        assert cancelling.status is RemoteStatus.CANCELLING
        await env.control.post("/_emulator/resume")
        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.CANCELLED and done.output_file_id is not None
        dest = tmp_path / "results.jsonl"
        await env.provider.download_file(done.output_file_id, dest)
        assert {json.loads(x)["result"]["type"] for x in dest.read_text().splitlines()} == {"canceled"}


async def test_a_results_url_off_the_api_s_origin_never_gets_the_key(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        with pytest.raises(ProviderError) as info:
            await env.provider.download_file("http://elsewhere.example/results", tmp_path / "x.jsonl")
        assert "origin" in info.value.message and not (tmp_path / "x.jsonl").exists()


async def test_a_wrong_key_is_an_authentication_error(tmp_path: Path) -> None:
    async with running(tmp_path) as env, httpx.AsyncClient(trust_env=False) as http:
        wrong = AnthropicProvider(http, base_url=f"{env.url}/anthropic", api_key="nope", retry=RetryPolicy(attempts=1))
        with pytest.raises(ProviderError) as info:
            await wrong.list_batches()
        assert info.value.status_code == 401 and not info.value.retryable
        assert "authentication_error" in info.value.message


async def test_an_ended_batch_is_deleted_with_its_results(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a"), line("b")])
        created = await create(env, path, sha256)
        assert created.results_expire_at is None and not env.provider.uploads_files
        done = await until_ended(env.provider, created.id)
        # Anthropic keeps the results 29 days from the batch's creation.
        assert done.created_at is not None and done.results_expire_at == done.created_at + timedelta(days=29)
        assert done.output_file_id is not None
        with pytest.raises(ProviderError):
            await env.provider.delete_file(created.input_file_id)  # nothing of batchd's is a file there
        await env.provider.delete_batch(done.id)
        with pytest.raises(ProviderError) as gone:
            await env.provider.get_batch(done.id)
        assert gone.value.status_code == 404
        with pytest.raises(ProviderError) as no_results:
            await env.provider.download_file(done.output_file_id, tmp_path / "results.jsonl")
        assert no_results.value.status_code == 404
        await env.provider.delete_batch(done.id)  # gone already: counted as deleted
        assert await env.requests(f"DELETE /anthropic/v1/messages/batches/{done.id}") == 2
