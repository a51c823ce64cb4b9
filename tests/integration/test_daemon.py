"""The daemon in-process against the emulator over loopback: reconciliation, refusals,
outages, cancellation, the list sweep, recovery. Real SQLite and PostgreSQL, real HTTP, real files."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from batchd import claims
from batchd.config import ConfigError, Settings, load_settings
from batchd.daemon import Daemon
from batchd.inbox import job_files_dir
from batchd.models import Job, JobState
from batchd.resubmit import retry_job
from tests.integration.daemon_rig import Rig, chat, eventually, rig

pytestmark = pytest.mark.each_database


async def test_a_create_whose_answer_was_lost_is_adopted_not_repeated(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        # The batch is really created, but the daemon sees a 503.
        await r.control("POST", "faults", json={"method": "POST", "path": "/v1/batches", "status": 503, "act": True})
        r.drop("lost.jsonl", [chat("a"), chat("b")])
        with capture_logs() as logs:
            await r.drain()
        assert r.job("lost").state is JobState.COMPLETED
        assert len((await r.stats())["batch_creates"]) == 1
        assert "job.batch_adopted" in [e["event"] for e in logs]
        (batch,) = r.store.batches.of_job(r.job("lost").id)
        assert batch.create_attempts == 1


async def test_a_refused_create_is_retried_without_reconciling(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.control("POST", "faults", json={"method": "POST", "path": "/v1/batches", "status": 429})
        r.drop("busy.jsonl", [chat("a")])
        with capture_logs() as logs:
            await r.drain()
        assert r.job("busy").state is JobState.COMPLETED
        assert len((await r.stats())["batch_creates"]) == 1
        events = [e["event"] for e in logs]
        assert "job.step_failed" in events and "job.reconcile_none" not in events


async def test_an_upload_refused_for_good_fails_the_job_with_every_request_accounted(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.control("POST", "faults", json={"method": "POST", "path": "/v1/files", "status": 400})
        r.drop("refused.jsonl", [chat("a"), chat("b")])
        await r.drain()
        job = r.job("refused")
        assert job.state is JobState.FAILED and "upload refused" in (job.reason or "")
        errors = r.outbox_lines("refused", "errors.jsonl")
        assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errors] == [
            ("a", "not_submitted", None),
            ("b", "not_submitted", None),
        ]
        meta = json.loads((r.settings.outbox_dir / "refused" / "job.json").read_text())
        assert meta["status"] == "failed" and meta["remote_batch_ids"] == []
        assert (await r.stats())["batch_creates"] == []


async def test_a_provider_outage_backs_off_and_recovers_by_itself(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        fault = {"method": "GET", "path": "/v1/batches/*", "status": 503, "times": 6}
        await r.control("POST", "faults", json=fault)
        r.drop("outage.jsonl", [chat("a")])
        with capture_logs() as logs:
            await r.drain()
        assert r.job("outage").state is JobState.COMPLETED
        waits = [e["wait_s"] for e in logs if e["event"] == "job.step_failed"]
        assert len(waits) == 6
        assert all(0 < w <= 0.1 for w in waits)


async def test_cancel_while_in_flight_keeps_what_was_answered(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.control("POST", "pause")
        r.drop("cancel.jsonl", [chat("a"), chat("b")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(lambda: bool(r.store.jobs.select()) and r.job("cancel").state is JobState.VALIDATING)
            r.store.jobs.request_cancel(r.job("cancel").id)
            r.daemon.wake()
        job = r.job("cancel")
        assert job.state is JobState.CANCELLED
        codes = {e["custom_id"]: e["error"]["code"] for e in r.outbox_lines("cancel", "errors.jsonl")}
        assert codes == {"a": "batch_cancelled", "b": "batch_cancelled"}
        assert r.store.deliveries.select(job_id=job.id) == []  # no endpoint configured, none queued


async def test_cancel_before_submission_never_reaches_the_provider(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.drop("early.jsonl", [chat("a")])
        r.daemon.inbox.ensure_folders()
        job = r.daemon.inbox.take(r.settings.inbox_dir / "early.jsonl")
        assert job is not None
        r.store.jobs.request_cancel(job.id)
        await r.drain()
        assert r.job("early").state is JobState.CANCELLED
        assert (await r.stats())["requests"].get("POST /v1/files", 0) == 0


async def test_many_jobs_in_flight_are_polled_with_one_list_call(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.control("POST", "pause")
        for i in range(4):
            r.drop(f"many-{i}.jsonl", [chat(f"x{i}")])
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.drain)
            await eventually(
                lambda: len(jobs := r.store.jobs.select()) == 4 and all(j.state is JobState.VALIDATING for j in jobs)
            )
            # A round started while fewer were in flight asks for its batches one by one, rightly. The
            # window opens once a sweep has been asked for since and no round is running: ticks run one
            # after another, so a tick that read before all four were in flight has decided by then,
            # and its rounds are over.
            swept = (await r.stats())["requests"].get("GET /v1/batches", 0)
            with anyio.fail_after(20):
                while (  # noqa: ASYNC110 - no event per poll
                    (await r.stats())["requests"].get("GET /v1/batches", 0) <= swept
                    or r.daemon.busy
                    or r.daemon.sweeping
                ):
                    await anyio.sleep(0.02)
            before = (await r.stats())["requests"]
            # ...and closes once every job has been polled again (each poll moves its next check).
            checks = {j.id: j.next_check_at for j in r.store.jobs.select()}
            await eventually(lambda: all(j.next_check_at != checks[j.id] for j in r.store.jobs.select()))
            after = (await r.stats())["requests"]
            await r.control("POST", "resume")
        sweeps = after.get("GET /v1/batches", 0) - before.get("GET /v1/batches", 0)
        singles = sum(v for k, v in after.items() if k.startswith("GET /v1/batches/")) - sum(
            v for k, v in before.items() if k.startswith("GET /v1/batches/")
        )
        assert sweeps >= 1 and singles == 0
        assert all(j.state is JobState.COMPLETED for j in r.store.jobs.select())


async def test_a_claim_without_a_job_row_is_taken_again_at_start(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        # Claimed by this daemon's earlier incarnation (same host and state directory), which
        # crashed before recording the job: the state lock proves it gone.
        host = socket.gethostname()
        earlier = "e" * 32
        r.store.cluster.register(earlier, host=host, pid=1, home=f"{host}:{r.settings.state_dir}")
        r.daemon.inbox.ensure_folders()
        claim = r.daemon.inbox.claimed_root / ("c" * 32)
        claim.mkdir(parents=True)
        claims.write_marker(claim, earlier, time.time())
        (claim / "crashed.jsonl").write_text(json.dumps(chat("z")) + "\n", encoding="utf-8")
        await r.drain()
        job = r.job("crashed")
        assert job.id == "c" * 32 and job.state is JobState.COMPLETED
        assert [e["custom_id"] for e in r.outbox_lines("crashed", "output.jsonl")] == ["z"]


async def test_a_claim_folder_of_an_older_release_is_taken_once_older_than_the_lease(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.daemon.inbox.ensure_folders()
        old, fresh = r.daemon.inbox.claimed_root / ("a" * 32), r.daemon.inbox.claimed_root / ("b" * 32)
        for claim, name in ((old, "old"), (fresh, "fresh")):
            claim.mkdir(parents=True)
            (claim / f"{name}.jsonl").write_text(json.dumps(chat(name)) + "\n", encoding="utf-8")
        then = time.time() - 2 * r.settings.cluster.lease_s
        os.utime(old, (then, then))
        await r.drain()
        assert r.job("old").state is JobState.COMPLETED
        # No marker and younger than a lease: perhaps another daemon's take in progress.
        assert [j.name for j in r.store.jobs.select()] == ["old"]
        assert (fresh / "fresh.jsonl").exists()


async def test_reload_with_a_broken_config_keeps_the_old_one(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        old = r.daemon.settings

        def broken() -> Settings:
            raise ConfigError("unknown key polling.fast")

        r.daemon._reload = broken
        with capture_logs() as logs:
            await r.daemon._reload_settings()
        assert r.daemon.settings is old
        assert next(e for e in logs if e["event"] == "daemon.reload_refused")["error"] == "unknown key polling.fast"


async def test_a_download_cut_off_halfway_is_resumed_and_the_outbox_is_whole(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        sent = [chat(f"req-{i:03d}") for i in range(40)]
        fault = {"method": "GET", "path": "/v1/files/*/content", "truncate_at": 1500}
        await r.control("POST", "faults", json=fault)
        r.drop("cut.jsonl", sent)
        with capture_logs() as logs:
            await r.drain()
        assert r.job("cut").state is JobState.COMPLETED
        out = r.outbox_lines("cut", "output.jsonl")
        assert [line["custom_id"] for line in out] == [x["custom_id"] for x in sent]
        assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in out[:2]] == [
            "echo: req-000",
            "echo: req-001",
        ]
        # The cut was noticed and the rest fetched with a Range request, not the whole file again.
        assert any(e["event"] == "job.step_failed" and "received 1500 bytes" in e["error"] for e in logs)
        requests = (await r.stats())["requests"]
        assert sum(v for k, v in requests.items() if k.endswith("/content")) == 2


async def test_a_new_file_is_submitted_without_waiting_for_a_scheduler_read(tmp_path: Path) -> None:
    # Intake hands a job it has just recorded straight to its first step: even while every
    # read of the due index hangs (a slow disk, a huge backlog), a new file reaches its provider.
    async with rig(tmp_path) as r:
        reads = r.store.jobs.due
        stuck = threading.Event()

        def hanging(owner: str, until: float, *, limit: int, skip: Collection[str] = ()) -> list[Job]:
            stuck.wait()
            return reads(owner, until, limit=limit, skip=skip)

        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            await eventually(lambda: r.daemon.ready.is_set())
            r.store.jobs.due = hanging  # type: ignore[method-assign]
            try:
                r.drop("fast.jsonl", [chat("a"), chat("b")])
                await eventually(lambda: created(r, "fast"))
                assert len((await r.stats())["batch_creates"]) == 1
            finally:
                stuck.set()
                r.daemon.stop()


def created(r: Rig, name: str) -> bool:
    """The job of `name` exists and its batch is created at the provider."""
    found = [j for j in r.store.jobs.select() if j.name == name]
    return bool(found) and any(b.remote_id is not None for b in r.store.batches.of_job(found[0].id))


async def test_an_ended_jobs_working_copies_go_and_what_retry_reads_stays(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        # A passing failure: a follow-up round, whose input batchd writes beside the inbox.
        r.drop("kept.jsonl", [chat("a"), chat("b", {"fail_once": 503})])
        r.drop("again.jsonl", [chat("c", {"status": 400})])
        with capture_logs() as logs:
            await r.drain()
        job = r.job("kept")
        assert job.state is JobState.COMPLETED and job.round == 1
        assert "job.downloaded" in [e["event"] for e in logs]  # there was something to drop
        # The outbox holds every answer; batchd's own copies of them and of the rounds are gone.
        assert [line["custom_id"] for line in r.outbox_lines("kept", "output.jsonl")] == ["a", "b"]
        assert not (r.settings.state_dir / "work" / job.id).exists()
        assert not job_files_dir(r.settings, job.id).exists()
        # What a retry reads stays: the file as submitted (and the outbox).
        assert job.upload_path is not None and job.claimed_path is not None
        assert await anyio.Path(job.upload_path).is_file() and await anyio.Path(job.claimed_path).is_file()
        retried = retry_job(r.store, r.settings, r.job("again"))
        # The retried job runs in a daemon of its own (a drained daemon is not run again).
        await Daemon(r.settings, store=r.store, provider=r.provider).run(once=True, timeout=30)
        ended = r.store.jobs.get(retried.id)
        assert ended is not None and ended.state.terminal and ended.upload_path is not None
        # A retried job's requests live beside the inbox: its copy stays for the next retry, alone.
        left = [p.name for p in job_files_dir(r.settings, retried.id).iterdir()]
        assert left == [Path(ended.upload_path).name]
        assert retry_job(r.store, r.settings, ended).request_count == 1


async def test_a_reload_waiting_for_a_locked_database_holds_nothing_else_up(tmp_path: Path) -> None:
    # The reload drops a provider, so it asks the database whether jobs still use it; the
    # database is locked by another process meanwhile (here: the read waits until released).
    claude = '[providers.claude]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:1"\n'
    async with rig(tmp_path, config_lines=claude) as r:
        config = tmp_path / "reloaded.toml"
        config.write_text((tmp_path / "batchd.toml").read_text().replace(claude, ""), encoding="utf-8")
        new = load_settings(config, environ={"TOGETHER_API_KEY": "k"})
        assert set(r.daemon.settings.provider_names) - set(new.provider_names) == {"claude"}
        r.daemon._reload = lambda: new
        in_use = r.store.jobs.provider_names_in_use
        locked = threading.Event()

        def waiting() -> set[str]:
            locked.wait()
            return in_use()

        r.store.jobs.provider_names_in_use = waiting  # type: ignore[method-assign]
        # Should the loop block, the lock still ends (and the assertion below says so).
        unlock = threading.Timer(15, locked.set)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.daemon.run)
            await eventually(lambda: r.daemon.ready.is_set())
            unlock.start()
            try:
                with capture_logs() as logs:
                    tg.start_soon(r.daemon._reload_settings)
                    r.drop("meanwhile.jsonl", [chat("a")])
                    await eventually(lambda: created(r, "meanwhile"))
                    assert not locked.is_set(), "the file went out while the reload waited for the database"
                    locked.set()
                    # Released: no job uses the dropped provider, so the reload goes through.
                    await eventually(lambda: "daemon.reloaded" in [e["event"] for e in logs])
            finally:
                locked.set()
                unlock.cancel()
                r.daemon.stop()
