"""GeminiProvider against the emulator's Gemini dialect (`/gemini`) over loopback."""

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

from batchd.backoff import RetryPolicy
from batchd.emulator import create_app, serve_emulator
from batchd.models import RemoteBatch, RemoteStatus
from batchd.providers import gemini as gemini_wire
from batchd.providers.base import ProviderError
from batchd.providers.gemini import GeminiProvider
from batchd.providers.wire import parse_time
from tests.hand_clock import RecordingSleep

KEY = "gemini-test-key"
MODEL = "gemini-2.5-flash"


@dataclass
class Env:
    url: str
    control: httpx.AsyncClient
    provider: GeminiProvider
    sleep: RecordingSleep

    async def fault(self, **spec: Any) -> None:
        (await self.control.post("/_emulator/faults", json=spec)).raise_for_status()

    async def requests(self, ending: str) -> int:
        """Calls to the routes whose "METHOD path" ends with `ending`."""
        counts: dict[str, int] = (await self.control.get("/_emulator/stats")).json()["requests"]
        return sum(count for route, count in counts.items() if route.endswith(ending))


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Env]:
    sleep = RecordingSleep()
    async with (
        serve_emulator(create_app(tmp_path / "emulator", api_key=KEY)) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, headers={"authorization": f"Bearer {KEY}"}) as control,
        httpx.AsyncClient(trust_env=False) as http,
    ):
        provider = GeminiProvider(
            http, base_url=f"{url}/gemini", api_key=KEY, retry=RetryPolicy(attempts=3), sleep=sleep
        )
        yield Env(url, control, provider, sleep)


def line(key: str, text: str = "hi", trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if trigger:
        request["batchd_emulator"] = trigger
    return {"key": key, "request": request}


def write_lines(path: Path, lines: list[dict[str, Any]]) -> tuple[Path, str]:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def until_ended(provider: GeminiProvider, batch_id: str) -> RemoteBatch:
    with anyio.fail_after(20):
        while not (batch := await provider.get_batch(batch_id)).status.terminal:  # noqa: ASYNC110 - over HTTP
            await anyio.sleep(0.02)
    return batch


async def create(env: Env, path: Path, sha256: str, job_id: str = "j1") -> RemoteBatch:
    file_id = await env.provider.upload_file(path, filename=path.name, sha256=sha256)
    return await env.provider.create_batch(
        input_file_id=file_id, endpoint="generateContent", completion_window="24h", job_id=job_id, model=MODEL
    )


async def test_upload_create_poll_list_download_and_delete(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line(f"r{i}") for i in range(3)])
        stored = await env.provider.upload(path, filename="in.jsonl", sha256=sha256)
        assert stored.id.startswith("files/") and stored.bytes == path.stat().st_size
        created = await env.provider.create_batch(
            input_file_id=stored.id, endpoint="generateContent", completion_window="24h", job_id="j1", model=MODEL
        )
        assert created.id.startswith("batches/") and created.input_file_id == stored.id
        assert created.metadata == {"batchd_job_id": "j1"} and created.status in (
            RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS,
        )  # fmt: skip

        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED and done.output_file_id is not None
        assert done.request_counts is not None and done.request_counts["total"] == 3
        assert done.request_counts["completed"] == 3

        (listed,) = await env.provider.list_batches()
        assert listed.id == created.id and listed.metadata == {"batchd_job_id": "j1"}
        dest = tmp_path / "results.jsonl"
        assert await env.provider.download_file(done.output_file_id, dest) == dest.stat().st_size
        results = [json.loads(x) for x in dest.read_text().splitlines()]
        assert sorted(r["key"] for r in results) == ["r0", "r1", "r2"]
        assert all(r["response"]["usageMetadata"]["promptTokenCount"] > 0 for r in results)

        # Deleting the input: gone at the provider; a second delete (a restart) is not an error.
        await env.provider.delete_file(stored.id)
        gone = await env.control.get(f"/gemini/v1beta/{stored.id}", headers={"x-goog-api-key": KEY})
        assert gone.status_code == 404 and gone.json()["error"]["status"] == "NOT_FOUND"
        await env.provider.delete_file(stored.id)
        assert env.sleep.calls == []


async def test_a_download_cut_short_is_resumed_with_range(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line(f"r{i}", "x" * 100) for i in range(50)])
        done = await until_ended(env.provider, (await create(env, path, sha256)).id)
        assert done.output_file_id is not None
        whole = tmp_path / "whole.jsonl"
        await env.provider.download_file(done.output_file_id, whole)
        part = tmp_path / "part.jsonl"
        part.write_bytes(whole.read_bytes()[:1000])  # what an interrupted download left
        await env.provider.download_file(done.output_file_id, part)
        assert part.read_bytes() == whole.read_bytes()


async def test_listing_follows_page_tokens_and_stops_once_the_wanted_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gemini_wire, "PAGE_SIZE", 2)
    async with running(tmp_path) as env:
        await env.control.post("/_emulator/pause")
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        ids = [(await create(env, path, sha256, job_id=f"j{i}")).id for i in range(5)]
        before = await env.requests("GET /gemini/v1beta/batches")
        listed = await env.provider.list_batches()
        assert sorted(b.id for b in listed) == sorted(ids)
        assert await env.requests("GET /gemini/v1beta/batches") - before == 3
        # Wanted batches come without their wire objects, and paging stops once all are found.
        first_page = [b.id for b in listed[:2]]
        before = await env.requests("GET /gemini/v1beta/batches")
        found = await env.provider.list_batches(wanted=first_page)
        assert sorted(b.id for b in found) == sorted(first_page) and all(b.raw == {} for b in found)
        assert await env.requests("GET /gemini/v1beta/batches") - before == 1


async def test_a_lost_create_answer_is_outcome_unknown_and_the_batch_is_listed_by_its_name(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a"), line("b")])
        await env.fault(method="POST", path=f"/gemini/v1beta/models/{MODEL}:batchGenerateContent", status=503, act=True)
        with pytest.raises(ProviderError) as info:
            await create(env, path, sha256, job_id="lost-job")
        assert info.value.outcome_unknown and info.value.retryable
        (found,) = await env.provider.list_batches()
        assert found.metadata == {"batchd_job_id": "lost-job"} and found.input_file_id.startswith("files/")
        assert await env.requests(":batchGenerateContent") == 1  # never retried blindly


async def test_a_create_without_a_model_or_with_a_missing_file_is_refused_for_good(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        file_id = await env.provider.upload_file(path, filename="in.jsonl", sha256=sha256)
        with pytest.raises(ProviderError, match="model"):
            await env.provider.create_batch(input_file_id=file_id, endpoint="generateContent", completion_window="24h")
        with pytest.raises(ProviderError) as info:
            await env.provider.create_batch(
                input_file_id="files/nosuchfile", endpoint="generateContent", completion_window="24h", model=MODEL
            )
        assert not info.value.outcome_unknown and not info.value.retryable
        assert info.value.status_code in (400, 404)


async def test_exhausted_and_unavailable_calls_are_retried(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        created = await create(env, path, sha256)
        await env.fault(method="GET", path="/gemini/v1beta/batches/*", status=503)
        await env.fault(method="GET", path="/gemini/v1beta/batches/*", status=429, retry_after=3)
        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED and 3.0 in env.sleep.calls


async def test_cancel_ends_cancelled(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        await env.control.post("/_emulator/pause")
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a"), line("b")])
        created = await create(env, path, sha256)
        await env.provider.cancel_batch(created.id)
        await env.control.post("/_emulator/resume")
        done = await until_ended(env.provider, created.id)
        assert done.status is RemoteStatus.CANCELLED


async def test_the_upload_session_url_never_gets_the_key_and_a_wrong_key_is_refused(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async with running(tmp_path) as env, httpx.AsyncClient(trust_env=False, event_hooks={"request": [record]}) as http:
        watched = GeminiProvider(http, base_url=f"{env.url}/gemini", api_key=KEY, retry=RetryPolicy(attempts=1))
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        await watched.upload_file(path, filename="in.jsonl", sha256=sha256)
        start, send = seen
        assert start.headers["x-goog-api-key"] == KEY and start.headers["x-goog-upload-command"] == "start"
        assert "x-goog-api-key" not in send.headers and "authorization" not in send.headers
        assert send.headers["x-goog-upload-command"] == "upload, finalize"

        wrong = GeminiProvider(http, base_url=f"{env.url}/gemini", api_key="nope", retry=RetryPolicy(attempts=1))
        with pytest.raises(ProviderError) as info:
            await wrong.list_batches()
        assert info.value.status_code in (401, 403) and not info.value.retryable


async def test_the_responses_file_lives_48_hours_from_the_end_and_is_deleted(tmp_path: Path) -> None:
    async with running(tmp_path) as env:
        path, sha256 = write_lines(tmp_path / "in.jsonl", [line("a")])
        created = await create(env, path, sha256)
        done = await until_ended(env.provider, created.id)
        assert done.output_file_id is not None and done.results_expire_at is not None
        ended = parse_time(done.raw["metadata"]["endTime"])
        assert ended is not None and (done.results_expire_at - ended).total_seconds() == 48 * 3600
        await env.provider.delete_file(done.output_file_id)
        listed = (await env.control.get("/gemini/v1beta/files")).json().get("files", [])
        assert done.output_file_id not in {f["name"] for f in listed}
        with pytest.raises(ProviderError) as gone:
            await env.provider.download_file(done.output_file_id, tmp_path / "out.jsonl")
        assert gone.value.status_code == 404
        with pytest.raises(ProviderError) as refused:
            await env.provider.delete_file("not-a-file-name")  # refused before it reaches a URL
        assert not refused.value.retryable
