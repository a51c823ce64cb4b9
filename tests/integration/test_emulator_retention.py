"""The emulator's file deletes and expiring results, in every dialect that has them: a deleted
file leaves the dialect's listing and its content answers 404; an input a running batch still
reads is not deleted; `/_emulator/expire_results` makes a finished batch's results answer 404
while the batch itself stays; the official SDKs delete through the same routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
from anthropic import Anthropic
from openai import OpenAI

from tests.integration.emulator_helpers import (
    GEMINI,
    GEMINI_KEY,
    OPENAI,
    HoldEngine,
    asgi_emulator,
    create_batch,
    gemini_create,
    gemini_line,
    gemini_upload,
    gemini_wait,
    http_emulator,
    openai_run,
    request_line,
    run_batch,
    to_jsonl,
    upload,
    wait_for_batch,
)
from tests.integration.test_emulator_anthropic import BATCHES, HEADERS, emulator, ended, request


async def listed(client: httpx.AsyncClient, path: str, key: str = "data", **options: Any) -> set[str]:
    answer = await client.get(path, **options)
    assert answer.status_code == 200, answer.text
    return {item["id"] if "id" in item else item["name"] for item in answer.json()[key]}


async def expire(client: httpx.AsyncClient, batch_id: str) -> list[str]:
    answer = await client.post("/_emulator/expire_results", json={"batch_id": batch_id})
    assert answer.status_code == 200, answer.text
    expired: list[str] = answer.json()["expired"]
    return expired


async def test_together_deletes_a_file_which_then_leaves_the_listing(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        job, _, _ = await run_batch(client, [request_line("a"), request_line("b")])
        files = {job["input_file_id"], job["output_file_id"]}
        assert files <= await listed(client, "/v1/files")
        for file_id in files:
            answer = await client.delete(f"/v1/files/{file_id}")
            assert answer.status_code == 200 and answer.json() == {"id": file_id, "object": "file", "deleted": True}
        assert not files & await listed(client, "/v1/files")
        assert (await client.get(f"/v1/files/{job['output_file_id']}/content")).status_code == 404
        # Deleting again: the file is not found (a client counts that as deleted).
        again = await client.delete(f"/v1/files/{job['input_file_id']}")
        assert again.status_code == 404 and again.json()["error"]["code"] == "file_not_found"


async def test_the_input_of_a_batch_still_running_is_not_deleted(tmp_path: Path) -> None:
    engine = HoldEngine()
    async with asgi_emulator(tmp_path, engine=engine) as client:
        file_id = await upload(client, to_jsonl([request_line("a", "hold")]))
        batch_id = await create_batch(client, file_id)
        await wait_for_batch(client, batch_id, ["IN_PROGRESS"])
        refused = await client.delete(f"/v1/files/{file_id}")
        assert refused.status_code == 400 and batch_id in refused.json()["error"]["message"]
        refused = await client.delete(f"{OPENAI}/files/{file_id}")
        assert refused.status_code == 400 and batch_id in refused.json()["error"]["message"]
        engine.release.set()
        assert (await wait_for_batch(client, batch_id))["status"] == "COMPLETED"
        assert (await client.delete(f"/v1/files/{file_id}")).status_code == 200


async def test_openai_deletes_through_the_sdk_and_lists_what_is_left(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        batch = await openai_run(client, [request_line("a"), request_line("b", trigger={"status": 400})])
        ids = [batch["input_file_id"], batch["output_file_id"], batch["error_file_id"]]
        sdk = OpenAI(api_key="k", base_url=f"{client.base_url}{OPENAI}", max_retries=0)

        def delete_all() -> list[Any]:
            return [sdk.files.delete(file_id) for file_id in ids]

        answers = await anyio.to_thread.run_sync(delete_all)
        assert [(a.id, a.deleted) for a in answers] == [(i, True) for i in ids]
        assert not set(ids) & await listed(client, f"{OPENAI}/files")
        for file_id in ids:
            assert (await client.get(f"{OPENAI}/files/{file_id}/content")).status_code == 404


async def test_anthropic_deletes_an_ended_batch_and_its_results_with_it(tmp_path: Path) -> None:
    engine = HoldEngine()
    async with emulator(tmp_path, engine=engine) as (url, client):
        created = (await client.post(BATCHES, json={"requests": [request("a", "hold"), request("b")]})).json()
        refused = await client.delete(f"{BATCHES}/{created['id']}")
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
        engine.release.set()
        await ended(client, created["id"])
        sdk = Anthropic(api_key="k", base_url=f"{url}/anthropic", max_retries=0)
        deleted = await anyio.to_thread.run_sync(lambda: sdk.messages.batches.delete(created["id"]))
        assert (deleted.id, deleted.type) == (created["id"], "message_batch_deleted")
        assert (await client.get(f"{BATCHES}/{created['id']}")).status_code == 404
        assert (await client.get(f"{BATCHES}/{created['id']}/results")).status_code == 404
        assert (await client.get(BATCHES)).json()["data"] == []
        # Its request lines and results went with it.
        assert (await client.get("/v1/files", headers={"Authorization": "Bearer k"})).json()["data"] == []


async def test_expired_results_answer_404_in_every_dialect_while_the_batch_stays(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path / "together") as client:
        job, _, _ = await run_batch(client, [request_line("a")])
        assert await expire(client, job["id"]) == [job["output_file_id"]]
        assert (await client.get(f"/v1/files/{job['output_file_id']}/content")).status_code == 404
        assert (await client.get(f"/v1/batches/{job['id']}")).json()["output_file_id"] == job["output_file_id"]
        assert (await client.post("/_emulator/expire_results", json={"batch_id": "nope"})).status_code == 404

    async with asgi_emulator(tmp_path / "openai") as client:
        batch = await openai_run(client, [request_line("a"), request_line("b", trigger={"status": 400})])
        assert sorted(await expire(client, batch["id"])) == sorted([batch["output_file_id"], batch["error_file_id"]])
        assert (await client.get(f"{OPENAI}/files/{batch['error_file_id']}/content")).status_code == 404

    async with asgi_emulator(tmp_path / "gemini") as client:
        stored = await gemini_upload(client, to_jsonl([gemini_line("k1")]))
        created = await gemini_create(client, {"fileName": stored["name"]})
        done = await gemini_wait(client, created["name"])
        responses = done["metadata"]["output"]["responsesFile"]
        assert await expire(client, created["name"]) == [responses.removeprefix("files/")]
        gone = await client.get(f"{GEMINI}/download/v1beta/{responses}:download?alt=media", headers=GEMINI_KEY)
        assert gone.status_code == 404

    async with emulator(tmp_path / "anthropic") as (_, client):
        created = (await client.post(BATCHES, json={"requests": [request("a")]})).json()
        finished = await ended(client, created["id"])
        still = await client.post("/_emulator/expire_results", json={"batch_id": created["id"]}, headers=HEADERS)
        assert still.status_code == 200 and still.json()["expired"]
        gone = await client.get(finished["results_url"])
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
        assert (await client.get(f"{BATCHES}/{created['id']}")).status_code == 200


async def test_results_cannot_expire_before_the_batch_ends(tmp_path: Path) -> None:
    engine = HoldEngine()
    async with asgi_emulator(tmp_path, engine=engine) as client:
        batch_id = await create_batch(client, await upload(client, to_jsonl([request_line("a", "hold")])))
        early = await client.post("/_emulator/expire_results", json={"batch_id": batch_id})
        assert early.status_code == 409
        engine.release.set()
        await wait_for_batch(client, batch_id)
