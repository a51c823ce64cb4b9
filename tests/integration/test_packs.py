"""Packing: small files taken in one go share a remote batch, and each ends as its own job.

The daemon in-process against the emulator over loopback (daemon_rig), on SQLite and PostgreSQL,
in each dialect: the emulator's own records (its batch creates, its stored uploads) witness how
many batches were made and what they held.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.models import Job, JobState
from batchd.request_rules import id_key
from tests.integration.daemon_rig import Rig, chat, gemini, message, rig

pytestmark = pytest.mark.each_database

KINDS = ("together", "openai", "anthropic", "gemini")


def line(kind: str, request_id: str, trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request line in `kind`'s own format, whose answer echoes `request_id`'s text."""
    if kind == "anthropic":
        return message(request_id, trigger)
    if kind == "gemini":
        return gemini(request_id, trigger)
    return chat(request_id, trigger)


def config(kind: str) -> dict[str, str]:
    """The rig options of `kind` that pack files of up to 5 requests."""
    provider = 'model = "gemini-2.5-flash"\n' if kind == "gemini" else ""
    return {"provider_lines": provider, "inbox_lines": "pack_max_requests = 5\n"}


def files_of(r: Rig) -> list[Job]:
    return [j for j in r.store.jobs.select() if not j.is_pack]


def packs_of(r: Rig) -> list[Job]:
    return [j for j in r.store.jobs.select() if j.is_pack]


def answered_ids(r: Rig, name: str, key: str) -> list[str]:
    return [str(a[key]) for a in r.outbox_lines(name, "output.jsonl")]


@pytest.mark.parametrize("kind", KINDS)
async def test_small_files_taken_together_share_one_batch_and_each_gets_its_own_answers(
    tmp_path: Path, kind: str
) -> None:
    async with rig(tmp_path, kind=kind, **config(kind)) as r:
        # The same ids in every file: unique within a file is all a user promises.
        for n in range(3):
            r.drop(f"f{n}.jsonl", [line(kind, "a"), line(kind, "b"), line(kind, f"only-in-{n}")])
        await r.drain()
        stats = await r.stats()
        assert len(stats["batch_creates"]) == 1, "three small files taken at once: one remote batch"
        key = id_key(kind)
        (pack,) = packs_of(r)
        assert pack.pack_members == 3 and pack.state is JobState.COMPLETED
        for n in range(3):
            job = r.job(f"f{n}")
            assert job.state is JobState.COMPLETED and job.pack_id == pack.id
            assert answered_ids(r, f"f{n}", key) == ["a", "b", f"only-in-{n}"]
            doc = r.job_json(f"f{n}")
            assert doc["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
            assert doc["status"] == "completed"
        # Each answer is its own request's: the emulator echoes the request's text.
        text = json.dumps(r.outbox_lines("f2", "output.jsonl")[2])
        assert "only-in-2" in text and "only-in-1" not in text


async def test_a_passing_failure_in_a_pack_goes_to_a_round_of_its_files_own(tmp_path: Path) -> None:
    async with rig(tmp_path, **config("together")) as r:
        r.drop("calm.jsonl", [chat("a"), chat("b")])
        r.drop("busy.jsonl", [chat("a"), chat("b", {"fail_once": 503})])
        await r.drain()
        calm, busy = r.job("calm"), r.job("busy")
        assert calm.state is JobState.COMPLETED and calm.round == 0
        assert busy.state is JobState.COMPLETED and busy.round >= 1
        assert answered_ids(r, "busy", "custom_id") == ["a", "b"]
        assert r.job_json("busy")["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        # Its later rounds were its own batches: the pack's, then one per round of busy's.
        assert len((await r.stats())["batch_creates"]) == 1 + busy.round
        assert len(r.job_json("busy")["remote_batch_ids"]) == 1 + busy.round


async def test_files_that_differ_in_what_a_batch_is_made_of_are_not_packed(tmp_path: Path) -> None:
    async with rig(tmp_path, **config("together")) as r:
        other_model = chat("x")
        other_model["body"]["model"] = "another-model"
        r.drop("one.jsonl", [chat("a")])
        r.drop("two.jsonl", [chat("a")])
        r.drop("other.jsonl", [other_model])
        r.drop("big.jsonl", [chat(f"r{i}") for i in range(6)])  # over pack_max_requests
        await r.drain()
        assert len((await r.stats())["batch_creates"]) == 3
        (pack,) = packs_of(r)
        assert {j.name for j in files_of(r) if j.pack_id == pack.id} == {"one", "two"}
        assert r.job("other").pack_id is None and r.job("big").pack_id is None
        assert all(j.state is JobState.COMPLETED for j in files_of(r))


async def test_a_lone_small_file_is_not_packed(tmp_path: Path) -> None:
    async with rig(tmp_path, **config("together")) as r:
        r.drop("alone.jsonl", [chat("a")])
        await r.drain()
        assert packs_of(r) == []
        assert r.job("alone").state is JobState.COMPLETED


async def test_a_file_failing_for_good_in_a_pack_fails_alone(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="openai", **config("openai")) as r:
        r.drop("good.jsonl", [chat("a")])
        r.drop("bad.jsonl", [chat("a", {"status": 400})])
        await r.drain()
        assert r.job("good").state is JobState.COMPLETED
        bad = r.job("bad")
        # A permanent error is an answer: the job completes, its line in errors.jsonl.
        assert bad.state is JobState.COMPLETED and bad.round == 0
        (error,) = r.outbox_lines("bad", "errors.jsonl")
        assert error["custom_id"] == "a" and error["response"]["status_code"] == 400
        assert r.job_json("bad")["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
