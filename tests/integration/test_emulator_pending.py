"""The emulator's `pending_once` trigger, over loopback in each dialect: the first batch that ever
plans the line stays before running (Together's and OpenAI's VALIDATING, Anthropic's in_progress
with nothing processed, Gemini's PENDING) until it is cancelled, also across a restart; the same
line in a later batch runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import httpx
from structlog.testing import capture_logs

from batchd.emulator.triggers import TriggerError, split_trigger
from tests.integration.emulator_helpers import (
    GEMINI,
    GEMINI_KEY,
    OPENAI,
    create_batch,
    download,
    gemini_create,
    gemini_download,
    gemini_line,
    gemini_upload,
    gemini_wait,
    http_emulator,
    openai_create,
    openai_run,
    openai_upload,
    openai_wait,
    parse_jsonl,
    request_line,
    run_batch,
    to_jsonl,
    upload,
    wait_for_batch,
)

HELD = {"pending_once": True}
ANTHROPIC = "/anthropic/v1/messages/batches"
ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


async def held(logs: Sequence[Mapping[str, Any]], batch_id: str) -> None:
    """Until the emulator says it holds the batch (it has no event to await over HTTP)."""
    with anyio.fail_after(10):
        while not any(e["event"] == "emulator.batch.held" and e["batch_id"] == batch_id for e in logs):  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def anthropic_ended(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            batch: dict[str, Any] = (await client.get(f"{ANTHROPIC}/{batch_id}", headers=ANTHROPIC_HEADERS)).json()
            if batch["processing_status"] == "ended":
                return batch
            await anyio.sleep(0.01)


def lines() -> list[dict[str, Any]]:
    return [request_line("a"), request_line("b", trigger=HELD), request_line("c")]


def test_the_trigger_is_a_flag() -> None:
    trigger, body = split_trigger({"model": "m", "batchd_emulator": HELD})
    assert trigger is not None and trigger.pending_once and not trigger.stops_batch
    assert body == {"model": "m"}
    try:
        split_trigger({"batchd_emulator": {"pending_once": "yes"}})
    except TriggerError as exc:
        assert "pending_once must be true or false" in str(exc)
    else:
        raise AssertionError("a non-boolean pending_once was taken")


async def test_together_holds_the_batch_validating_until_cancelled_then_runs_the_line_again(tmp_path: Any) -> None:
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            first = await create_batch(client, await upload(client, to_jsonl(lines())))
            await held(logs, first)
        # A batch created after it runs to its end meanwhile; the held one has not moved.
        done, answered, _ = await run_batch(client, [request_line("other")])
        assert done["status"] == "COMPLETED" and [x["custom_id"] for x in answered] == ["other"]
        waiting = (await client.get(f"/v1/batches/{first}")).json()
        assert waiting["status"] == "VALIDATING" and waiting["progress"] == 0.0
        cancelled = await client.post(f"/v1/batches/{first}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
        ended = await wait_for_batch(client, first)
        assert ended["output_file_id"] is None and ended["error_file_id"] is None  # nothing was answered
        # The same lines again (a follow-up round): they run.
        again, answered, errors = await run_batch(client, lines())
        assert again["status"] == "COMPLETED" and sorted(x["custom_id"] for x in answered) == ["a", "b", "c"]
        assert errors == []


async def test_openai_shows_validating_and_nothing_counted_until_cancelled(tmp_path: Any) -> None:
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            batch = await openai_create(client, await openai_upload(client, to_jsonl(lines())))
            await held(logs, batch["id"])
        waiting = (await client.get(f"{OPENAI}/batches/{batch['id']}")).json()
        assert waiting["status"] == "validating" and waiting["in_progress_at"] is None
        assert waiting["request_counts"]["completed"] == waiting["request_counts"]["failed"] == 0
        assert (await client.post(f"{OPENAI}/batches/{batch['id']}/cancel")).json()["status"] == "cancelling"
        ended = await openai_wait(client, batch["id"])
        assert ended["status"] == "cancelled" and ended["output_file_id"] is None
        assert (await openai_run(client, lines()))["status"] == "completed"


async def test_anthropic_shows_every_request_processing_then_canceled(tmp_path: Any) -> None:
    def params(name: str, **trigger: Any) -> dict[str, Any]:
        return {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": name}], **trigger}

    requests = [
        {"custom_id": "a", "params": params("a")},
        {"custom_id": "b", "params": params("b", batchd_emulator=HELD)},
        {"custom_id": "c", "params": params("c")},
    ]
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            batch = (await client.post(ANTHROPIC, json={"requests": requests}, headers=ANTHROPIC_HEADERS)).json()
            await held(logs, batch["id"])
        waiting = (await client.get(f"{ANTHROPIC}/{batch['id']}", headers=ANTHROPIC_HEADERS)).json()
        assert waiting["processing_status"] == "in_progress"
        assert waiting["request_counts"] == {"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        await client.post(f"{ANTHROPIC}/{batch['id']}/cancel", headers=ANTHROPIC_HEADERS)
        ended = await anthropic_ended(client, batch["id"])
        results = parse_jsonl((await client.get(ended["results_url"], headers=ANTHROPIC_HEADERS)).content)
        assert sorted(line["custom_id"] for line in results) == ["a", "b", "c"]
        assert all(line["result"] == {"type": "canceled"} for line in results)


async def test_gemini_shows_pending_until_cancelled_then_runs_the_line_again(tmp_path: Any) -> None:
    data = to_jsonl([gemini_line("a"), gemini_line("b", trigger=HELD)])
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            source = await gemini_upload(client, data)
            operation = await gemini_create(client, {"fileName": source["name"]})
            await held(logs, operation["name"].removeprefix("batches/"))
        waiting = await gemini_wait(client, operation["name"], until=lambda _: True)
        assert waiting["metadata"]["state"] == "BATCH_STATE_PENDING" and waiting["done"] is False
        cancelled = await client.post(f"{GEMINI}/v1beta/{operation['name']}:cancel", headers=GEMINI_KEY)
        assert cancelled.status_code == 200
        assert (await gemini_wait(client, operation["name"]))["metadata"]["state"] == "BATCH_STATE_CANCELLED"
        source = await gemini_upload(client, data, display_name="again")
        again = await gemini_wait(client, (await gemini_create(client, {"fileName": source["name"]}))["name"])
        assert again["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
        answers = await gemini_download(client, again["metadata"]["output"]["responsesFile"])
        assert sorted(line["key"] for line in answers) == ["a", "b"] and all("response" in x for x in answers)


async def test_a_restart_keeps_the_batch_waiting(tmp_path: Any) -> None:
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            first = await create_batch(client, await upload(client, to_jsonl(lines())))
            await held(logs, first)
    async with http_emulator(tmp_path) as client:
        with capture_logs() as logs:
            # Picked up again after the restart, and held again (the line was seen before).
            await held(logs, first)
        assert (await client.get(f"/v1/batches/{first}")).json()["status"] == "VALIDATING"
        assert (await client.post(f"/v1/batches/{first}/cancel")).json()["status"] == "CANCELLED"
        assert await download(client, None) == []


async def test_a_bad_value_fails_the_batch_at_validation(tmp_path: Any) -> None:
    async with http_emulator(tmp_path) as client:
        job, _, _ = await run_batch(client, [request_line("a", trigger={"pending_once": 1})])
        assert job["status"] == "FAILED" and "pending_once" in job["error"]
