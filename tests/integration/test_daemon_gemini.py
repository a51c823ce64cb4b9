"""The daemon with a Gemini provider (the emulator's `/gemini` dialect over loopback): Gemini's
own batch lines in, the outbox contract out (keyed by `key`), a SUCCEEDED batch's error lines
each deciding, passing errors and an EXPIRED batch resubmitted, a lost create adopted by its
`display_name`, the model from the spec or the provider, and the inputs deleted once ended."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchd.models import JobState
from tests.integration.daemon_rig import Rig, gemini, rig

MODEL = 'model = "gemini-2.5-flash"\n'


async def creates(r: Rig) -> int:
    requests: dict[str, int] = (await r.stats())["requests"]
    return sum(count for route, count in requests.items() if route.endswith(":batchGenerateContent"))


async def remote(r: Rig, name: str) -> dict[str, Any]:
    """A batch as the emulator's Gemini dialect shows it."""
    answer = await r.http.get(f"{r.url}/gemini/v1beta/{name}", headers={"x-goog-api-key": "k"})
    assert answer.status_code == 200, answer.text
    got: dict[str, Any] = answer.json()
    return got


async def file_status(r: Rig, name: str) -> int:
    answer = await r.http.get(f"{r.url}/gemini/v1beta/{name}", headers={"x-goog-api-key": "k"})
    return answer.status_code


async def test_a_file_of_gemini_lines_ends_in_the_outbox_in_input_order(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines=MODEL) as r:
        lines = [
            gemini("a", text="first question"),
            gemini("b", {"fail_once": 503}),  # UNAVAILABLE once: a follow-up round answers it
            gemini("c"),
        ]
        r.drop("flash.jsonl", lines)
        await r.drain()
        job = r.job("flash")
        assert job.state is JobState.COMPLETED and job.round == 1 and job.model == "gemini-2.5-flash"
        out = r.outbox_lines("flash", "output.jsonl")
        assert [line["key"] for line in out] == ["a", "b", "c"]
        assert all("error" not in line and line["response"]["candidates"] for line in out)
        assert "first question" in json.dumps(out[0]["response"]["candidates"][0]["content"])
        assert not (r.settings.outbox_dir / "flash" / "errors.jsonl").exists()
        doc = r.job_json("flash")
        assert doc["request_counts"]["completed"] == 3 and doc["request_counts"]["failed"] == 0
        assert doc["provider"] == "gemini" and doc["endpoint"] == "generateContent"
        assert doc["usage"]["promptTokenCount"] > 0 and doc["usage"]["candidatesTokenCount"] > 0
        assert await creates(r) == 2  # round 0, and one follow-up round
        # The batch was created for the provider's model, named after the job.
        first = await remote(r, doc["remote_batch_ids"][0])
        batch = first.get("metadata", first)
        assert batch["model"] == "models/gemini-2.5-flash"
        assert batch["displayName"] == f"batchd-{job.id}"
        # Both rounds' uploaded inputs were deleted at the provider once their batches ended.
        inputs = [(await remote(r, name))["metadata"]["inputConfig"]["fileName"] for name in doc["remote_batch_ids"]]
        assert len(set(inputs)) == 2
        assert [await file_status(r, name) for name in inputs] == [404, 404]


async def test_a_succeeded_batch_with_error_lines_accounts_for_every_key(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines=MODEL) as r:
        lines = [
            gemini("ok"),
            gemini("refused", {"status": 400}),  # INVALID_ARGUMENT: not passing, stays in errors
            gemini("busy", {"fail_once": 429}),  # RESOURCE_EXHAUSTED once: resubmitted, answered
            gemini("also-ok"),
        ]
        r.drop("mixed.jsonl", lines)
        await r.drain()
        job = r.job("mixed")
        assert job.state is JobState.COMPLETED and job.round == 1
        doc = r.job_json("mixed")
        first = await remote(r, doc["remote_batch_ids"][0])
        assert first["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"  # though it held two error lines
        assert [line["key"] for line in r.outbox_lines("mixed", "output.jsonl")] == ["ok", "busy", "also-ok"]
        (error,) = r.outbox_lines("mixed", "errors.jsonl")
        assert error["key"] == "refused" and error["error"]["status"] == "INVALID_ARGUMENT"
        assert doc["request_counts"] == {**doc["request_counts"], "total": 4, "completed": 3, "failed": 1}
        assert await creates(r) == 2


async def test_an_expired_batch_returns_nothing_and_every_key_goes_to_a_follow_up(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines=MODEL) as r:
        keys = ["a", "b", "c", "d"]
        lines = [gemini("a"), gemini("b"), gemini("c", {"expire_once": True}), gemini("d")]
        r.drop("late.jsonl", lines)
        await r.drain()
        job = r.job("late")
        assert job.state is JobState.COMPLETED and job.round == 1
        doc = r.job_json("late")
        expired = await remote(r, doc["remote_batch_ids"][0])
        assert expired["metadata"]["state"] == "BATCH_STATE_EXPIRED"
        # Nothing came back from the expired batch: all four were sent again, and answered.
        assert [line["key"] for line in r.outbox_lines("late", "output.jsonl")] == keys
        assert doc["request_counts"]["completed"] == 4
        assert await creates(r) == 2


async def test_a_lost_create_is_adopted_by_its_display_name_not_created_twice(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines=MODEL) as r:
        # The batch is created, but the answer is lost (a 503 after acting).
        path = "/gemini/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        await r.control("POST", "faults", json={"method": "POST", "path": path, "status": 503, "act": True})
        r.drop("lost.jsonl", [gemini("a"), gemini("b")])
        await r.drain()
        assert r.job("lost").state is JobState.COMPLETED
        assert await creates(r) == 1
        assert [line["key"] for line in r.outbox_lines("lost", "output.jsonl")] == ["a", "b"]


async def test_a_spec_names_the_model_and_a_file_without_one_is_rejected(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini") as r:  # no provider model
        r.drop("bare.jsonl", [gemini("a")])
        data = r.settings.inbox_dir / "data"
        data.mkdir(parents=True)
        (data / "pro.jsonl").write_text(json.dumps(gemini("p")) + "\n")
        r.drop("pro.json", [{"input": "data/pro.jsonl", "model": "models/gemini-2.5-pro"}])
        await r.drain()
        assert r.job("bare").state is JobState.REJECTED
        report = (r.settings.inbox_dir / "rejected" / "bare.jsonl.errors.txt").read_text()
        assert "model" in report and "spec" in report and "provider" in report
        assert r.job("pro").state is JobState.COMPLETED
        (batch_id,) = r.job_json("pro")["remote_batch_ids"]
        assert (await remote(r, batch_id))["metadata"]["model"] == "models/gemini-2.5-pro"
        assert await creates(r) == 1


async def test_an_openai_format_file_is_rejected_naming_the_format(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines=MODEL) as r:
        openai_line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
        r.drop("wrong.jsonl", [openai_line])
        await r.drain()
        assert r.job("wrong").state is JobState.REJECTED
        report = (r.settings.inbox_dir / "rejected" / "wrong.jsonl.errors.txt").read_text()
        assert "line 1: key:" in report and '{"key", "request"}' in report
        assert await creates(r) == 0
