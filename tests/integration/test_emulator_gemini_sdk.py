"""The official `google-genai` SDK, unchanged, against the emulator's Gemini dialect on a loopback
port: upload, batches from a file and inline, get, list by pages, cancel, download.

The SDK talks to `/gemini/v1/…` (its default version) with the key as `x-goog-api-key`, and sends
the upload's bytes to the session URL without it. What its `BatchJob` shows is what its
`_BatchJob_from_mldev` reads: `name`, `display_name`, `state` (JOB_STATE_*), the times, `model` and
`dest`; it reads no `batchStats` for the Gemini API (`completion_stats` stays None), so the counts
are checked on the wire (test_emulator_gemini.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from google import genai
from google.genai import types

from batchd.emulator import create_app, serve_emulator
from tests.integration.emulator_helpers import gemini_line, parse_jsonl, to_jsonl

LINES = [gemini_line(f"request-{i}", f"question {i}") for i in range(4)]
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def sdk_client(base_url: str) -> genai.Client:
    """A client on the emulator that fails at once rather than retrying (and sleeping)."""
    options = types.HttpOptions(
        base_url=f"{base_url}/gemini",
        timeout=30_000,  # milliseconds
        retry_options=types.HttpRetryOptions(attempts=1),
        client_args={"trust_env": False},
    )
    return genai.Client(api_key="any-key", http_options=options)


def finished(client: genai.Client, name: str) -> types.BatchJob:
    """Poll a batch until it ends (bounded), as a user's loop does."""
    deadline = time.monotonic() + 20
    job = client.batches.get(name=name)
    while job.state is None or job.state.value not in TERMINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
        job = client.batches.get(name=name)
    return job


def sdk_round_trip(base_url: str, input_path: Path) -> dict[str, Any]:
    """Plain blocking SDK code, as a user would write it; what it saw along the way."""
    seen: dict[str, Any] = {}
    with sdk_client(base_url) as client:
        # The Gemini docs upload batch input with mime_type "jsonl" (Python cannot guess one for .jsonl).
        uploaded = client.files.upload(file=input_path, config={"mime_type": "jsonl", "display_name": "requests"})
        assert uploaded.name is not None
        seen["uploaded"] = uploaded
        seen["got"] = client.files.get(name=uploaded.name)

        created = client.batches.create(
            model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "file-job"}
        )
        assert created.name is not None
        seen["created"] = created
        job = finished(client, created.name)
        seen["job"] = job
        assert job.dest is not None and job.dest.file_name is not None
        seen["output"] = client.files.download(file=job.dest.file_name)

        inline_requests: list[types.InlinedRequestDict] = [
            {"contents": [{"role": "user", "parts": [{"text": f"inline {i}"}]}], "metadata": {"key": f"i{i}"}}
            for i in range(2)
        ]
        inline = client.batches.create(model="gemini-2.5-flash", src=inline_requests)
        assert inline.name is not None
        seen["inline"] = finished(client, inline.name)

        # Caught before it runs: the control endpoint pauses the emulator.
        httpx.post(f"{base_url}/_emulator/pause", trust_env=False)
        one: list[types.InlinedRequestDict] = [{"contents": [{"parts": [{"text": "wait"}]}]}]
        waiting = client.batches.create(model="gemini-2.5-flash", src=one)
        assert waiting.name is not None
        seen["waiting_state"] = client.batches.get(name=waiting.name).state
        client.batches.cancel(name=waiting.name)
        seen["cancelled"] = client.batches.get(name=waiting.name)
        httpx.post(f"{base_url}/_emulator/resume", trust_env=False)

        pager = client.batches.list(config={"page_size": 2})
        seen["first_page"] = [job.name for job in pager.page]
        seen["listed"] = [job.name for job in pager]  # iterating fetches the further pages
        seen["names"] = [created.name, inline.name, waiting.name]
        seen["files"] = [file.name for file in client.files.list(config={"page_size": 1})]
        client.files.delete(name=uploaded.name)
        seen["files_after_delete"] = [file.name for file in client.files.list()]
        client.batches.delete(name=waiting.name)
        seen["listed_after_delete"] = [job.name for job in client.batches.list()]
    return seen


async def test_the_sdk_uploads_creates_gets_lists_cancels_and_downloads(tmp_path: Path) -> None:
    input_path = tmp_path / "requests.jsonl"
    input_path.write_bytes(to_jsonl(LINES))
    async with serve_emulator(create_app(tmp_path / "emulator")) as base_url:
        seen = await anyio.to_thread.run_sync(sdk_round_trip, base_url, input_path)

    uploaded: types.File = seen["uploaded"]
    assert uploaded.name is not None and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == input_path.stat().st_size and uploaded.display_name == "requests"
    assert uploaded.state == types.FileState.ACTIVE and uploaded.source == types.FileSource.UPLOADED
    assert seen["got"].name == uploaded.name and seen["got"].sha256_hash == uploaded.sha256_hash

    created: types.BatchJob = seen["created"]
    assert created.state == types.JobState.JOB_STATE_PENDING and created.display_name == "file-job"
    assert created.model == "models/gemini-2.5-flash" and created.create_time is not None
    job: types.BatchJob = seen["job"]
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.end_time is not None
    results = {line["key"]: line for line in parse_jsonl(seen["output"])}
    assert sorted(results) == [line["key"] for line in LINES]
    answer = types.GenerateContentResponse.model_validate(results["request-2"]["response"])
    assert answer.text == "echo: question 2"

    inline: types.BatchJob = seen["inline"]
    assert inline.state == types.JobState.JOB_STATE_SUCCEEDED
    assert inline.dest is not None and inline.dest.inlined_responses is not None
    inlined = inline.dest.inlined_responses
    assert [item.metadata for item in inlined] == [{"key": "i0"}, {"key": "i1"}]
    assert [item.response.text for item in inlined if item.response is not None] == ["echo: inline 0", "echo: inline 1"]

    assert seen["waiting_state"] == types.JobState.JOB_STATE_PENDING
    cancelled: types.BatchJob = seen["cancelled"]
    assert cancelled.state == types.JobState.JOB_STATE_CANCELLED and cancelled.dest is None

    created_name, inline_name, waiting_name = seen["names"]
    assert seen["first_page"] == [waiting_name, inline_name]
    assert seen["listed"] == [waiting_name, inline_name, created_name]
    assert len(seen["files"]) == 2 and uploaded.name in seen["files"]
    assert uploaded.name not in seen["files_after_delete"] and job.dest is not None
    assert seen["files_after_delete"] == [job.dest.file_name]
    assert seen["listed_after_delete"] == [inline_name, created_name]


async def test_the_async_sdk_runs_a_file_batch_with_an_error_line(tmp_path: Path) -> None:
    input_path = tmp_path / "requests.jsonl"
    input_path.write_bytes(to_jsonl([gemini_line("fine"), gemini_line("busy", trigger={"status": 429})]))
    async with serve_emulator(create_app(tmp_path / "emulator")) as base_url:
        client = sdk_client(base_url).aio
        async with client:
            uploaded = await client.files.upload(file=input_path, config={"mime_type": "application/jsonl"})
            assert uploaded.name is not None and uploaded.mime_type == "application/jsonl"
            job = await client.batches.create(
                model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "async-job"}
            )
            assert job.name is not None and job.display_name == "async-job"
            with anyio.fail_after(20):
                while (job := await client.batches.get(name=job.name)).state != types.JobState.JOB_STATE_SUCCEEDED:  # noqa: ASYNC110 - polling is the API
                    await anyio.sleep(0.02)
            assert job.dest is not None and job.dest.file_name is not None
            output = await client.files.download(file=job.dest.file_name)
    results = {line["key"]: line for line in parse_jsonl(output)}
    # A SUCCEEDED batch may hold error lines: Google's shape, the trigger's status.
    assert results["busy"] == {
        "key": "busy",
        "error": {"code": 429, "message": "Emulated HTTP 429", "status": "RESOURCE_EXHAUSTED"},
    }
    assert "response" in results["fine"]
