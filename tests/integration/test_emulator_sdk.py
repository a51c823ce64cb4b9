"""The official `together` (v3) and `openai` SDKs, unchanged, against the emulator on a loopback port.

No environment tweak is needed for the upload: the SDK checks the presigned
`Location` with `_validate_upload_server_url`, which allows plain http and
loopback hosts for URLs the API itself issued (on-prem MinIO); only further
redirect hops are strict, and those are relaxed anyway when the client's
`base_url` is http (TOGETHER_ALLOW_INSECURE_UPLOAD_REDIRECTS would be the
switch otherwise). The emulator issues no redirect hop, so neither applies.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from together import AsyncTogether, Together
from together.lib.resources.files import FileAlreadyExistsError

from batchd.emulator import create_app, serve_emulator
from tests.integration.emulator_helpers import parse_jsonl, request_line, to_jsonl

LINES = [request_line(f"request-{i}", f"question {i}") for i in range(5)]


def write_input(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "batch.jsonl"
    path.write_bytes(to_jsonl(LINES))
    return path


def sdk_round_trip(base_url: str, input_path: Path) -> tuple[str, str, list[str], bytes]:
    """Plain blocking SDK code, as a user would write it."""
    with Together(api_key="any-key", base_url=base_url) as client:
        uploaded = client.files.upload(file=input_path, purpose="batch-api")
        created = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert created.job is not None and created.job.id is not None
        batch_id = created.job.id
        # A bounded poll: the emulator's worker advances in the background.
        deadline = time.monotonic() + 20
        job = client.batches.retrieve(batch_id)
        while job.status != "COMPLETED":
            assert job.status in ("VALIDATING", "IN_PROGRESS") and time.monotonic() < deadline, job
            time.sleep(0.02)
            job = client.batches.retrieve(batch_id)
        assert job.output_file_id is not None
        output = client.files.content(job.output_file_id).read()
        listed = [b.id for b in client.batches.list() if b.id is not None]
        return uploaded.id, batch_id, listed, output


async def test_sync_sdk_uploads_creates_polls_and_downloads(tmp_path: Path) -> None:
    input_path = write_input(tmp_path / "input")
    async with serve_emulator(create_app(tmp_path / "emulator")) as base_url:
        file_id, batch_id, listed, output = await anyio.to_thread.run_sync(sdk_round_trip, base_url, input_path)
    assert file_id.startswith("file-")
    assert listed == [batch_id]
    results = parse_jsonl(output)
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in LINES)
    assert all(r["response"]["status_code"] == 200 for r in results)


async def test_async_sdk_reuse_by_checksum_files_and_cancel(tmp_path: Path) -> None:
    input_path = write_input(tmp_path / "input")
    # max_retries=0: the SDK retries 409 like a lock timeout; here 409 means "already uploaded".
    async with (
        serve_emulator(create_app(tmp_path / "emulator")) as base_url,
        AsyncTogether(api_key="any-key", base_url=base_url, max_retries=0) as client,
    ):
        first = await client.files.upload(file=input_path, purpose="batch-api")
        assert first.file_type == "jsonl" and first.bytes == input_path.stat().st_size
        with pytest.raises(FileAlreadyExistsError) as existing:
            await client.files.upload(file=input_path, purpose="batch-api", raise_if_already_exists=True)
        assert existing.value.file_id == first.id
        reused = await client.files.upload(file=input_path, purpose="batch-api")
        assert reused.id == first.id

        listing = await client.files.list()
        assert [f.id for f in listing.data] == [first.id]
        retrieved = await client.files.retrieve(first.id)
        assert retrieved.filename == "batch.jsonl" and retrieved.purpose == "batch-api"

        async with httpx.AsyncClient(base_url=base_url) as control:
            await control.post("/_emulator/pause")
            created = await client.batches.create(input_file_id=first.id, endpoint="/v1/chat/completions")
            assert created.job is not None and created.job.id is not None
            assert created.job.status == "VALIDATING" and created.job.created_at is not None
            cancelled = await client.batches.cancel(created.job.id)
            assert cancelled.status == "CANCELLED" and cancelled.completed_at is not None
            await control.post("/_emulator/resume")


# -- the openai SDK ------------------------------------------------------------------

OPENAI_TERMINAL = ("completed", "failed", "expired", "cancelled")


def openai_round_trip(base_url: str, input_path: Path) -> tuple[str, list[str], list[str], bytes]:
    """Plain blocking SDK code, as a user would write it: upload, create, poll, list, download."""
    with OpenAI(api_key="any-key", base_url=f"{base_url}/openai/v1") as client:
        uploaded = client.files.create(file=input_path, purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == input_path.stat().st_size
        created = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"job": "sdk-test"},
        )
        deadline = time.monotonic() + 20
        batch = client.batches.retrieve(created.id)
        while batch.status not in OPENAI_TERMINAL:
            assert time.monotonic() < deadline, batch
            time.sleep(0.02)
            batch = client.batches.retrieve(created.id)
        assert batch.status == "completed" and batch.metadata == {"job": "sdk-test"}
        assert batch.request_counts is not None and batch.request_counts.completed == len(LINES)
        assert batch.output_file_id is not None and batch.completed_at is not None
        more = []
        for _ in range(2):
            again = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            more.append(again.id)
        # limit=1: the SDK follows `has_more` and `after` through three pages.
        listed = [b.id for b in client.batches.list(limit=1)]
        output = client.files.content(batch.output_file_id).read()
        return batch.id, more, listed, output


async def test_sync_openai_sdk_uploads_creates_polls_lists_and_downloads(tmp_path: Path) -> None:
    input_path = write_input(tmp_path / "input")
    async with serve_emulator(create_app(tmp_path / "emulator")) as base_url:
        batch_id, more, listed, output = await anyio.to_thread.run_sync(openai_round_trip, base_url, input_path)
    assert listed == [*more[::-1], batch_id]
    results = parse_jsonl(output)
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in LINES)
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)


async def test_async_openai_sdk_round_trip_and_cancel(tmp_path: Path) -> None:
    input_path = write_input(tmp_path / "input")
    async with (
        serve_emulator(create_app(tmp_path / "emulator")) as base_url,
        AsyncOpenAI(api_key="any-key", base_url=f"{base_url}/openai/v1") as client,
        httpx.AsyncClient(base_url=base_url) as control,
    ):
        uploaded = await client.files.create(file=input_path, purpose="batch")
        assert (await client.files.retrieve(uploaded.id)).status == "processed"
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        with anyio.fail_after(20):
            batch = await client.batches.retrieve(created.id)
            while batch.status not in OPENAI_TERMINAL:
                await anyio.sleep(0.02)
                batch = await client.batches.retrieve(created.id)
        assert batch.status == "completed" and batch.output_file_id is not None
        content = await client.files.content(batch.output_file_id)
        assert len(parse_jsonl(content.content)) == len(LINES)

        await control.post("/_emulator/pause")
        held = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelling = await client.batches.cancel(held.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        await control.post("/_emulator/resume")
        with anyio.fail_after(20):
            while (await client.batches.retrieve(held.id)).status != "cancelled":  # noqa: ASYNC110 - over HTTP
                await anyio.sleep(0.02)
        listed = [b.id async for b in client.batches.list(limit=1)]
        assert listed == [held.id, created.id]
