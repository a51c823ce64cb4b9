"""The real `batchd run` against a Together server (the emulator over loopback):
dropped files in, ordered results and signed webhooks out, restarts survived."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from batchd.store import Store
from tests.acceptance.conftest import Workspace, chat, eventually, harness, read_jsonl

pytestmark = pytest.mark.each_database


def job_json(ws: Workspace, name: str) -> dict[str, Any]:
    import json

    parsed: dict[str, Any] = json.loads((ws.outbox / name / "job.json").read_text(encoding="utf-8"))
    return parsed


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


def assert_accounted(ws: Workspace, name: str, sent: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Every input custom_id exactly once across output and errors, each file in input order."""
    folder = ws.outbox / name
    order = ids(sent)
    out = ids(read_jsonl(folder / "output.jsonl"))
    err = ids(read_jsonl(folder / "errors.jsonl")) if (folder / "errors.jsonl").exists() else []
    assert sorted(out + err) == sorted(order)
    assert out == [i for i in order if i in out]
    assert err == [i for i in order if i in err]
    return out, err


async def test_three_files_end_to_end(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # One round only: the expired half stays unanswered (follow-up rounds have their own tests).
        h.ws.config.write_text(h.ws.config.read_text() + "\n[resubmit]\nmax_rounds = 0\n")
        daemon = h.start()
        await daemon.until_logged("daemon.ready")

        ok = [chat(f"ok-{i}", f"question {i}") for i in range(6)]
        partial = [chat("p-1"), chat("p-2", trigger={"error": "invalid_model"}), chat("p-3"), chat("p-4")]
        expiring = [chat(f"e-{i}", trigger={"expire_batch": True} if i == 3 else None) for i in range(6)]
        h.ws.drop("ok.jsonl", ok)
        h.ws.drop("partial.jsonl", partial)
        h.ws.drop("expiring.jsonl", expiring)

        await h.receiver.wait_for(lambda hooks: len(hooks) >= 3)
        events = {e["data"]["name"]: e for e in h.receiver.verified()}
        assert {name: e["type"] for name, e in events.items()} == {
            "ok": "batch.completed",
            "partial": "batch.completed",
            "expiring": "batch.expired",
        }

        out, err = assert_accounted(h.ws, "ok", ok)
        assert (len(out), err) == (6, [])
        first = read_jsonl(h.ws.outbox / "ok" / "output.jsonl")[0]
        assert first["response"]["body"]["choices"][0]["message"]["content"] == "echo: question 0"

        out, err = assert_accounted(h.ws, "partial", partial)
        assert err == ["p-2"]
        (error_line,) = read_jsonl(h.ws.outbox / "partial" / "errors.jsonl")
        assert error_line["error"]["code"] == "invalid_model"

        out, err = assert_accounted(h.ws, "expiring", expiring)
        assert (out, err) == (["e-0", "e-1", "e-2"], ["e-3", "e-4", "e-5"])
        for line in read_jsonl(h.ws.outbox / "expiring" / "errors.jsonl"):
            assert line["response"] is None and line["error"]["code"] == "batch_expired"

        for name, counts, status in [
            ("ok", {"total": 6, "completed": 6, "failed": 0}, "completed"),
            ("partial", {"total": 4, "completed": 3, "failed": 1}, "completed"),
            ("expiring", {"total": 6, "completed": 3, "failed": 3}, "expired"),
        ]:
            meta = job_json(h.ws, name)
            assert (meta["status"], meta["request_counts"], meta["source"]) == (status, counts, f"{name}.jsonl")
            assert meta["provider"] == "together" and len(meta["remote_batch_ids"]) == 1
            assert meta["usage"]["total_tokens"] > 0
            event = events[name]["data"]
            assert event["request_counts"] == counts and event["remote_batch_ids"] == meta["remote_batch_ids"]
            assert event["output_file"] == meta["output_file"] == str(h.ws.outbox / name / "output.jsonl")

        # One webhook per job, each signed; the event id is the webhook-id.
        assert len(h.receiver.hooks) == 3
        assert all(h.headers["webhook-id"] == h.event["id"] for h in h.receiver.hooks)
        assert len(await h.emulator.creates()) == 3

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0
        # Secrets never reach the logs or the outbox.
        secret_key = h.ws.env["TOGETHER_API_KEY"]
        assert secret_key not in daemon.log_path.read_text()
        assert all(secret_key not in p.read_text() for p in h.ws.outbox.glob("*/job.json"))


async def test_malformed_file_is_rejected_and_the_daemon_keeps_going(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")

        bad = (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
            b'"messages": [{"role": "user", "content": "x"}]}}\n'
            b'{"custom_id": "b", "method": "POST", oops}\n'
            b'{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
            b'"messages": [{"role": "user", "content": "x"}]}}\n'
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
            b'"messages": [{"role": "user", "content": "x"}]}}\n'
        )
        h.ws.drop("bad.jsonl", bad)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)

        rejected = h.ws.inbox / "rejected" / "bad.jsonl"
        assert rejected.read_bytes() == bad
        report = (h.ws.inbox / "rejected" / "bad.jsonl.errors.txt").read_text(encoding="utf-8")
        assert "bad.jsonl" in report and "line 2" in report and "line 4" in report
        assert "duplicate_custom_id" in report and "json" in report
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.rejected"
        assert event["data"]["status"] == "rejected" and event["data"]["source"] == "bad.jsonl"
        assert event["data"]["report_file"] == str(h.ws.inbox / "rejected" / "bad.jsonl.errors.txt")

        good = [chat("g-1"), chat("g-2")]
        h.ws.drop("good.jsonl", good)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2)
        assert h.receiver.verified()[1]["type"] == "batch.completed"
        assert_accounted(h.ws, "good", good)
        assert daemon.proc.poll() is None

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0


async def test_sigterm_mid_job_then_restart_finishes_without_a_second_batch(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.emulator.control("POST", "pause")
        first = h.start()
        await first.until_logged("daemon.ready")
        sent = [chat(f"r-{i}") for i in range(5)]
        h.ws.drop("restart.jsonl", sent)

        await first.until_logged("job.batch_created")
        assert len(await h.emulator.creates()) == 1
        first.signal(signal.SIGTERM)
        assert await first.wait(timeout=10) == 0
        assert h.receiver.hooks == []

        store = Store(h.ws.database_url)
        (job,) = store.jobs.select()
        store.close()
        assert job.state.value in ("validating", "in_progress")

        await h.emulator.control("POST", "resume")
        second = h.start()
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.completed" and event["data"]["id"] == job.id
        assert_accounted(h.ws, "restart", sent)
        creates = await h.emulator.creates()
        assert len(creates) == 1 and creates[0]["id"] == event["data"]["remote_batch_ids"][0]
        second.signal(signal.SIGINT)
        assert await second.wait(timeout=10) == 0


async def test_a_second_daemon_on_the_same_state_refuses_to_start(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        first = h.start()
        await first.until_logged("daemon.ready")
        result = await h.ws.batchd("run", timeout=30)
        assert result.returncode == 1
        assert f"pid {first.proc.pid}" in result.stderr


async def test_run_once_drains_and_exits_zero(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        sent = [chat("o-1"), chat("o-2")]
        h.ws.drop("once.jsonl", sent)
        result = await h.ws.batchd("run", "--once", "--timeout", "60", timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_accounted(h.ws, "once", sent)
        # Drained means delivered: the webhook arrived before the process exited.
        assert [h.event["type"] for h in h.receiver.hooks] == ["batch.completed"]


async def test_run_once_times_out_with_exit_one(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.emulator.control("POST", "pause")
        h.ws.drop("stuck.jsonl", [chat("s-1")])
        result = await h.ws.batchd("run", "--once", "--timeout", "2", timeout=60)
        assert result.returncode == 1


async def test_bad_config_exits_two_naming_the_key(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.ws.config.write_text(h.ws.config.read_text() + "\n[polling]\nfast = true\n")
        result = await h.ws.batchd("run")
        assert result.returncode == 2
        assert "polling" in result.stderr


async def test_pending_webhook_survives_a_refusing_receiver_and_a_restart(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.receiver.refuse = 1
        h.ws.drop("wait.jsonl", [chat("w-1")])
        first = h.start()
        await first.until_logged("webhook.retry_scheduled")
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0

        second = h.start()
        await eventually(lambda: second.has_logged("webhook.delivered"), 30)
        refused, accepted = h.receiver.hooks
        assert accepted.headers["webhook-id"] == refused.headers["webhook-id"]
        assert accepted.body == refused.body
        assert accepted.event["type"] == "batch.completed"
        h.receiver.verified()


async def test_sighup_with_a_broken_config_keeps_the_daemon_on_the_old_one(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        good = h.ws.config.read_text()
        h.ws.config.write_text("colour = 'blue'\n" + good)
        daemon.signal(signal.SIGHUP)
        await daemon.until_logged("daemon.reload_refused")
        refused = next(e for e in daemon.logs() if e["event"] == "daemon.reload_refused")
        assert "unknown key colour" in refused["error"]
        # Still alive and still working on the old settings.
        h.ws.drop("after-hup.jsonl", [chat("h-1")])
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        assert daemon.proc.poll() is None
        h.ws.config.write_text(good.replace("min_interval_s = 0.2", "min_interval_s = 0.3"))
        daemon.signal(signal.SIGHUP)
        await daemon.until_logged("daemon.reloaded")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0
