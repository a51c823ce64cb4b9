"""TogetherProvider against batchd's own emulator over a real loopback socket."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batchd.backoff import RetryPolicy
from batchd.emulator.app import create_app
from batchd.emulator.server import serve_emulator
from batchd.models import RemoteBatch, RemoteStatus
from batchd.providers.base import ProviderError
from batchd.providers.together import TogetherProvider
from tests.hand_clock import RecordingSleep

KEY = "emulator-test-key"


@dataclass
class Sent:
    """What went over the wire, as seen by an httpx request hook."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    async def hook(self, request: httpx.Request) -> None:
        self.requests.append((request.method, request.url.path, dict(request.headers)))

    def to(self, method: str, path: str) -> list[dict[str, str]]:
        return [headers for m, p, headers in self.requests if (m, p) == (method, path)]


@dataclass
class Emulator:
    url: str
    control: httpx.AsyncClient

    async def fault(self, **spec: Any) -> None:
        response = await self.control.post("/_emulator/faults", json=spec)
        response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.control.get("/_emulator/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


@dataclass
class Env:
    emulator: Emulator
    provider: TogetherProvider
    sent: Sent
    sleep: RecordingSleep


@asynccontextmanager
async def running(data_dir: Path) -> AsyncIterator[Env]:
    """The emulator on a loopback port and a provider talking to it.

    A context manager entered inside each test rather than a fixture: the
    server's task group must be left in the task that entered it, and
    pytest-asyncio runs a fixture's setup and teardown in different tasks.
    """
    sent, sleep = Sent(), RecordingSleep()
    app = create_app(data_dir, api_key=KEY)
    async with (
        serve_emulator(app) as url,
        # With an api_key the control endpoints need it too, as on the daemon's local backend.
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as control,
        httpx.AsyncClient(timeout=30.0, event_hooks={"request": [sent.hook]}) as http,
    ):
        # A trailing /v1 is accepted, as from a user's config.
        provider = TogetherProvider(
            http, base_url=url + "/v1", api_key=KEY, kind="local", retry=RetryPolicy(), sleep=sleep
        )
        yield Env(Emulator(url, control), provider, sent, sleep)


def request_line(custom_id: str, text: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user", "content": text}]},
    }


def write_batch(path: Path, count: int, *, salt: str = "") -> str:
    """Write a batch input file; return its sha256."""
    lines = [json.dumps(request_line(f"req-{i}", f"hello {i} {salt}")) for i in range(count)]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def wait_terminal(provider: TogetherProvider, batch_id: str) -> RemoteBatch:
    with anyio.fail_after(60):
        while True:
            batch = await provider.get_batch(batch_id)
            if batch.status.terminal:
                return batch
            await anyio.sleep(0.05)


async def run_batch(provider: TogetherProvider, path: Path, sha256: str) -> RemoteBatch:
    file_id = await provider.upload_file(path, filename=path.name, sha256=sha256)
    created = await provider.create_batch(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="job-1"
    )
    return await wait_terminal(provider, created.id)


async def test_full_cycle(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    sha256 = write_batch(source, 5)
    dest = tmp_path / "output.jsonl"

    async with running(tmp_path / "emulator") as env:
        file_id = await env.provider.upload_file(source, filename="batch.jsonl", sha256=sha256)
        created = await env.provider.create_batch(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="job-1"
        )
        assert created.input_file_id == file_id
        assert created.status in (RemoteStatus.VALIDATING, RemoteStatus.IN_PROGRESS)
        assert created.created_at is not None and created.created_at.tzinfo is not None

        done = await wait_terminal(env.provider, created.id)
        assert done.status is RemoteStatus.COMPLETED
        assert done.output_file_id is not None
        assert done.error_file_id is None
        assert [b.id for b in await env.provider.list_batches()] == [created.id]

        size = await env.provider.download_file(done.output_file_id, dest)

    assert size == dest.stat().st_size
    answers = {line["custom_id"]: line for line in map(json.loads, dest.read_text().splitlines())}
    assert sorted(answers) == [f"req-{i}" for i in range(5)]
    assert all(a["response"]["status_code"] == 200 for a in answers.values())

    # The presigned PUT never carried the key; every API call did.
    puts = [headers for method, _, headers in env.sent.requests if method == "PUT"]
    assert len(puts) == 1
    assert "authorization" not in puts[0]
    assert int(puts[0]["content-length"]) == source.stat().st_size
    api_calls = [headers for _, path, headers in env.sent.requests if path.startswith("/v1/")]
    assert api_calls and all(h["authorization"] == f"Bearer {KEY}" for h in api_calls)


async def test_identical_bytes_reuse_the_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sha256 = write_batch(first, 3)
    assert write_batch(second, 3) == sha256

    async with running(tmp_path / "emulator") as env:
        file_id = await env.provider.upload_file(first, filename="a.jsonl", sha256=sha256)
        assert await env.provider.upload_file(second, filename="b.jsonl", sha256=sha256) == file_id

    # 409 on the second: no second PUT, no second preprocess.
    assert len([r for r in env.sent.requests if r[0] == "PUT"]) == 1
    assert len(env.sent.to("POST", f"/v1/files/{file_id}/preprocess")) == 1
    assert len(env.sent.to("POST", "/v1/files")) == 2


async def test_truncated_download_is_resumed(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    sha256 = write_batch(source, 40)
    clean, resumed = tmp_path / "clean.jsonl", tmp_path / "resumed.jsonl"

    async with running(tmp_path / "emulator") as env:
        done = await run_batch(env.provider, source, sha256)
        assert done.output_file_id is not None
        full = await env.provider.download_file(done.output_file_id, clean)
        assert full > 1000

        await env.emulator.fault(method="GET", path="/v1/files/*/content", truncate_at=1000, times=1)
        assert await env.provider.download_file(done.output_file_id, resumed) == full

    assert resumed.read_bytes() == clean.read_bytes()
    ranges = [h.get("range") for h in env.sent.to("GET", f"/v1/files/{done.output_file_id}/content")]
    assert ranges == [None, None, "bytes=1000-"]
    assert len(env.sleep.calls) == 1


async def test_503_with_retry_after_on_get_is_retried(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    sha256 = write_batch(source, 2)

    async with running(tmp_path / "emulator") as env:
        done = await run_batch(env.provider, source, sha256)
        before = len(env.sleep.calls)
        await env.emulator.fault(method="GET", path=f"/v1/batches/{done.id}", status=503, retry_after=7, times=2)
        again = await env.provider.get_batch(done.id)
        stats = await env.emulator.stats()

    assert again.id == done.id
    assert again.status is RemoteStatus.COMPLETED
    # Jitter for the first two retries stays under 1 s; the server asked for 7.
    assert env.sleep.calls[before:] == [7.0, 7.0]
    assert len(env.sent.to("GET", f"/v1/batches/{done.id}")) >= 3
    assert stats["requests"][f"GET /v1/batches/{done.id}"] == len(env.sent.to("GET", f"/v1/batches/{done.id}"))


async def test_create_lost_answer_is_outcome_unknown(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    sha256 = write_batch(source, 2)

    async with running(tmp_path / "emulator") as env:
        file_id = await env.provider.upload_file(source, filename="batch.jsonl", sha256=sha256)
        # The emulator creates the batch, then answers 503: exactly what listing must reconcile.
        await env.emulator.fault(method="POST", path="/v1/batches", status=503, act=True, times=1)
        with pytest.raises(ProviderError) as info:
            await env.provider.create_batch(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", job_id="job-1"
            )
        listed = await env.provider.list_batches()

    assert info.value.outcome_unknown
    assert info.value.status_code == 503
    assert env.sleep.calls == []
    assert len(env.sent.to("POST", "/v1/batches")) == 1
    assert [b.input_file_id for b in listed] == [file_id]


async def test_wrong_key_is_refused_without_retry(tmp_path: Path) -> None:
    async with running(tmp_path / "emulator") as env, httpx.AsyncClient() as http:
        wrong = TogetherProvider(http, base_url=env.emulator.url, api_key="wrong", sleep=env.sleep)
        with pytest.raises(ProviderError) as info:
            await wrong.list_batches()
    assert info.value.status_code == 401
    assert not info.value.retryable
    assert "Invalid API key" in info.value.message
    assert env.sleep.calls == []


async def test_files_are_deleted_and_a_refusal_is_not_retried(tmp_path: Path) -> None:
    source = tmp_path / "batch.jsonl"
    sha256 = write_batch(source, 2)

    async with running(tmp_path / "emulator") as env:
        done = await run_batch(env.provider, source, sha256)
        assert done.output_file_id is not None and env.provider.uploads_files
        # Ended: its results are kept (Together documents no retention: assumed 30 days from the end).
        assert done.results_expire_at is not None and done.created_at is not None
        assert (done.results_expire_at - done.created_at).days in (29, 30)
        await env.provider.delete_file(done.input_file_id)
        await env.provider.delete_file(done.output_file_id)
        listed = (await env.emulator.control.get("/v1/files")).json()["data"]
        assert {done.input_file_id, done.output_file_id}.isdisjoint(f["id"] for f in listed)
        # A repeat (a restart after the delete, before its record) finds it gone: that is deleted.
        await env.provider.delete_file(done.input_file_id)
        with pytest.raises(ProviderError) as gone:
            await env.provider.download_file(done.output_file_id, tmp_path / "out.jsonl")
        assert gone.value.status_code == 404 and not gone.value.retryable

        second = tmp_path / "second.jsonl"
        other = await run_batch(env.provider, second, write_batch(second, 2, salt="other"))
        await env.emulator.fault(method="DELETE", path="/v1/files/*", status=403, times=1)
        with pytest.raises(ProviderError) as refused:
            await env.provider.delete_file(other.input_file_id)
        # A passing failure is retried; then it goes.
        await env.emulator.fault(method="DELETE", path="/v1/files/*", status=503, times=1)
        await env.provider.delete_file(other.input_file_id)
        with pytest.raises(ProviderError):
            await env.provider.delete_batch(other.id)  # Together's files are deleted, never its batches

    assert refused.value.status_code == 403 and not refused.value.retryable
    assert len(env.sent.to("DELETE", f"/v1/files/{other.input_file_id}")) == 3
