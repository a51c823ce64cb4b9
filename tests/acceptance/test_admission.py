"""Admission control (#18) with a subprocess daemon: a token budget smaller than three jobs runs
five to the end, never more than the budget in flight, and the waiting ones show as `queued`,
with the reason, in `batchd jobs`, `batchd show` and on the status page."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx

from batchd import crashpoints
from batchd.tokens import output_tokens, prompt_tokens
from tests.acceptance.conftest import chat, harness, use_openai


def asking(custom_id: str) -> dict[str, Any]:
    line = chat(custom_id, text=f"{custom_id}: what is the weather like, in a few words?")
    line["body"]["max_tokens"] = 50
    return line


async def test_a_token_budget_smaller_than_three_jobs_runs_five_never_over_it(tmp_path: Path) -> None:
    files = {f"job-{i}": [asking(f"j{i}-a"), asking(f"j{i}-b")] for i in range(5)}
    each = sum(prompt_tokens(line["body"]) + output_tokens(line["body"]) for line in files["job-0"])
    budget = each * 5 // 2
    async with harness(tmp_path) as h:
        # The emulator's own queue holds the same: had batchd sent more, it would have refused.
        await h.emulator.control("POST", "queue", json={"max_enqueued_tokens": budget})
        await h.emulator.control("POST", "pause")
        h.ws.env["BATCHD_PROVIDER_MAX_ENQUEUED_TOKENS"] = str(budget)
        h.ws.env["BATCHD_METRICS_LISTEN"] = '"127.0.0.1:0"'
        daemon = h.start()
        await daemon.until_logged("metrics.listening")
        (listening,) = daemon.logs_named("metrics.listening")
        for name, lines in files.items():
            h.ws.drop(f"{name}.jsonl", lines)

        records: list[dict[str, Any]] = []

        async def three_queued() -> bool:
            done = await h.ws.batchd("jobs", "--json")
            records[:] = json.loads(done.stdout)
            return [r["status"] for r in records].count("queued") == 3

        with anyio.fail_after(30):
            while not await three_queued():  # noqa: ASYNC110 - `batchd jobs` is what a user watches
                await anyio.sleep(0.1)
        queued = [r for r in records if r["status"] == "queued"]
        assert all(r["wait_reason"] for r in queued)
        assert any("tokens of its model are enqueued" in r["wait_reason"] for r in queued)
        assert all(r["wait_reason"] is None for r in records if r["status"] != "queued")

        table = await h.ws.batchd("jobs")
        rows = table.stdout.splitlines()
        assert [line.split()[2] for line in rows[1:] if not line.startswith(" ")].count("queued") == 3
        assert sum(line.strip().startswith("waits: ") for line in rows) == 3
        shown = await h.ws.batchd("show", queued[0]["id"])
        assert f"waits      {queued[0]['wait_reason']}" in shown.stdout
        async with httpx.AsyncClient() as http:
            page = await http.get(f"{listening['url']}/jobs/{queued[0]['id']}")
            listing = await http.get(f"{listening['url']}/", params={"state": "queued"})
        assert page.status_code == 200 and "Waits" in page.text
        assert listing.text.count('class="badge s-queued"') == 3

        await h.emulator.control("POST", "resume")
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 5, timeout=60)
        assert sorted(e["type"] for e in h.receiver.verified()) == ["batch.completed"] * 5
        queue = await h.emulator.control("GET", "queue")
        assert queue["refused"] == 0 and queue["enqueued_tokens"] == 0
        for name in files:
            output = (h.ws.outbox / name / "output.jsonl").read_text().splitlines()
            assert [json.loads(line)["custom_id"] for line in output] == [x["custom_id"] for x in files[name]]
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0


async def test_killed_just_after_letting_a_job_in_the_restart_runs_it_once(tmp_path: Path) -> None:
    # One batch in flight at a time: the second job is let in once the first ends, and the daemon
    # is killed right after that admission commits (before its round is planned).
    async with harness(tmp_path) as h:
        h.ws.env["BATCHD_PROVIDER_MAX_BATCHES_IN_FLIGHT"] = "1"
        files = {name: [asking(f"{name}-a"), asking(f"{name}-b")] for name in ("one", "two", "three")}
        for name, lines in files.items():
            h.ws.drop(f"{name}.jsonl", lines)
        first = h.start(env={crashpoints.ENV: "after_admitted@2"})
        assert await first.wait(timeout=60) == -9
        second = h.start()
        # At least once: an event the killed daemon sent but did not record as sent comes again.
        await h.receiver.wait_for(lambda _: len({e["data"]["id"] for e in h.receiver.verified()}) >= 3, timeout=60)
        assert {e["data"]["name"]: e["type"] for e in h.receiver.verified()} == dict.fromkeys(files, "batch.completed")
        assert len(await h.emulator.creates()) == 3  # one batch per job: the admission was not repeated remotely
        for name, lines in files.items():
            output = (h.ws.outbox / name / "output.jsonl").read_text().splitlines()
            assert [json.loads(line)["custom_id"] for line in output] == [x["custom_id"] for x in lines]
        second.signal(signal.SIGTERM)
        assert await second.wait() == 0


async def test_killed_after_openai_failed_a_batch_for_a_full_queue_the_restart_waits_and_creates_it_anew(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        use_openai(h)
        one, two = [asking("one-a"), asking("one-b")], [asking("two-a"), asking("two-b")]
        each = sum(prompt_tokens(line["body"]) + output_tokens(line["body"]) for line in one)
        # The account's queue holds one of these jobs; batchd is told no limit, and learns.
        await h.emulator.control("POST", "queue", json={"max_enqueued_tokens": each + each // 2})
        await h.emulator.control("POST", "pause")
        h.ws.drop("one.jsonl", one)
        first = h.start(env={crashpoints.ENV: "after_create_answer@2"})
        await first.until_logged("job.batch_created")
        h.ws.drop("two.jsonl", two)
        # Two's create is answered (OpenAI: accepted, then failed unrun), and the daemon dies
        # before it records anything of it.
        assert await first.wait(timeout=60) == -9
        second = h.start()
        await second.until_logged("job.provider_queue_full")
        done = await h.ws.batchd("jobs", "--json")
        states = {r["name"]: (r["status"], r["wait_reason"]) for r in json.loads(done.stdout)}
        # It waits: for the provider's queue, or (having learned what that queue holds) for tokens.
        assert states["two"][0] == "queued" and ("queue was full" in states["two"][1] or "tokens" in states["two"][1])
        await h.emulator.control("POST", "resume")
        await h.receiver.wait_for(lambda _: len({e["data"]["id"] for e in h.receiver.verified()}) >= 2, timeout=60)
        events = {e["data"]["name"]: e for e in h.receiver.verified()}
        assert {name: e["type"] for name, e in events.items()} == {"one": "batch.completed", "two": "batch.completed"}
        # Two's failed batch was adopted (not created again blind) and its shard created once more.
        assert len(events["two"]["data"]["remote_batch_ids"]) == 2
        assert len(await h.emulator.creates()) == 3
        output = (h.ws.outbox / "two" / "output.jsonl").read_text().splitlines()
        assert [json.loads(line)["custom_id"] for line in output] == ["two-a", "two-b"]
        second.signal(signal.SIGTERM)
        assert await second.wait() == 0
