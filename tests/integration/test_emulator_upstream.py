"""The upstream engine for real: a 1,000-request batch through a local OpenAI-compatible server,
and a batch stopped half-way that resumes without sending answered requests again."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from batchd.emulator import UpstreamEngine, create_app, serve_emulator
from batchd.emulator.spool import custom_id_hash, recover_spool
from tests.integration.emulator_helpers import (
    BearerAuth,
    openai_create,
    openai_download,
    openai_upload,
    openai_wait,
    request_line,
    to_jsonl,
)
from tests.integration.upstream_server import CountingUpstream, Hold

REQUESTS = 1000
CONCURRENCY = 16
LINES = [request_line(f"req-{i:04d}", f"question {i}") for i in range(REQUESTS)]


@asynccontextmanager
async def emulator_over(data_dir: Path, upstream_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator with an upstream engine, served on loopback; a client for it."""
    async with (
        httpx.AsyncClient() as upstream_http,
        serve_emulator(create_app(data_dir, engine=UpstreamEngine(upstream_http, upstream_url, CONCURRENCY))) as url,
        httpx.AsyncClient(base_url=url, auth=BearerAuth("k")) as client,
    ):
        yield client


def check_output(output: list[dict[str, Any]]) -> None:
    by_id = {line["custom_id"]: line for line in output}
    assert len(output) == len(by_id) == REQUESTS
    for i in range(REQUESTS):
        body = by_id[f"req-{i:04d}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"upstream: question {i}"


async def test_a_thousand_requests_each_sent_once(tmp_path: Path) -> None:
    upstream = CountingUpstream()
    async with (
        serve_emulator(upstream.app()) as upstream_url,
        emulator_over(tmp_path / "emulator", upstream_url) as client,
    ):
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(LINES))))["id"]
        batch = await openai_wait(client, batch_id, timeout=60)
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": REQUESTS, "completed": REQUESTS, "failed": 0}
        check_output(await openai_download(client, batch["output_file_id"]))
    assert len(upstream.received) == REQUESTS and set(upstream.received.values()) == {1}


async def test_a_batch_stopped_half_way_resumes_without_resending_answers(tmp_path: Path) -> None:
    hold = Hold(after=REQUESTS // 2)
    upstream = CountingUpstream(on_request=hold)
    async with serve_emulator(upstream.app()) as upstream_url:
        async with emulator_over(tmp_path / "emulator", upstream_url) as client:
            batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(LINES))))["id"]
            with anyio.fail_after(30):
                await hold.reached.wait()
            # Leaving the block stops the emulator with requests in flight upstream.

        answered_before = set(upstream.answered)
        assert len(answered_before) == REQUESTS // 2
        spool = recover_spool(tmp_path / "emulator" / "spool" / f"{batch_id}.jsonl")
        # Every answer the emulator got is on disk.
        assert spool.completed == len(answered_before)
        on_disk = {f"question {i}" for i in range(REQUESTS) if custom_id_hash(f"req-{i:04d}") in spool.answered}
        assert on_disk == answered_before

        hold.released.set()
        hold.after = REQUESTS * 2
        async with emulator_over(tmp_path / "emulator", upstream_url) as client:
            batch = await openai_wait(client, batch_id, timeout=60)
            assert batch["status"] == "completed" and batch["request_counts"]["completed"] == REQUESTS
            check_output(await openai_download(client, batch["output_file_id"]))

    # Answered requests were never sent again; only those in flight at the stop were.
    assert all(upstream.received[text] == 1 for text in answered_before)
    sent_twice = [text for text, count in upstream.received.items() if count > 1]
    assert max(upstream.received.values()) <= 2 and len(sent_twice) <= CONCURRENCY
    assert len(upstream.received) == REQUESTS


async def test_a_torn_spool_record_is_asked_again(tmp_path: Path) -> None:
    upstream = CountingUpstream()
    lines = LINES[:20]
    async with (
        serve_emulator(upstream.app()) as upstream_url,
        emulator_over(tmp_path / "emulator", upstream_url) as client,
    ):
        await client.post("/_emulator/pause")
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(lines))))["id"]
    # As if a previous run answered three requests and died writing the third.
    records = [
        json.dumps({"custom_id": line["custom_id"], "response": {"status_code": 200, "body": {"n": i}}}).encode()
        for i, line in enumerate(lines[:3])
    ]
    spool = tmp_path / "emulator" / "spool" / f"{batch_id}.jsonl"
    prefixes = [b"o " + custom_id_hash(line["custom_id"]).encode() + b" " for line in lines[:3]]
    torn = prefixes[2] + records[2][:9]
    spool.write_bytes(prefixes[0] + records[0] + b"\n" + prefixes[1] + records[1] + b"\n" + torn)
    async with (
        serve_emulator(upstream.app()) as upstream_url,
        emulator_over(tmp_path / "emulator", upstream_url) as client,
    ):
        batch = await openai_wait(client, batch_id, timeout=30)
        output = {line["custom_id"]: line for line in await openai_download(client, batch["output_file_id"])}
    assert batch["status"] == "completed" and len(output) == 20
    assert output["req-0000"]["response"]["body"] == {"n": 0}  # kept from the spool, not asked again
    assert "question 0" not in upstream.received and "question 1" not in upstream.received
    assert upstream.received["question 2"] == 1 and len(upstream.received) == 18


async def test_anthropic_requests_are_translated_to_the_upstream_s_chat_completions_and_back(tmp_path: Path) -> None:
    upstream = CountingUpstream()
    params = {
        "model": "claude-x", "max_tokens": 32, "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what is 2+2"}]}],
        "stop_sequences": ["\n\n"], "top_k": 5,
    }  # fmt: skip
    requests = [
        {"custom_id": "ok", "params": params},
        {"custom_id": "bad", "params": {**params, "max_tokens": 0}},  # refused here, never sent upstream
    ]
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with (
        serve_emulator(upstream.app()) as upstream_url,
        emulator_over(tmp_path / "emulator", upstream_url) as client,
    ):
        created = await client.post("/anthropic/v1/messages/batches", json={"requests": requests}, headers=headers)
        batch_id = created.json()["id"]
        url = f"/anthropic/v1/messages/batches/{batch_id}"
        with anyio.fail_after(30):
            while (batch := (await client.get(url, headers=headers)).json())["processing_status"] != "ended":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        results = (await client.get(batch["results_url"], headers=headers)).content
    by_id = {line["custom_id"]: line["result"] for line in map(json.loads, results.splitlines())}
    assert upstream.bodies == [
        {
            "model": "claude-x", "max_tokens": 32, "stop": ["\n\n"],
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2"}],
        }
    ]  # fmt: skip
    message = by_id["ok"]["message"]
    assert by_id["ok"]["type"] == "succeeded" and message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "upstream: what is 2+2"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {
        "input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }  # fmt: skip
    assert by_id["bad"]["type"] == "errored"
    assert by_id["bad"]["error"]["error"]["type"] == "invalid_request_error"
