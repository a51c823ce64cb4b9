"""Packing: small files taken in one go share a remote batch, and each ends as its own job.

The daemon in-process against the emulator over loopback (daemon_rig), on SQLite and PostgreSQL,
in each dialect: the emulator's own records (its batch creates, its stored uploads) witness how
many batches were made and what they held.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from batchd.crashpoints import RAISE_ENV, RAISE_WHILE_ENV
from batchd.daemon import Daemon
from batchd.inbox import job_files_dir
from batchd.models import Job, JobState
from batchd.request_rules import id_key
from batchd.resubmit import NothingToRetry, retry_job
from tests.integration.daemon_rig import Rig, chat, eventually, gemini, message, rig
from tests.integration.test_admission import job_tokens

pytestmark = pytest.mark.each_database

KINDS = ("together", "openai", "anthropic", "gemini")


def line(kind: str, request_id: str, trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request line in `kind`'s own format, whose answer echoes `request_id`'s text."""
    if kind == "anthropic":
        return message(request_id, trigger)
    if kind == "gemini":
        return gemini(request_id, trigger)
    return chat(request_id, trigger)


def packing(tmp_path: Path, kind: str = "together", provider_lines: str = "") -> AbstractAsyncContextManager[Rig]:
    """A rig of `kind` that packs files of up to 5 requests (`provider_lines`: more of [provider])."""
    provider = 'model = "gemini-2.5-flash"\n' if kind == "gemini" else ""
    return rig(tmp_path, kind=kind, provider_lines=provider + provider_lines, inbox_lines="pack_max_requests = 5\n")


def take(r: Rig, files: dict[str, list[dict[str, Any]]]) -> list[Job]:
    """Take `files` in one go, as intake takes a burst: written beside the inbox (the running
    daemon's intake does not see them there) and claimed from there."""
    staging = r.settings.inbox_dir.parent / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (staging / name).write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    r.daemon.inbox.ensure_folders()
    return r.daemon.inbox.take_many([staging / name for name in files])


def files_of(r: Rig) -> list[Job]:
    return r.store.jobs.select()


def packs_of(r: Rig) -> list[Job]:
    return [j for j in r.store.jobs.select(packs=True) if j.is_pack]


@asynccontextmanager
async def held_in_flight(r: Rig, files: dict[str, list[dict[str, Any]]]) -> AsyncIterator[anyio.abc.TaskGroup]:
    """The daemon drains while the paused emulator holds the batch of `files` (dropped together,
    packed): the block runs once they are all `validating`, and the drain goes on after it."""
    await r.control("POST", "pause")
    for name, lines in files.items():
        r.drop(name, lines)
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.drain)
        await eventually(
            lambda: len(files_of(r)) == len(files) and {j.state for j in files_of(r)} == {JobState.VALIDATING}
        )
        yield tg


async def cancels_sent(r: Rig) -> int:
    """Cancels of a batch the emulator received (`POST /v1/batches/{id}/cancel`)."""
    requests = (await r.stats())["requests"]
    return sum(n for call, n in requests.items() if call.startswith("POST /v1/batches/") and call.endswith("/cancel"))


def answered_ids(r: Rig, name: str, key: str) -> list[str]:
    return [str(a[key]) for a in r.outbox_lines(name, "output.jsonl")]


@pytest.mark.parametrize("kind", KINDS)
async def test_small_files_taken_together_share_one_batch_and_each_gets_its_own_answers(
    tmp_path: Path, kind: str
) -> None:
    async with packing(tmp_path, kind) as r:
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
    async with packing(tmp_path) as r:
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
        # Ended: neither the pack's downloads, its copy and the files' shares of its answers, nor
        # busy's own later rounds are kept beside the outboxes.
        (pack,) = packs_of(r)
        assert [j.id for j in (pack, calm, busy) if (r.settings.state_dir / "work" / j.id).exists()] == []
        assert [j.id for j in (pack, calm, busy) if job_files_dir(r.settings, j.id).exists()] == []


async def test_files_that_differ_in_what_a_batch_is_made_of_are_not_packed(tmp_path: Path) -> None:
    async with packing(tmp_path) as r:
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
    async with packing(tmp_path) as r:
        r.drop("alone.jsonl", [chat("a")])
        await r.drain()
        assert packs_of(r) == []
        assert r.job("alone").state is JobState.COMPLETED


async def test_a_file_failing_for_good_in_a_pack_fails_alone(tmp_path: Path) -> None:
    async with packing(tmp_path, "openai") as r:
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


async def test_one_files_cancel_leaves_the_shared_batch_running_for_the_others(tmp_path: Path) -> None:
    async with packing(tmp_path) as r:
        async with held_in_flight(r, {"mine.jsonl": [chat("a")], "theirs.jsonl": [chat("a"), chat("b")]}):
            r.store.jobs.request_cancel(r.job("mine").id)
            r.daemon.wake()
            await anyio.sleep(0.3)  # several polls: a cancel of the batch would have gone out by now
            assert await cancels_sent(r) == 0
            (pack,) = packs_of(r)
            assert not pack.cancel_requested
            await r.control("POST", "resume")
        # Its requests were answered (the batch ran for the other file): they are its answers.
        assert r.job("mine").state is JobState.COMPLETED
        assert answered_ids(r, "mine", "custom_id") == ["a"]
        assert r.job("theirs").state is JobState.COMPLETED
        assert answered_ids(r, "theirs", "custom_id") == ["a", "b"]


async def test_when_every_file_of_a_pack_cancels_its_batch_is_cancelled(tmp_path: Path) -> None:
    async with packing(tmp_path) as r:
        async with held_in_flight(r, {"one.jsonl": [chat("a")], "two.jsonl": [chat("a"), chat("b")]}):
            r.store.jobs.request_cancel(r.job("one").id)
            r.store.jobs.request_cancel(r.job("two").id)
            r.daemon.wake()
        for name, ids in (("one", ["a"]), ("two", ["a", "b"])):
            assert r.job(name).state is JobState.CANCELLED
            codes = [(e["custom_id"], e["error"]["code"]) for e in r.outbox_lines(name, "errors.jsonl")]
            assert codes == [(i, "batch_cancelled") for i in ids]
            assert r.job_json(name)["status"] == "cancelled"
        (pack,) = packs_of(r)
        assert pack.state is JobState.CANCELLED
        assert await cancels_sent(r) == 1


async def test_files_in_a_pack_show_its_state_and_are_never_claimed_alone(tmp_path: Path) -> None:
    async with (
        packing(tmp_path) as r,
        held_in_flight(r, {"one.jsonl": [chat("a")], "two.jsonl": [chat("b")]}) as tg,
    ):
        (pack,) = packs_of(r)
        assert pack.state is JobState.VALIDATING
        assert {j.state for j in files_of(r)} == {JobState.VALIDATING}
        # Nothing of a file in a pack is ever due: its pack is.
        assert [j.due_at for j in files_of(r)] == [None, None]
        # Another daemon finding them without an owner takes the pack, never a file alone.
        r.store.cluster.release(r.daemon.id)
        taken = r.store.cluster.claim("other-daemon", 30.0, limit=10)
        assert set(taken) == {pack.id}
        await r.control("POST", "resume")
        tg.cancel_scope.cancel()


async def test_files_in_a_queued_pack_wait_visibly_and_the_pack_holds_one_batch_of_room(tmp_path: Path) -> None:
    async with packing(tmp_path, provider_lines="max_batches_in_flight = 1\n") as r:
        await r.control("POST", "pause")
        take(r, {"first.jsonl": [chat("a")]})
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(lambda: r.job("first").state is JobState.VALIDATING)
            take(r, {"p1.jsonl": [chat("a")], "p2.jsonl": [chat("b")]})
            r.daemon.wake()
            await eventually(lambda: r.job("p1").state is JobState.QUEUED)
            for name in ("p1", "p2"):
                assert "max_batches_in_flight = 1" in (r.job(name).wait_reason or "")
            await r.control("POST", "resume")
        assert {j.state for j in files_of(r)} == {JobState.COMPLETED}
        assert len((await r.stats())["batch_creates"]) == 2


async def test_a_pack_in_flight_holds_its_files_tokens_once(tmp_path: Path) -> None:
    each = job_tokens([chat("a")])
    # Room for the pack of three files and one more file: not if the files counted beside their pack.
    async with packing(tmp_path, provider_lines=f"max_enqueued_tokens = {4 * each}\n") as r:
        await r.control("POST", "pause")
        take(r, {f"p{i}.jsonl": [chat("a")] for i in range(3)})
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(lambda: {j.state for j in files_of(r)} == {JobState.VALIDATING})
            take(r, {"later.jsonl": [chat("a")]})
            r.daemon.wake()
            await eventually(lambda: r.job("later").state is JobState.VALIDATING)
            await r.control("POST", "resume")
        assert {j.state for j in files_of(r)} == {JobState.COMPLETED}


async def test_a_file_of_a_pack_is_retried_alone_and_the_pack_itself_is_not(tmp_path: Path) -> None:
    async with packing(tmp_path, "openai") as r:
        r.drop("good.jsonl", [chat("a")])
        r.drop("mixed.jsonl", [chat("a"), chat("b", {"status": 400})])
        await r.drain()
        (pack,) = packs_of(r)
        with pytest.raises(NothingToRetry, match="pack of 2 files"):
            retry_job(r.store, r.settings, pack)
        # Its own failed request, from its own upload copy: its own id, not the pack's.
        retried = retry_job(r.store, r.settings, r.job("mixed"))
        assert retried.pack_id is None and retried.request_count == 1
        lines = (await anyio.Path(retried.upload_path or "").read_text(encoding="utf-8")).splitlines()
        assert [json.loads(x)["custom_id"] for x in lines] == ["b"]


async def test_a_parked_pack_shows_on_its_files_and_resuming_one_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switch = tmp_path / "bug-is-on"
    switch.write_text("on")
    monkeypatch.setenv(RAISE_ENV, "after_pack_split")
    monkeypatch.setenv(RAISE_WHILE_ENV, str(switch))
    async with packing(tmp_path) as r:
        r.drop("one.jsonl", [chat("a")])
        r.drop("two.jsonl", [chat("b")])
        result = await r.daemon.run(once=True, timeout=30)
        assert not result.drained  # the pack waits for an operator
        (pack,) = packs_of(r)
        assert pack.parked_at is not None
        for name in ("one", "two"):
            job = r.job(name)
            assert job.parked_at is not None and "injected bug at after_pack_split" in (job.parked_reason or "")
        # The bug is fixed; the operator resumes one of the files: its pack goes on, and both end.
        switch.unlink()
        r.store.jobs.resume(r.job("one").id)
        assert packs_of(r)[0].parked_at is None
        assert all(r.job(name).parked_at is None for name in ("one", "two"))
        again = Daemon(r.settings, store=r.store, provider=r.provider)
        assert (await again.run(once=True, timeout=30)).drained
        assert {r.job(name).state for name in ("one", "two")} == {JobState.COMPLETED}
        assert answered_ids(r, "two", "custom_id") == ["b"]
