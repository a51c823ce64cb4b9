"""No single error ends the daemon (DESIGN §10): a bug in one job's step parks that job, visibly,
while the daemon goes on taking new work; a stored failure count past any exponent restarts
cleanly; an operator resumes a parked job. The real `batchd run`, as a subprocess."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from batchd.crashpoints import RAISE_ENV, RAISE_WHILE_ENV
from batchd.daemon.failures import PARK_AFTER
from batchd.store import Store
from batchd.store.schema import jobs as jobs_table
from tests.acceptance.conftest import Harness, chat, eventually, harness

pytestmark = pytest.mark.each_database


def job_records(h: Harness, out: str) -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in json.loads(out)}


def outbox_done(h: Harness, name: str) -> bool:
    return (h.ws.outbox / name / "job.json").is_file()


async def test_a_bug_in_one_jobs_step_parks_that_job_and_the_daemon_goes_on(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        switch = tmp_path / "bug-is-on"
        switch.write_text("on")
        with h.ws.config.open("a", encoding="utf-8") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        daemon = h.start(env={RAISE_ENV: "after_download", RAISE_WHILE_ENV: str(switch)})
        await daemon.until_logged("daemon.ready")
        h.ws.drop("buggy.jsonl", [chat("a"), chat("b")])
        await daemon.until_logged("job.parked", timeout=60)

        crashes = daemon.logs_named("job.step_crashed")
        assert [c["unexpected_failures"] for c in crashes] == list(range(1, PARK_AFTER + 1))
        assert "injected bug at after_download" in daemon.log_path.read_text()  # logged with its traceback
        assert daemon.proc.poll() is None
        (listening,) = daemon.logs_named("metrics.listening")
        async with httpx.AsyncClient() as http:
            exposed = (await http.get(str(listening["metrics"]))).text
        counted = {
            f"{family.name}{sample.labels}": sample.value
            for family in text_string_to_metric_families(exposed)
            for sample in family.samples
        }
        assert counted["batchd_unexpected_errors{'where': 'step'}"] == PARK_AFTER
        assert counted["batchd_jobs_parked{}"] == 1
        listed = await h.ws.batchd("jobs", "--json")
        buggy = job_records(h, listed.stdout)["buggy"]
        assert buggy["parked"] is True and "injected bug" in str(buggy["parked_reason"])
        table = await h.ws.batchd("jobs")
        assert "parked" in table.stdout
        shown = await h.ws.batchd("show", "buggy")
        assert "batchd resume" in shown.stdout and not outbox_done(h, "buggy")

        # The "bug" is fixed: new work goes through at once; the parked job waits for an operator.
        switch.unlink()
        h.ws.drop("fine.jsonl", [chat("c")])
        await eventually(lambda: outbox_done(h, "fine"), 60)
        assert not outbox_done(h, "buggy")
        resumed = await h.ws.batchd("resume", "buggy")
        assert resumed.returncode == 0, resumed.stderr
        await eventually(lambda: outbox_done(h, "buggy"), 60)
        finished = json.loads((h.ws.outbox / "buggy" / "job.json").read_text(encoding="utf-8"))
        assert finished["status"] == "completed" and finished["request_counts"]["completed"] == 2
        again = await h.ws.batchd("resume", "buggy")
        assert again.returncode == 1 and "not parked" in again.stderr

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0


async def test_a_stored_failure_count_past_any_exponent_does_not_crash_the_daemon(tmp_path: Path) -> None:
    # attempts are stored: a backoff of min * 2 ** attempts that overflowed at 1024 killed every restart.
    async with harness(tmp_path) as h:
        env = {RAISE_ENV: "after_download"}
        first = h.start(env=env)
        await first.until_logged("daemon.ready")
        h.ws.drop("old.jsonl", [chat("a")])
        await first.until_logged("job.step_crashed", timeout=60)
        first.signal(signal.SIGTERM)
        assert await first.wait(timeout=15) == 0
        store = Store(h.ws.database_url)
        try:
            with store.engine.begin() as conn:
                conn.execute(update(jobs_table).values(attempts=5000, next_check_at=0.0))
        finally:
            store.close()

        second = h.start(env=env)
        await eventually(lambda: len(second.logs_named("job.step_crashed")) >= 2, 60)
        assert second.proc.poll() is None
        # job.step_crashed is logged just before the failure is written: wait for the write itself
        # (read at once, a loaded machine showed the first crash's 5001).
        store = Store(h.ws.database_url)
        try:

            def second_crash_recorded() -> bool:
                (job,) = store.jobs.select()
                return job.attempts >= 5002 and job.next_check_at is not None

            await eventually(second_crash_recorded, 30, "the second crash recorded")
        finally:
            store.close()
        assert second.proc.poll() is None
        second.signal(signal.SIGTERM)
        assert await second.wait(timeout=15) == 0


async def test_run_once_stops_when_only_parked_jobs_are_left(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.ws.drop("buggy.jsonl", [chat("a")])
        daemon = h.start("--once", "--timeout", "120", env={RAISE_ENV: "after_download"})
        assert await daemon.wait(timeout=120) == 1
        (left,) = daemon.logs_named("daemon.parked_jobs_left")
        assert len(left["jobs"]) == 1
