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

from batchd.tokens import output_tokens, prompt_tokens
from tests.acceptance.conftest import chat, harness


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
