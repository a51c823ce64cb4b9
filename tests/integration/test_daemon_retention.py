"""The daemon's `delete_files` against the emulator over loopback, as the emulator's own file
listings show it ("inputs" by default: the inputs gone, the results kept; "all": everything gone
and the outbox whole; "none": everything kept), a refused delete that holds nothing up, and
results that expired at the provider before the daemon downloaded them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from batchd.models import JobState
from tests.integration.daemon_rig import Rig, chat, eventually, gemini, message, rig

pytestmark = pytest.mark.each_database

BEARER = {"Authorization": "Bearer k"}
ANTHROPIC = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


async def listed(r: Rig, path: str, key: str = "data", **headers: str) -> set[str]:
    """The ids (Gemini: names) of the files a dialect's listing shows."""
    answer = await r.http.get(f"{r.url}{path}", headers=headers or BEARER)
    assert answer.status_code == 200, answer.text
    return {item.get("id") or item["name"] for item in answer.json().get(key, [])}


def batch_record(r: Rig, name: str, index: int = 0) -> dict[str, Any]:
    """The job's remote batch as job.json describes it (rounds flattened, in order)."""
    batches = [b for rnd in r.job_json(name)["rounds"] for b in rnd["batches"]]
    found: dict[str, Any] = batches[index]
    return found


async def test_by_default_the_inputs_go_and_the_results_stay(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.drop("plain.jsonl", [chat("a"), chat("b", {"status": 400})])
        await r.drain()
        (row,) = r.store.batches.of_job(r.job("plain").id)
        assert r.job("plain").state is JobState.COMPLETED
        files = await listed(r, "/v1/files")
        assert row.input_file_id not in files
        assert row.output_file_id in files and row.error_file_id in files
        doc = r.job_json("plain")
        assert doc["delete_files"] == "inputs"
        record = batch_record(r, "plain")
        assert record["provider_files"] == {"input": "deleted", "output": "downloaded", "errors": "downloaded"}
        assert record["results_expire_at"] is not None


async def test_all_deletes_every_file_once_job_json_holds_every_round(tmp_path: Path) -> None:
    async with rig(tmp_path, provider_lines='delete_files = "all"\n') as r:
        # "busy" fails once with a 503: a follow-up round answers it, and the merge of that round
        # needs the first round's results again (downloaded once, kept by the daemon).
        r.drop("every.jsonl", [chat("a"), chat("busy", {"fail_once": 503}), chat("bad", {"status": 400})])
        await r.drain()
        job = r.job("every")
        assert job.state is JobState.COMPLETED and job.round == 1
        assert [line["custom_id"] for line in r.outbox_lines("every", "output.jsonl")] == ["a", "busy"]
        assert [line["custom_id"] for line in r.outbox_lines("every", "errors.jsonl")] == ["bad"]
        # Nothing of the job's is left at the provider: inputs and results of both rounds.
        assert await listed(r, "/v1/files") == set()
        rows = r.store.batches.of_job(job.id)
        assert len(rows) == 2 and all(row.output_file_id for row in rows)
        assert [dict(row.provider_files or {}) for row in rows] == [
            {"input": "deleted", "output": "deleted", "errors": "deleted"},
            {"input": "deleted", "output": "deleted"},
        ]
        # Each file was fetched once: the second round's merge read the first round's from disk.
        requests = (await r.stats())["requests"]
        assert all(requests[f"GET /v1/files/{row.output_file_id}/content"] == 1 for row in rows)
        assert r.job_json("every")["delete_files"] == "all"


async def test_none_keeps_every_file(tmp_path: Path) -> None:
    async with rig(tmp_path, provider_lines='delete_files = "none"\n') as r:
        r.drop("kept.jsonl", [chat("a")])
        await r.drain()
        (row,) = r.store.batches.of_job(r.job("kept").id)
        assert {row.input_file_id, row.output_file_id} <= await listed(r, "/v1/files")
        assert batch_record(r, "kept")["provider_files"] == {"output": "downloaded"}
        assert not (await r.stats())["requests"].keys() & {f"DELETE /v1/files/{row.input_file_id}"}


async def test_all_through_the_openai_dialect(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="openai", provider_lines='delete_files = "all"\n') as r:
        r.drop("oa.jsonl", [chat("a"), chat("b", {"status": 400})])
        await r.drain()
        assert r.job("oa").state is JobState.COMPLETED
        assert [line["custom_id"] for line in r.outbox_lines("oa", "output.jsonl")] == ["a"]
        assert await listed(r, "/openai/v1/files") == set()


async def test_all_through_the_gemini_dialect(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="gemini", provider_lines='model = "gemini-2.5-flash"\ndelete_files = "all"\n') as r:
        r.drop("gm.jsonl", [gemini("a"), gemini("b")])
        await r.drain()
        assert r.job("gm").state is JobState.COMPLETED
        assert [line["key"] for line in r.outbox_lines("gm", "output.jsonl")] == ["a", "b"]
        assert await listed(r, "/gemini/v1beta/files", "files", **{"x-goog-api-key": "k"}) == set()


async def test_anthropic_keeps_its_batch_by_default_and_all_deletes_it(tmp_path: Path) -> None:
    for policy in ("inputs", "all"):
        (tmp_path / policy).mkdir()
        async with rig(tmp_path / policy, kind="anthropic", provider_lines=f'delete_files = "{policy}"\n') as r:
            r.drop("msgs.jsonl", [message("a"), message("b")])
            await r.drain()
            assert r.job("msgs").state is JobState.COMPLETED
            assert [line["custom_id"] for line in r.outbox_lines("msgs", "output.jsonl")] == ["a", "b"]
            (batch_id,) = r.job_json("msgs")["remote_batch_ids"]
            shown = await r.http.get(f"{r.url}/anthropic/v1/messages/batches/{batch_id}", headers=ANTHROPIC)
            if policy == "inputs":
                # No files to delete (the requests went inline): the batch and its results stay.
                assert shown.status_code == 200
                assert batch_record(r, "msgs")["provider_files"] == {"output": "downloaded"}
            else:
                assert shown.status_code == 404
                row = r.store.batches.of_job(r.job("msgs").id)[0]
                assert row.provider_files == {"output": "downloaded", "batch": "deleted"}


async def test_a_refused_delete_is_logged_once_and_holds_nothing_up(tmp_path: Path) -> None:
    async with rig(tmp_path, provider_lines='delete_files = "all"\n') as r:
        await r.control("POST", "faults", json={"method": "DELETE", "path": "/v1/files/*", "status": 403})
        r.drop("refused.jsonl", [chat("a")])
        with capture_logs() as logs:
            await r.drain()
        assert r.job("refused").state is JobState.COMPLETED
        (row,) = r.store.batches.of_job(r.job("refused").id)
        # The first delete (the input) was refused; the output's went ahead.
        assert row.provider_files == {"input": "refused", "output": "deleted"}
        assert await listed(r, "/v1/files") == {row.input_file_id}
        refusals = [e for e in logs if e["event"] == "job.file_not_deleted"]
        assert len(refusals) == 1 and refusals[0]["status"] == 403 and refusals[0]["file_id"] == row.input_file_id
        assert not [e for e in logs if e["event"] in ("job.step_failed", "job.step_crashed")]


async def test_results_that_expired_while_nobody_looked_end_the_job_saying_so(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        # The daemon cannot see the batch end (as if it were down) until its results have expired.
        blind = {"method": "GET", "path": "/v1/batches/*", "status": 503, "times": 10**6}
        await r.control("POST", "faults", json=blind)
        r.drop("late.jsonl", [chat("a"), chat("b")])
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(r.drain)
                await eventually(lambda: any(b.remote_id for rows in r.store.batches.by_job().values() for b in rows))
                (row,) = r.store.batches.of_job(r.job("late").id)
                # Seen ended through the OpenAI dialect (the same batch), which the fault leaves alone.
                path = f"{r.url}/openai/v1/batches/{row.remote_id}"
                with anyio.fail_after(20):
                    while (await r.http.get(path, headers=BEARER)).json()["status"] != "completed":  # noqa: ASYNC110 - over HTTP
                        await anyio.sleep(0.02)
                await r.control("POST", "expire_results", json={"batch_id": row.remote_id})
                await r.control("DELETE", "faults")
        job = r.job("late")
        assert job.state is JobState.FAILED
        errors = r.outbox_lines("late", "errors.jsonl")
        assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in errors] == [
            ("a", None, "results_expired"),
            ("b", None, "results_expired"),
        ]
        assert r.outbox_lines("late", "output.jsonl") == []
        doc = r.job_json("late")
        assert row.remote_id in doc["reason"] and "expired at the provider" in doc["reason"]
        assert doc["reason"].startswith("2 of 2 requests unanswered (results_expired)")
        assert doc["request_counts"] == {"total": 2, "completed": 0, "failed": 2} and doc["unanswered"] == 2
        assert batch_record(r, "late")["provider_files"] == {"input": "deleted", "output": "expired"}
        (expired,) = [e for e in logs if e["event"] == "job.results_expired"]
        assert expired["remote_batch_id"] == row.remote_id
        # Asked for once: a vanished file is never asked for again, and never resubmitted.
        stats = await r.stats()
        (ended,) = r.store.batches.of_job(job.id)
        assert stats["requests"][f"GET /v1/files/{ended.output_file_id}/content"] == 1
        assert len(stats["batch_creates"]) == 1


async def test_a_failing_download_never_waits_past_its_results_expiry(tmp_path: Path) -> None:
    # The emulator's clock runs 30 days less 10 minutes behind: the batch ends "30 days ago", so
    # its results (Together's assumed 30 days) expire in 10 minutes of the daemon's time.
    def clock() -> datetime:
        return datetime.now(UTC) - timedelta(days=30) + timedelta(minutes=10)

    async with rig(tmp_path, emulator={"clock": clock}) as r:
        # The provider asks the download to come back in an hour.
        fault = {"method": "GET", "path": "/v1/files/*/content", "status": 503, "retry_after": 3600}
        await r.control("POST", "faults", json=fault)
        r.drop("soon.jsonl", [chat("a")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            await eventually(lambda: any(j.attempts and j.state is JobState.DOWNLOADING for j in r.store.jobs.select()))
            r.daemon.stop()
        job = r.job("soon")
        (row,) = r.store.batches.of_job(job.id)
        assert row.results_expire_at is not None and job.next_check_at is not None
        left = row.results_expire_at - time.time()
        assert 500 < left <= 600
        # Not in an hour: within half of the time the results have left.
        assert job.next_check_at < row.results_expire_at
        assert job.next_check_at - time.time() <= left / 2 + 1
