"""The daemon with an Anthropic provider (the emulator's `/anthropic` dialect over loopback):
Anthropic's own request lines in, the outbox contract out, passing errors and expired
requests resubmitted, and a lost create reconciled by request count, or parked when it cannot
be told apart."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from batchd.models import JobState, RemoteBatch
from tests.integration.daemon_rig import Rig, eventually, message, rig

CREATE = "POST /anthropic/v1/messages/batches"


async def creates(r: Rig) -> int:
    return int((await r.stats())["requests"].get(CREATE, 0))


async def test_a_file_of_anthropic_lines_ends_in_the_outbox_in_input_order(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="anthropic") as r:
        lines = [
            message("a", text="first question"),
            message("b", {"fail_once": 529}),  # overloaded once: a follow-up round answers it
            message("c", {"expire_once": True}),  # the batch expires here once: c and d are resubmitted
            message("d"),
        ]
        r.drop("claude.jsonl", lines)
        await r.drain()
        job = r.job("claude")
        assert job.state is JobState.COMPLETED and job.round == 1
        out = r.outbox_lines("claude", "output.jsonl")
        assert [line["custom_id"] for line in out] == ["a", "b", "c", "d"]
        assert all(line["result"]["type"] == "succeeded" for line in out)
        assert out[0]["result"]["message"]["content"] == [{"type": "text", "text": "echo: first question"}]
        assert not (r.settings.outbox_dir / "claude" / "errors.jsonl").exists()
        doc = r.job_json("claude")
        assert doc["request_counts"]["completed"] == 4 and doc["request_counts"]["failed"] == 0
        assert doc["usage"]["input_tokens"] > 0 and "cache_read_input_tokens" in doc["usage"]
        assert await creates(r) == 2  # round 0, and one follow-up round


async def test_errored_and_unanswerable_requests_end_in_errors_verbatim(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="anthropic") as r:
        r.drop("mixed.jsonl", [message("ok"), message("refused", {"status": 400})])
        await r.drain()
        assert r.job("mixed").state is JobState.COMPLETED
        (error,) = r.outbox_lines("mixed", "errors.jsonl")
        assert error["custom_id"] == "refused" and error["result"]["type"] == "errored"
        assert error["result"]["error"]["error"]["type"] == "invalid_request_error"
        assert await creates(r) == 1  # a refusal is not passing: no follow-up round


async def test_an_openai_format_file_is_rejected_naming_the_format(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="anthropic") as r:
        openai_line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
        r.drop("wrong.jsonl", [openai_line])
        await r.drain()
        assert r.job("wrong").state is JobState.REJECTED
        report = (r.settings.inbox_dir / "rejected" / "wrong.jsonl.errors.txt").read_text()
        assert "line 1: params:" in report and '{"custom_id", "params"}' in report
        assert await creates(r) == 0


async def test_a_lost_create_is_adopted_by_request_count_not_created_twice(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="anthropic") as r:
        # The batch is created, but the answer is lost (a 529 after acting).
        await r.control("POST", "faults", json={"method": "POST", "path": "/anthropic/v1/messages/batches",
                                                "status": 529, "act": True})  # fmt: skip
        r.drop("lost.jsonl", [message("a"), message("b")])
        await r.drain()
        assert r.job("lost").state is JobState.COMPLETED
        assert await creates(r) == 1
        assert [line["custom_id"] for line in r.outbox_lines("lost", "output.jsonl")] == ["a", "b"]


async def test_an_ambiguous_lost_create_parks_the_job_until_an_operator_decides(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="anthropic") as r:
        await r.control("POST", "pause")
        # A batch of the same size that no job of this daemon made (another tool, a colleague).
        stranger = await r.http.post(
            f"{r.url}/anthropic/v1/messages/batches",
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
            json={"requests": [message("x"), message("y")]},
        )
        stranger_id = stranger.json()["id"]
        await r.control("POST", "faults", json={"method": "POST", "path": "/anthropic/v1/messages/batches",
                                                "status": 529, "act": True})  # fmt: skip
        r.drop("twin.jsonl", [message("a"), message("b")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            await eventually(lambda: any(j.name == "twin" and j.parked_at for j in r.store.jobs.select()))
            job = r.job("twin")
            assert job.parked_reason is not None and stranger_id in job.parked_reason
            assert f"batchd resume {job.id}" in job.parked_reason
            assert await creates(r) == 2  # the stranger's and the lost one: never a third
            # The operator cancels the stranger's batch at the provider and resumes the job.
            cancel = await r.http.post(
                f"{r.url}/anthropic/v1/messages/batches/{stranger_id}/cancel",
                headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
            )
            assert cancel.status_code == 200
            await r.control("POST", "resume")
            r.store.jobs.resume(job.id)
            await eventually(lambda: r.job("twin").state is JobState.COMPLETED)
            r.daemon.stop()
        assert await creates(r) == 2
        assert [line["custom_id"] for line in r.outbox_lines("twin", "output.jsonl")] == ["a", "b"]


def test_the_request_count_of_a_listed_batch_sums_every_count() -> None:
    from batchd.providers.anthropic import parse_batch, request_total

    counts = {"processing": 1, "succeeded": 2, "errored": 3, "canceled": 4, "expired": 5}
    batch: RemoteBatch = parse_batch({"id": "msgbatch_1", "processing_status": "in_progress", "request_counts": counts})
    assert request_total(batch) == 15
    assert batch.request_counts is not None and batch.request_counts["failed"] == 12
    assert json.dumps(batch.raw)  # the wire object kept for the client


async def test_a_file_over_the_limits_is_split_and_merged_back_in_input_order(tmp_path: Path) -> None:
    # Anthropic's limit is 100,000 requests a batch; lowered here so that 5 requests make 3 batches.
    async with rig(tmp_path, kind="anthropic", provider_lines="max_batch_requests = 2\n") as r:
        names = [f"q{i}" for i in range(5)]
        r.drop("big.jsonl", [message(name) for name in names])
        await r.drain()
        assert r.job("big").state is JobState.COMPLETED
        assert await creates(r) == 3
        assert [line["custom_id"] for line in r.outbox_lines("big", "output.jsonl")] == names
        assert len(r.job_json("big")["remote_batch_ids"]) == 3


async def test_a_retry_goes_to_the_provider_the_job_went_to(tmp_path: Path) -> None:
    from dataclasses import replace

    from sqlalchemy import update

    from batchd.config import ProviderSettings, Secret
    from batchd.resubmit import retry_job
    from batchd.store.schema import jobs

    async with rig(tmp_path, kind="anthropic") as r:
        r.drop("once.jsonl", [message("ok"), message("refused", {"status": 400})])
        await r.drain()
        job = r.job("once")
        # As if it had gone to [providers.claude] of a config whose default is Together.
        with r.store.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job.id).values(provider_name="claude"))
        together = ProviderSettings(kind="together", base_url="http://127.0.0.1:1", api_key=Secret("k"))
        providers = {"default": together, "claude": r.settings.provider}
        settings = replace(r.settings, provider=together, providers=providers)
        retried = retry_job(r.store, settings, r.job("once"))
        assert (retried.provider, retried.provider_name) == ("anthropic", "claude")
        assert retried.request_count == 1


async def test_a_create_sent_again_never_reads_a_shard_swapped_for_a_symlink(tmp_path: Path) -> None:
    # Creates are refused with a 503 (outcome unknown): each next try reads the shard again, for
    # the inline body. Meanwhile a neighbour puts a symlink in its place.
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"custom_id": "stolen", "params": {}}\n')
    async with rig(tmp_path, kind="anthropic") as r:
        fault = {"method": "POST", "path": "/anthropic/v1/messages/batches", "status": 503, "times": 100000}
        await r.control("POST", "faults", json=fault)
        r.drop("planted.jsonl", [message("a")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            await eventually(lambda: any(j.name == "planted" and j.attempts >= 1 for j in r.store.jobs.select()))
            upload = anyio.Path(r.job("planted").upload_path or "")
            await upload.unlink()
            await upload.symlink_to(secret)
            # The next try refuses to read what batchd did not make, and says so.
            await eventually(lambda: "does not follow what it did not make" in (r.job("planted").last_error or ""))
            r.daemon.stop()
        assert (await r.stats())["batch_creates"] == []


async def test_requests_that_expired_unrun_through_every_round_end_the_job_expired(tmp_path: Path) -> None:
    # Anthropic writes an `expired` result for each request its batch's 24 hours left unrun: no
    # answer. With no follow-up round left, the job ends `expired` (DESIGN §2), not `completed`.
    async with rig(tmp_path, kind="anthropic", provider_lines="[resubmit]\nmax_rounds = 0\n") as r:
        r.drop("late.jsonl", [message("a"), message("b", {"expire_once": True}), message("c")])
        await r.drain()
        assert r.job("late").state is JobState.EXPIRED
        assert [line["custom_id"] for line in r.outbox_lines("late", "output.jsonl")] == ["a"]
        errors = r.outbox_lines("late", "errors.jsonl")
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("b", "batch_expired"),
            ("c", "batch_expired"),
        ]
        assert r.job_json("late")["unanswered"] == 2
