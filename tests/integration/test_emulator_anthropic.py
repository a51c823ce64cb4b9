"""The emulator's Anthropic dialect over loopback: the wire shapes of PROVIDERS.md, and the
official `anthropic` SDK, unchanged, creating, retrieving, listing, cancelling and reading results."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from anthropic import Anthropic, AsyncAnthropic

from batchd.emulator import create_app, serve_emulator
from batchd.emulator.timeline import Timeline
from tests.integration.emulator_helpers import parse_jsonl

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
BATCHES = "/anthropic/v1/messages/batches"


def params(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}], **extra}


def request(custom_id: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": params(text, **extra)}


@asynccontextmanager
async def emulator(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with (
        serve_emulator(create_app(tmp_path / "emulator", **options)) as url,
        httpx.AsyncClient(base_url=url, headers=HEADERS, trust_env=False) as client,
    ):
        yield url, client


async def ended(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            batch: dict[str, Any] = (await client.get(f"{BATCHES}/{batch_id}")).json()
            if batch["processing_status"] == "ended":
                return batch
            await anyio.sleep(0.02)


async def test_a_batch_runs_to_results_with_every_request_accounted_for(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, client):
        requests = [
            request("ok-1", "first question"),
            request("ok-2", "second"),
            request("overloaded", batchd_emulator={"status": 529}),
            request("no-tokens", max_tokens=0),  # runs, and is answered errored as Anthropic does
        ]
        created = await client.post(BATCHES, json={"requests": requests})
        assert created.status_code == 200, created.text
        batch = created.json()
        assert batch["type"] == "message_batch" and batch["id"].startswith("msgbatch_")
        assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
        assert batch["request_counts"]["processing"] == 4
        assert batch["created_at"].endswith("Z") and batch["expires_at"] > batch["created_at"]

        done = await ended(client, batch["id"])
        assert done["request_counts"] == {"processing": 0, "succeeded": 2, "errored": 2, "canceled": 0, "expired": 0}
        assert done["ended_at"] is not None
        # Absolute, at the emulator itself: the SDK follows it as given.
        assert done["results_url"] == f"{url}{BATCHES}/{batch['id']}/results"
        got = await client.get(done["results_url"])
        assert got.status_code == 200
        lines = {line["custom_id"]: line["result"] for line in parse_jsonl(got.content)}
        assert set(lines) == {"ok-1", "ok-2", "overloaded", "no-tokens"}
        message = lines["ok-1"]["message"]
        assert lines["ok-1"]["type"] == "succeeded" and message["type"] == "message"
        assert message["content"] == [{"type": "text", "text": "echo: first question"}]
        assert set(message["usage"]) == {
            "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
        }  # fmt: skip
        assert message["usage"]["input_tokens"] == 2
        assert lines["overloaded"] == {
            "type": "errored",
            "error": {"type": "error", "error": {"type": "overloaded_error", "message": "Emulated HTTP 529"}},
        }
        assert lines["no-tokens"]["type"] == "errored"
        assert lines["no-tokens"]["error"]["error"]["type"] == "invalid_request_error"


async def test_a_cancelled_batch_says_canceled_for_every_request_it_never_ran(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        await client.post("/_emulator/pause")
        batch = (await client.post(BATCHES, json={"requests": [request(f"r{i}") for i in range(3)]})).json()
        cancelling = await client.post(f"{BATCHES}/{batch['id']}/cancel")
        assert cancelling.status_code == 200
        assert cancelling.json()["processing_status"] == "canceling"
        assert cancelling.json()["cancel_initiated_at"] is not None
        await client.post("/_emulator/resume")
        done = await ended(client, batch["id"])
        assert done["request_counts"] == {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 3, "expired": 0}
        results = parse_jsonl((await client.get(done["results_url"])).content)
        assert sorted(line["custom_id"] for line in results) == ["r0", "r1", "r2"]
        assert all(line["result"] == {"type": "canceled"} for line in results)
        again = await client.post(f"{BATCHES}/{batch['id']}/cancel")
        assert again.status_code == 400 and again.json()["error"]["type"] == "invalid_request_error"


async def test_an_expired_batch_says_expired_for_what_it_never_ran(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        requests = [request("a"), request("b", batchd_emulator={"expire_batch": True}), request("c")]
        batch = (await client.post(BATCHES, json={"requests": requests})).json()
        done = await ended(client, batch["id"])
        assert done["request_counts"]["succeeded"] == 1
        assert done["request_counts"]["expired"] == 2 and done["request_counts"]["errored"] == 0
        lines = parse_jsonl((await client.get(done["results_url"])).content)
        results = {line["custom_id"]: line["result"] for line in lines}
        assert results["b"] == results["c"] == {"type": "expired"}


async def test_listing_pages_newest_first_with_after_id_and_before_id(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        await client.post("/_emulator/pause")
        ids = [(await client.post(BATCHES, json={"requests": [request("x")]})).json()["id"] for _ in range(5)]
        newest_first = ids[::-1]
        first = (await client.get(BATCHES, params={"limit": 2})).json()
        assert [b["id"] for b in first["data"]] == newest_first[:2] and first["has_more"] is True
        assert first["first_id"] == newest_first[0] and first["last_id"] == newest_first[1]
        second = (await client.get(BATCHES, params={"limit": 2, "after_id": first["last_id"]})).json()
        assert [b["id"] for b in second["data"]] == newest_first[2:4] and second["has_more"] is True
        last = (await client.get(BATCHES, params={"limit": 2, "after_id": second["last_id"]})).json()
        assert [b["id"] for b in last["data"]] == newest_first[4:] and last["has_more"] is False
        back = (await client.get(BATCHES, params={"limit": 2, "before_id": second["first_id"]})).json()
        assert [b["id"] for b in back["data"]] == newest_first[:2] and back["has_more"] is False
        await client.post("/_emulator/resume")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"requests": []}, "at least one request"),
        ({"requests": [request("bad id!")]}, "requests.0.custom_id"),
        ({"requests": [request("a" * 65)]}, "requests.0.custom_id"),
        ({"requests": [request("same"), request("same")]}, "Duplicate custom_id"),
        ({"requests": [{"custom_id": "x"}]}, "requests.0.params"),
        ({"nothing": 1}, "at least one request"),
    ],
)
async def test_a_create_that_breaks_a_rule_is_refused_in_anthropic_s_shape(
    tmp_path: Path, body: dict[str, Any], says: str
) -> None:
    async with emulator(tmp_path) as (_url, client):
        refused = await client.post(BATCHES, json=body)
        assert refused.status_code == 400
        error = refused.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert says in error["error"]["message"]
        assert (await client.get(BATCHES)).json()["data"] == []  # nothing was created


async def test_errors_keys_and_versions_in_anthropic_s_shape(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (url, client):
        missing = await client.get(f"{BATCHES}/msgbatch_nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        broken = await client.post(BATCHES, content=b'{"requests": [', headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        async with httpx.AsyncClient(base_url=url, trust_env=False) as bare:
            anonymous = await bare.get(BATCHES, headers={"anthropic-version": "2023-06-01"})
            assert anonymous.status_code == 401
            assert anonymous.json() == {"type": "error", "error": {"type": "authentication_error",
                                                                   "message": "invalid x-api-key"}}  # fmt: skip
            bearer = await bare.get(BATCHES, headers={"authorization": "Bearer k", "anthropic-version": "2023-06-01"})
            assert bearer.status_code == 200
            unversioned = await bare.get(BATCHES, headers={"x-api-key": "k"})
            assert unversioned.status_code == 400 and "anthropic-version" in unversioned.json()["error"]["message"]
        await client.post("/_emulator/faults", json={"method": "GET", "path": BATCHES, "status": 529, "times": 1})
        faulted = await client.get(BATCHES)
        assert faulted.status_code == 529 and faulted.json()["error"]["type"] == "overloaded_error"


async def test_a_batch_other_dialects_made_is_not_an_anthropic_batch(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        other = await client.post("/openai/v1/batches", headers={"authorization": "Bearer k"}, json={})
        assert other.status_code == 400  # (no input file: nothing made) and the list stays Anthropic's own
        assert (await client.get(BATCHES)).json()["data"] == []


# -- the official SDK ------------------------------------------------------------------------


def sdk_round_trip(base_url: str) -> tuple[str, list[str], dict[str, Any], str]:
    """Plain blocking SDK code, as a user would write it."""
    with Anthropic(api_key="any-key", base_url=f"{base_url}/anthropic", max_retries=0) as client:
        created = client.messages.batches.create(
            requests=[{"custom_id": f"q{i}", "params": params(f"question {i}")} for i in range(3)]  # type: ignore[typeddict-item]
        )
        deadline = time.monotonic() + 20
        batch = client.messages.batches.retrieve(created.id)
        while batch.processing_status != "ended":
            assert time.monotonic() < deadline, batch
            time.sleep(0.02)
            batch = client.messages.batches.retrieve(created.id)
        assert batch.request_counts.succeeded == 3 and batch.ended_at is not None
        listed = [b.id for b in client.messages.batches.list(limit=10)]
        results: dict[str, Any] = {r.custom_id: r.result.type for r in client.messages.batches.results(created.id)}
        return created.id, listed, results, str(batch.processing_status)


async def test_the_official_sdk_creates_retrieves_lists_and_reads_results(tmp_path: Path) -> None:
    async with serve_emulator(create_app(tmp_path / "emulator")) as base_url:
        batch_id, listed, results, status = await anyio.to_thread.run_sync(sdk_round_trip, base_url)
    assert status == "ended" and listed == [batch_id]
    assert results == {"q0": "succeeded", "q1": "succeeded", "q2": "succeeded"}


async def test_the_async_sdk_cancels_and_reads_the_canceled_results(tmp_path: Path) -> None:
    async with (
        serve_emulator(create_app(tmp_path / "emulator", timeline=Timeline(cancelling_s=0.0))) as base_url,
        httpx.AsyncClient(base_url=base_url) as control,
        AsyncAnthropic(api_key="any-key", base_url=f"{base_url}/anthropic", max_retries=0) as client,
    ):
        await control.post("/_emulator/pause")
        created = await client.messages.batches.create(
            requests=[{"custom_id": "only", "params": params("wait")}]  # type: ignore[typeddict-item]
        )
        cancelling = await client.messages.batches.cancel(created.id)
        assert cancelling.processing_status == "canceling" and cancelling.cancel_initiated_at is not None
        await control.post("/_emulator/resume")
        with anyio.fail_after(20):
            while (batch := await client.messages.batches.retrieve(created.id)).processing_status != "ended":  # noqa: ASYNC110 - polling is the API
                await anyio.sleep(0.02)
        assert batch.request_counts.canceled == 1
        results = [r async for r in await client.messages.batches.results(created.id)]
        assert [(r.custom_id, r.result.type) for r in results] == [("only", "canceled")]
