"""Several providers behind one inbox (DESIGN §6): a subprocess daemon with Together as
[provider] and Anthropic as [providers.claude], both served by the emulator; specs pick one by
name, a plain file goes to the default; every job ends with its outbox and its webhook, each at
the right provider. Unknown names are rejected with a report; a reload that drops a provider
with jobs in flight is refused."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.acceptance.conftest import chat, harness, message, read_jsonl


def add_claude(config: Path, emulator_url: str) -> None:
    config.write_text(
        config.read_text() + f'\n[providers.claude]\nkind = "anthropic"\nbase_url = "{emulator_url}/anthropic"\n',
        encoding="utf-8",
    )


async def test_two_providers_behind_one_inbox_each_job_at_its_own(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        add_claude(h.ws.config, h.emulator.url)
        h.ws.env["ANTHROPIC_API_KEY"] = "acceptance-key"
        data = h.ws.inbox / "data"
        data.mkdir(parents=True)
        (data / "together.jsonl").write_text("".join(json.dumps(chat(f"t{i}")) + "\n" for i in range(3)))
        (data / "claude.jsonl").write_text("".join(json.dumps(message(f"c{i}")) + "\n" for i in range(2)))
        h.ws.drop("plain.jsonl", [chat("p0")])
        h.ws.drop("to-claude.json", json.dumps({"input": "data/claude.jsonl", "provider": "claude"}).encode())
        h.ws.drop("to-default.json", json.dumps({"input": "data/together.jsonl", "provider": "default"}).encode())
        h.ws.drop("to-nowhere.json", json.dumps({"input": "data/together.jsonl", "provider": "gemini"}).encode())
        daemon = h.start()
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 4)
        events = {e["data"]["name"]: e for e in h.receiver.verified()}
        assert set(events) == {"plain", "to-claude", "to-default", "to-nowhere"}

        expected = {"plain": ("together", "default"), "to-default": ("together", "default"),
                    "to-claude": ("anthropic", "claude")}  # fmt: skip
        for name, (kind, provider_name) in expected.items():
            data_of = events[name]["data"]
            assert events[name]["type"] == "batch.completed", name
            assert (data_of["provider"], data_of["provider_name"]) == (kind, provider_name)
            doc = json.loads((h.ws.outbox / name / "job.json").read_text())
            assert (doc["provider"], doc["provider_name"]) == (kind, provider_name)
        claude_out = read_jsonl(h.ws.outbox / "to-claude" / "output.jsonl")
        assert [line["custom_id"] for line in claude_out] == ["c0", "c1"]
        assert all(line["result"]["type"] == "succeeded" for line in claude_out)
        assert [line["custom_id"] for line in read_jsonl(h.ws.outbox / "to-default" / "output.jsonl")] == [
            "t0", "t1", "t2",
        ]  # fmt: skip
        # Each job's batches were created at its own provider.
        stats = await h.emulator.control("GET", "stats")
        assert stats["requests"].get("POST /anthropic/v1/messages/batches") == 1
        assert stats["requests"].get("POST /v1/batches") == 2

        # An unknown provider's spec is rejected, with a report naming the configured ones.
        assert events["to-nowhere"]["type"] == "batch.rejected"
        report = (h.ws.inbox / "rejected" / "to-nowhere.json.errors.txt").read_text()
        assert "'gemini'" in report and "default, claude" in report

        # `batchd jobs --json` says which provider each job went to.
        listed = json.loads((await h.ws.batchd("jobs", "--json")).stdout)
        assert {j["name"]: j["provider_name"] for j in listed if j["state"] == "completed"} == {
            "plain": "default", "to-default": "default", "to-claude": "claude",
        }  # fmt: skip
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0


async def test_a_reload_that_drops_a_provider_with_jobs_in_flight_is_refused(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        add_claude(h.ws.config, h.emulator.url)
        h.ws.env["ANTHROPIC_API_KEY"] = "acceptance-key"
        await h.emulator.control("POST", "pause")  # the job stays in flight
        data = h.ws.inbox / "data"
        data.mkdir(parents=True)
        (data / "claude.jsonl").write_text(json.dumps(message("c0")) + "\n")
        h.ws.drop("held.json", json.dumps({"input": "data/claude.jsonl", "provider": "claude"}).encode())
        daemon = h.start()
        await daemon.until_logged("job.batch_created")
        before = h.ws.config.read_text()
        h.ws.config.write_text(before.split("[providers.claude]")[0], encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        await daemon.until_logged("daemon.reload_refused")
        (refused,) = daemon.logs_named("daemon.reload_refused")
        assert "claude" in refused["error"] and "in flight" in refused["error"]
        # The job goes on at its provider, and ends.
        h.ws.config.write_text(before, encoding="utf-8")
        await h.emulator.control("POST", "resume")
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.completed" and event["data"]["provider_name"] == "claude"
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
