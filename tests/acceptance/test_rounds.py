"""Past the limits: one job over several remote batches, and follow-up rounds that heal
passing failures. The real daemon against the emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.acceptance.conftest import Harness, chat, harness, read_jsonl


def job_json(h: Harness, name: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads((h.ws.outbox / name / "job.json").read_text(encoding="utf-8"))
    return parsed


async def drain(h: Harness, timeout: float = 240) -> None:
    done = await h.ws.batchd("run", "--once", "--timeout", str(timeout), timeout=timeout + 60)
    assert done.returncode == 0, done.stdout[-3000:]


async def test_sixty_thousand_requests_become_several_batches_and_one_ordered_result(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        sent = [chat(f"q{i:05d}", f"question {i}") for i in range(60_000)]
        h.ws.drop("big.jsonl", sent)
        await drain(h)
        meta = job_json(h, "big")
        assert meta["status"] == "completed"
        assert len(meta["remote_batch_ids"]) >= 2
        assert meta["request_counts"] == {"total": 60_000, "completed": 60_000, "failed": 0}
        order = [line["custom_id"] for line in read_jsonl(h.ws.outbox / "big" / "output.jsonl")]
        assert order == [x["custom_id"] for x in sent]
        assert len(await h.emulator.creates()) == len(meta["remote_batch_ids"])
        (event,) = h.receiver.verified()
        assert event["data"]["remote_batch_ids"] == meta["remote_batch_ids"]


async def test_passing_failures_heal_in_a_follow_up_round_and_permanent_ones_stay(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        sent = [
            chat("a"),
            chat("flaky-1", trigger={"fail_once": 503}),
            chat("bad-model", trigger={"error": "invalid_model"}),
            chat("flaky-2", trigger={"fail_once": 429}),
            chat("b"),
        ]
        h.ws.drop("heal.jsonl", sent)
        await drain(h)
        meta = job_json(h, "heal")
        assert meta["status"] == "completed"
        assert meta["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
        out = read_jsonl(h.ws.outbox / "heal" / "output.jsonl")
        assert [x["custom_id"] for x in out] == ["a", "flaky-1", "flaky-2", "b"]
        (error,) = read_jsonl(h.ws.outbox / "heal" / "errors.jsonl")
        assert (error["custom_id"], error["error"]["code"]) == ("bad-model", "invalid_model")
        # Round 0 with every request, round 1 with the two passing failures only.
        assert [len(r["batches"]) for r in meta["rounds"]] == [1, 1]
        assert [r["batches"][0]["requests"] for r in meta["rounds"]] == [5, 2]
        assert len(meta["remote_batch_ids"]) == 2


async def test_an_expired_batchs_unanswered_half_is_resubmitted(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        sent = [chat(f"e{i}", trigger={"expire_once": True} if i == 3 else None) for i in range(6)]
        h.ws.drop("expiry.jsonl", sent)
        await drain(h)
        meta = job_json(h, "expiry")
        assert meta["status"] == "completed"
        assert meta["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        assert [x["custom_id"] for x in read_jsonl(h.ws.outbox / "expiry" / "output.jsonl")] == [
            x["custom_id"] for x in sent
        ]
        statuses = [r["batches"][0]["status"] for r in meta["rounds"]]
        assert statuses == ["expired", "completed"]
        assert meta["rounds"][1]["batches"][0]["requests"] == 3
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.completed"


async def test_small_limits_split_a_file_into_many_shards_merged_in_order(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # [provider] is already in the file: the limit goes into that table.
        text = h.ws.config.read_text().replace('kind = "together"', 'kind = "together"\nmax_batch_requests = 3')
        h.ws.config.write_text(text)
        sent = [chat(f"s{i}", trigger={"fail_once": 503} if i in (4, 9) else None) for i in range(10)]
        h.ws.drop("shards.jsonl", sent)
        await drain(h)
        meta = job_json(h, "shards")
        assert meta["status"] == "completed"
        assert [len(r["batches"]) for r in meta["rounds"]] == [4, 1]
        assert [b["requests"] for b in meta["rounds"][0]["batches"]] == [3, 3, 3, 1]
        assert [x["custom_id"] for x in read_jsonl(h.ws.outbox / "shards" / "output.jsonl")] == [
            x["custom_id"] for x in sent
        ]
        creates = await h.emulator.creates()
        assert len(creates) == 5 and len({c["input_file_id"] for c in creates}) == 5


async def test_a_priced_model_gets_an_estimated_cost_in_job_json_and_the_webhook(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        pricing = '\n[pricing]\n"m" = { input_per_mtok = 1000000, output_per_mtok = 2000000 }\n'
        h.ws.config.write_text(h.ws.config.read_text() + pricing)
        h.ws.drop("priced.jsonl", [chat("a", "one two three"), chat("b", "four")])
        await drain(h)
        meta = job_json(h, "priced")
        usage = meta["usage"]
        expected = usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0
        assert meta["model"] == "m"
        assert meta["cost"]["estimated_usd"] == expected > 0
        (event,) = h.receiver.verified()
        assert event["data"]["cost"] == meta["cost"]
        shown = await h.ws.batchd("show", "priced")
        assert f"cost ~${expected}" in shown.stdout
