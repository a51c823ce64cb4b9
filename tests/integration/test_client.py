"""batchd.Client and batchd.AsyncClient against the emulator's Together dialect over loopback."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from batchd import AsyncClient, BatchJob, BatchJobStatus, Client
from batchd.emulator import create_app, serve_emulator
from batchd.providers.base import ProviderError
from tests.integration.emulator_helpers import request_line, to_jsonl

KEY = "client-test-key"


@asynccontextmanager
async def emulator(tmp_path: Path) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The emulator on loopback and a control client for its /_emulator endpoints."""
    async with (
        serve_emulator(create_app(tmp_path / "emulator")) as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as control,
    ):
        yield url, control


async def wait_for(client: AsyncClient, batch_id: str, *statuses: str) -> BatchJob:
    with anyio.fail_after(20):
        while True:
            batch = await client.batches.get_batch(batch_id)
            if batch.status in statuses:
                return batch
            await anyio.sleep(0.02)


def file_names(folder: Path) -> list[str]:
    """The regular files in `folder` (a temporary download left behind would show here)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def write_batch(path: Path, count: int = 2) -> Path:
    path.write_bytes(to_jsonl(request_line(f"r{i}", f"text {i}") for i in range(count)))
    return path


async def test_async_client_round_trip(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, _), AsyncClient(api_key=KEY, base_url=url) as client:
        source = write_batch(tmp_path / "in.jsonl")
        uploaded = await client.files.upload(file=source, purpose="batch-api")
        assert uploaded.id.startswith("file-")
        assert (uploaded.object, uploaded.filename, uploaded.bytes) == ("file", "in.jsonl", source.stat().st_size)
        assert (uploaded.purpose, uploaded.file_type, uploaded.line_count, uploaded.processed) == (
            "batch-api",
            "jsonl",
            2,
            True,
        )
        assert isinstance(uploaded.created_at, int)

        created = await client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")
        assert created.status in ("validating", "in_progress", "completed")
        assert isinstance(created.status, BatchJobStatus)

        done = await wait_for(client, created.id, "COMPLETED")
        assert done.status == "COMPLETED" and done.status == "completed"
        assert done.input_file_id == uploaded.id
        assert done.endpoint == "/v1/chat/completions"
        assert done.completion_window == "24h"
        assert done.expires_at == done.created_at + 86400
        assert done.completed_at is not None and done.completed_at >= done.created_at
        assert done.output_file_id is not None and done.error_file_id is None
        assert done.progress == 100.0

        listed = await client.batches.list_batches()
        assert [b.id for b in listed] == [created.id]

        output = tmp_path / "out" / "results.jsonl"
        output.parent.mkdir()
        output.write_text("stale content that must go\n" * 1000, encoding="utf-8")
        got = await client.files.retrieve_content(id=done.output_file_id, output=output)
        assert (got.object, got.id, got.filename, got.size) == ("local", done.output_file_id, str(output), got.size)
        answers = {json.loads(line)["custom_id"] for line in output.read_text(encoding="utf-8").splitlines()}
        assert answers == {"r0", "r1"}
        assert got.size == output.stat().st_size
        assert file_names(output.parent) == ["results.jsonl"]


async def test_upload_of_the_same_file_again_reuses_it(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, _), AsyncClient(api_key=KEY, base_url=url) as client:
        source = write_batch(tmp_path / "in.jsonl")
        first = await client.files.upload(file=str(source))
        again = await client.files.upload(file=source)
        assert again.id == first.id
        assert again.bytes == first.bytes and again.filename == "in.jsonl"
        with pytest.raises(ValueError, match="purpose"):
            await client.files.upload(file=source, purpose="fine-tune")


async def test_cancel_batch(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, control), AsyncClient(api_key=KEY, base_url=url) as client:
        (await control.post("/_emulator/pause")).raise_for_status()
        uploaded = await client.files.upload(file=write_batch(tmp_path / "in.jsonl"))
        created = await client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")
        cancelled = await client.batches.cancel_batch(created.id)
        assert cancelled.status == "CANCELLED"
        assert cancelled.cancelled_at is not None and cancelled.completed_at is None


async def test_failed_download_leaves_the_output_alone(tmp_path: Path) -> None:
    async with (
        emulator(tmp_path) as (url, control),
        AsyncClient(api_key=KEY, base_url=url, max_retries=0) as client,
    ):
        uploaded = await client.files.upload(file=write_batch(tmp_path / "in.jsonl", 20))
        created = await client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")
        done = await wait_for(client, created.id, "completed")
        assert done.output_file_id is not None
        fault = {"method": "GET", "path": f"/v1/files/{done.output_file_id}/content", "truncate_at": 100}
        (await control.post("/_emulator/faults", json=fault)).raise_for_status()
        output = tmp_path / "results.jsonl"
        output.write_text("previous\n", encoding="utf-8")
        with pytest.raises(ProviderError) as info:
            await client.files.retrieve_content(id=done.output_file_id, output=output)
        assert info.value.retryable
        assert output.read_text(encoding="utf-8") == "previous\n"
        assert file_names(tmp_path) == ["in.jsonl", "results.jsonl"]


async def test_an_interrupted_download_is_resumed_within_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with emulator(tmp_path) as (url, control), AsyncClient(api_key=KEY, base_url=url) as client:
        uploaded = await client.files.upload(file=write_batch(tmp_path / "in.jsonl", 50))
        done = await wait_for(
            client,
            (await client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")).id,
            "completed",
        )
        assert done.output_file_id is not None
        fault = {"method": "GET", "path": f"/v1/files/{done.output_file_id}/content", "truncate_at": 1000}
        (await control.post("/_emulator/faults", json=fault)).raise_for_status()
        output = tmp_path / "results.jsonl"
        # The retry's backoff is recorded, not slept (the client offers no sleep of its own to inject).
        waits: list[float] = []

        async def record(seconds: float) -> None:
            waits.append(seconds)

        monkeypatch.setattr(client._provider, "_sleep", record)
        got = await client.files.retrieve_content(id=done.output_file_id, output=output)
        assert len(waits) == 1
        assert len(output.read_text(encoding="utf-8").splitlines()) == 50
        assert got.size == output.stat().st_size > 1000
        stats = (await control.get("/_emulator/stats")).json()
        assert stats["requests"][f"GET /v1/files/{done.output_file_id}/content"] == 2


async def test_a_passed_in_http_client_stays_open(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, _), httpx.AsyncClient(trust_env=False) as http:
        async with AsyncClient(api_key=KEY, base_url=url, http_client=http) as client:
            assert await client.batches.list_batches() == []
        assert not http.is_closed
        assert (await http.get(f"{url}/v1/batches", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200


# -- the sync client ------------------------------------------------------------


@pytest.fixture
def emulator_url(tmp_path: Path) -> Iterator[str]:
    """The emulator on its own event loop in a thread (the sync client blocks the test's thread)."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_emulator(create_app(tmp_path / "emulator"))) as url,
    ):
        yield url


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "batchd-client"]


def test_sync_client_round_trip(emulator_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    monkeypatch.setenv("TOGETHER_BASE_URL", emulator_url)
    with Client() as client:
        assert client.base_url == emulator_url and KEY not in repr(client)
        uploaded = client.files.upload(file=write_batch(tmp_path / "in.jsonl"), purpose="batch-api")
        created = client.batches.create_batch(file_id=uploaded.id, endpoint="/v1/chat/completions")
        assert [b.id for b in client.batches.list_batches()] == [created.id]
        batch = client.batches.get_batch(created.id)
        while batch.status not in ("COMPLETED", "FAILED"):
            time.sleep(0.02)
            batch = client.batches.get_batch(created.id)
        assert batch.status == "COMPLETED"
        assert batch.output_file_id is not None
        got = client.files.retrieve_content(id=batch.output_file_id, output=tmp_path / "out.jsonl")
        assert got.size == (tmp_path / "out.jsonl").stat().st_size
        with pytest.raises(ProviderError, match="404"):
            client.batches.get_batch("no-such-batch")
    assert client_threads() == []


def test_sync_client_close_is_idempotent_and_an_unclosed_one_is_collected(emulator_url: str) -> None:
    client = Client(api_key=KEY, base_url=emulator_url)
    assert client.batches.list_batches() == []
    assert len(client_threads()) == 1
    client.close()
    client.close()
    assert client_threads() == []

    forgotten: Any = Client(api_key=KEY, base_url=emulator_url)
    assert forgotten.batches.list_batches() == []
    closer = forgotten._close
    del forgotten
    gc.collect()
    assert not closer.alive
    assert client_threads() == []
