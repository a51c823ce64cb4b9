"""Provider webhooks as poll hints, end to end: the daemon polls every few minutes, the emulator
announces each batch's end with a signed webhook to the daemon's `/hooks/NAME` (real loopback
HTTP both ways), and the results are in the outbox within seconds of the end, polled with one get
per batch; a badly signed event polls nothing; a hinted job does not wait for a sweep under way."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.health import serve_metrics
from batchd.models import JobState, RemoteBatch
from tests.integration.daemon_rig import Rig, chat, eventually, gemini, rig

pytestmark = pytest.mark.each_database

SECRET = "whsec_" + base64.b64encode(b"daemon-hooks-provider-secret-32b").decode()
WRONG = "whsec_" + base64.b64encode(b"daemon-hooks-not-the-secret-32by").decode()
#: Polling as slow as a real deployment's: no poll falls due while a test runs.
SLOW = (300.0, 600.0)
HOOKED = f'webhook_secret = "{SECRET}"\n'
LISTEN = '[metrics]\nlisten = "127.0.0.1:0"\n'
MODEL = 'model = "gemini-2.5-flash"\n'
#: What "within about a second" is allowed on a loaded 2-core CI machine: far below any poll interval.
BOUND_S = 5.0


@asynccontextmanager
async def listener(r: Rig) -> AsyncIterator[str]:
    """The daemon's [metrics] listener with the provider webhooks, wired as `batchd run` wires it."""
    wake = functools.partial(r.daemon.wake, news=True)
    async with serve_metrics(
        r.settings.metrics.address, r.daemon.monitor, r.store, lambda: r.daemon.settings, wake=wake
    ) as url:
        assert url is not None
        yield url


def bound_and_waiting(r: Rig, names: list[str]) -> bool:
    """Every job is in flight with its batch created, its first poll minutes away."""
    jobs = {j.name: j for j in r.store.jobs.select()}
    if set(names) - set(jobs):
        return False
    return all(
        jobs[n].state is JobState.VALIDATING and all(b.remote_id for b in r.store.batches.of_job(jobs[n].id))
        for n in names
    )


def remote_ids(r: Rig, name: str) -> list[str]:
    return [b.remote_id for b in r.store.batches.of_job(r.job(name).id) if b.remote_id is not None]


async def test_openai_batches_that_end_are_in_the_outbox_within_seconds_while_polling_is_minutes(
    tmp_path: Path,
) -> None:
    names = ["a", "b", "c"]  # three in flight: were a poll due, the daemon would sweep with a list call
    async with rig(tmp_path, kind="openai", polling=SLOW, provider_lines=HOOKED, config_lines=LISTEN) as r:
        async with listener(r) as url, anyio.create_task_group() as tg:
            target = {"dialect": "openai", "url": f"{url}/hooks/default", "secret": SECRET}
            await r.control("POST", "provider-webhooks", json=target)
            await r.control("POST", "pause")  # every batch waits, validating, once created
            for name in names:
                r.drop(f"{name}.jsonl", [chat(name)])
            tg.start_soon(r.drain)
            await eventually(lambda: bound_and_waiting(r, names))
            assert all((r.job(n).next_check_at or 0) > time.time() + SLOW[0] / 2 for n in names)
            await r.control("POST", "resume")
            ended = time.time()  # the echo engine ends each batch as soon as it may go on
            await eventually(
                lambda: all((r.settings.outbox_dir / n / "job.json").is_file() for n in names), BOUND_S * 2
            )
            took = time.time() - ended
        assert took < BOUND_S, f"{took:.2f} s from the batches' end to their job.json"
        assert all(r.job(n).state is JobState.COMPLETED for n in names)
        assert [r.outbox_lines(n, "output.jsonl")[0]["custom_id"] for n in names] == names
        stats = await r.stats()
        assert stats["provider_webhooks"] == {"events": 3, "answers": {"200": 3}}
        requests = stats["requests"]
        # One get per batch, the hinted one; no list sweep.
        assert all(requests.get(f"GET /openai/v1/batches/{b}") == 1 for n in names for b in remote_ids(r, n))
        assert requests.get("GET /openai/v1/batches", 0) == 0


async def test_a_gemini_batch_that_ends_is_in_the_outbox_within_seconds_while_polling_is_minutes(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, kind="gemini", polling=SLOW, provider_lines=MODEL + HOOKED, config_lines=LISTEN) as r:
        async with listener(r) as url, anyio.create_task_group() as tg:
            target = {"dialect": "gemini", "url": f"{url}/hooks/default", "secret": SECRET}
            await r.control("POST", "provider-webhooks", json=target)
            await r.control("POST", "pause")
            r.drop("g.jsonl", [gemini("k1"), gemini("k2")])
            tg.start_soon(r.drain)
            await eventually(lambda: bound_and_waiting(r, ["g"]))
            await r.control("POST", "resume")
            ended = time.time()
            await eventually(lambda: (r.settings.outbox_dir / "g" / "job.json").is_file(), BOUND_S * 2)
            took = time.time() - ended
        assert took < BOUND_S, f"{took:.2f} s from the batch's end to its job.json"
        assert r.job("g").state is JobState.COMPLETED
        assert [line["key"] for line in r.outbox_lines("g", "output.jsonl")] == ["k1", "k2"]
        stats = await r.stats()
        assert stats["provider_webhooks"] == {"events": 1, "answers": {"200": 1}}
        (batch,) = remote_ids(r, "g")
        assert batch.startswith("batches/")
        assert stats["requests"].get(f"GET /gemini/v1beta/{batch}") == 1  # the hinted get, and no list
        assert stats["requests"].get("GET /gemini/v1beta/batches", 0) == 0


async def test_a_badly_signed_event_for_a_finished_batch_polls_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path, kind="openai", polling=SLOW, provider_lines=HOOKED, config_lines=LISTEN) as r:
        async with listener(r) as url, anyio.create_task_group() as tg:
            target = {"dialect": "openai", "url": f"{url}/hooks/default", "secret": WRONG}
            await r.control("POST", "provider-webhooks", json=target)
            await r.control("POST", "pause")
            r.drop("x.jsonl", [chat("x")])
            tg.start_soon(r.daemon.run)
            await eventually(lambda: bound_and_waiting(r, ["x"]))
            before = r.job("x")
            await r.control("POST", "resume")
            # The batch ends, its event is sent and refused: the emulator has the daemon's 401.
            with anyio.fail_after(10):
                while (await r.stats())["provider_webhooks"]["answers"] != {"401": 1}:  # noqa: ASYNC110 - the emulator offers no event per answer
                    await anyio.sleep(0.02)
            (batch,) = remote_ids(r, "x")
            finished: RemoteBatch = await r.provider.get_batch(batch)
            assert finished.status.value == "completed"
            after = r.job("x")
            r.daemon.stop()
        assert (after.state, after.next_check_at, after.due_at, after.hinted_at) == (
            before.state, before.next_check_at, before.due_at, None,
        )  # fmt: skip
        assert not (r.settings.outbox_dir / "x").exists()
        requests: dict[str, Any] = (await r.stats())["requests"]
        assert requests.get(f"GET /openai/v1/batches/{batch}") == 1  # the test's own get: none by the daemon


async def test_a_hinted_job_is_polled_at_once_while_a_sweep_is_held_up(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    async with rig(tmp_path, kind="openai", provider_lines=HOOKED, config_lines=LISTEN) as r:
        await r.control("POST", "pause")
        listed, release = r.hold_up_listing()
        async with listener(r) as url, anyio.create_task_group() as tg:
            await r.control(
                "POST", "provider-webhooks", json={"dialect": "openai", "url": f"{url}/hooks/default", "secret": SECRET}
            )
            tg.start_soon(r.daemon.run)
            for name in names:
                r.drop(f"{name}.jsonl", [chat(name)])
            with anyio.fail_after(20):
                await listed.wait()  # a sweep is under way, held up in its list call: polls wait for it
            await eventually(lambda: bound_and_waiting(r, names))
            await r.control("POST", "resume")
            # Each batch ends and is announced: its job is polled by a get of its own and finished,
            # while the sweep still waits for its list.
            await eventually(
                lambda: all((r.settings.outbox_dir / n / "job.json").is_file() for n in names), BOUND_S * 2
            )
            assert not release.is_set() and r.daemon.sweeping
            release.set()
            r.daemon.stop()
        assert all(r.job(n).state is JobState.COMPLETED for n in names)
