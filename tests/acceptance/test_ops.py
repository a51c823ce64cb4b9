"""Operating the real `batchd run`: sd_notify on a real datagram socket, /metrics and /healthz,
the operator commands beside a running daemon, and logs free of secrets."""

from __future__ import annotations

import base64
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.store import SCHEMA_VERSION, Store
from tests.acceptance.conftest import (
    SECRET,
    DaemonProcess,
    Harness,
    chat,
    eventually,
    harness,
    read_jsonl,
)
from tests.integration.emulator_helpers import HoldEngine

pytestmark = pytest.mark.each_database

# ---------------------------------------------------------------- sd_notify


async def test_sd_notify_ready_status_watchdog_reload_and_stopping(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        sock_path = tmp_path / "notify.sock"
        received: list[tuple[float, str]] = []
        async with (
            await anyio.create_unix_datagram_socket(local_path=sock_path) as sock,
            anyio.create_task_group() as tg,
        ):

            async def collect() -> None:
                while True:
                    data, _ = await sock.receive()
                    received.append((time.monotonic(), data.decode()))

            tg.start_soon(collect)

            def messages(prefix: str) -> list[tuple[float, str]]:
                return [(at, m) for at, m in received if m.startswith(prefix)]

            # A file waiting before the start is found by the first rescan.
            h.ws.drop("early.jsonl", [chat("e-1"), chat("e-2")])
            # Pings are due every 1 s; systemd would kill a daemon silent for 2 s.
            h.ws.env.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
            daemon = h.start()

            await eventually(lambda: bool(messages("READY=1")), 30, "READY=1")
            # READY=1 comes after the database is open and migrated.
            store = Store(h.ws.database_url)
            try:
                assert store.schema_version() == SCHEMA_VERSION
            finally:
                store.close()
            assert received[0][1] == "READY=1"

            (hook,) = await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
            assert hook.event["data"]["name"] == "early"
            await eventually(lambda: any("1 done (1 completed)" in m for _, m in messages("STATUS=")), 10, "STATUS")
            first_status = messages("STATUS=")[0][1]
            assert first_status.startswith("STATUS=") and "active" in first_status and "\n" not in first_status

            await eventually(lambda: len(messages("WATCHDOG=1")) >= 4, 15, "WATCHDOG=1")
            pings = [at for at, _ in messages("WATCHDOG=1")]
            assert max(b - a for a, b in itertools.pairwise(pings)) < 2.0

            ready_before = len(messages("READY=1"))
            daemon.signal(signal.SIGHUP)
            await eventually(lambda: len(messages("READY=1")) > ready_before, 10, "READY=1 after reload")
            reloading = messages("RELOADING=1")
            assert len(reloading) == 1 and "\nMONOTONIC_USEC=" in reloading[0][1]
            assert reloading[0][0] <= messages("READY=1")[-1][0]

            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(timeout=15) == 0
            await eventually(lambda: bool(messages("STOPPING=1")), 5, "STOPPING=1")
            tg.cancel_scope.cancel()
        assert daemon.has_logged("daemon.reloaded")


# ---------------------------------------------------------------- metrics and health


def listening_url(daemon: DaemonProcess) -> str:
    (entry,) = [e for e in daemon.logs() if e.get("event") == "metrics.listening"]
    url: str = entry["url"]
    return url


async def scrape(http: httpx.AsyncClient, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def test_metrics_move_when_a_job_runs_and_healthz_is_ok(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        with h.ws.config.open("a", encoding="utf-8") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        url = listening_url(daemon)
        http = h.emulator.http

        before = await scrape(http, url)
        assert before[("batchd_submissions_total", ())] == 0
        assert before[("batchd_jobs", (("state", "completed"),))] == 0
        assert before[("process_resident_memory_bytes", ())] > 0
        healthz = await http.get(f"{url}/healthz")
        assert healthz.status_code == 200, healthz.text
        assert healthz.json()["database"] == "ok" and healthz.json()["scheduler"] == "ok"

        h.ws.drop("counted.jsonl", [chat("a"), chat("b", trigger={"error": "invalid_model"}), chat("c")])
        h.ws.drop("bad.jsonl", b"{not json\n")
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2)

        async def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with anyio.fail_after(15):
                while True:
                    found = await scrape(http, url)
                    if (
                        found[("batchd_jobs", (("state", "completed"),))] == 1
                        and found.get(("batchd_webhook_deliveries_total", (("outcome", "delivered"),))) == 2
                    ):
                        return found
                    await anyio.sleep(0.1)

        after = await settled()
        assert after[("batchd_submissions_total", ())] == 1
        assert after[("batchd_rejections_total", ())] == 1
        assert after[("batchd_jobs", (("state", "rejected"),))] == 1
        assert after[("batchd_api_calls_total", (("endpoint", "together.create"), ("outcome", "2xx")))] == 1
        assert after[("batchd_api_calls_total", (("endpoint", "together.download"), ("outcome", "2xx")))] >= 2
        assert after[("batchd_api_request_duration_seconds_count", (("endpoint", "together.create"),))] == 1
        assert after[("batchd_job_duration_seconds_count", (("state", "completed"),))] == 1
        assert after[("batchd_job_duration_seconds_sum", (("state", "completed"),))] > 0
        outbox = h.ws.outbox / "counted"
        written = sum((outbox / n).stat().st_size for n in ("output.jsonl", "errors.jsonl", "job.json"))
        assert after[("batchd_outbox_bytes_total", ())] == written
        polls = sum(v for (name, _), v in after.items() if name == "batchd_poll_duration_seconds_count")
        assert polls >= 1
        assert after[("batchd_scheduler_tick_duration_seconds_count", ())] > 0

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0


async def test_a_metrics_port_in_use_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = await h.ws.batchd("--set", f"metrics.listen=127.0.0.1:{port}", "run", "--once", timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "metrics.listen" in done.stderr


# ---------------------------------------------------------------- operator commands


async def cli_json(h: Harness, *args: str) -> Any:
    done = await h.ws.batchd(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_operator_commands_beside_a_running_daemon_and_a_cancel_that_keeps_partial_results(
    tmp_path: Path,
) -> None:
    engine = HoldEngine()
    async with harness(tmp_path, engine=engine) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        sent = [chat("q-0"), chat("q-1"), chat("q-2"), chat("h-3", "hold"), chat("h-4", "hold")]
        h.ws.drop("partial.jsonl", sent)

        # Three answered, two held: the provider reports 60 %, and the daemon's next poll records it.
        store = Store(h.ws.database_url)
        try:
            await eventually(lambda: any(b.progress == 60.0 for bs in store.batches.by_job().values() for b in bs), 30)
        finally:
            store.close()

        (job,) = await cli_json(h, "jobs")
        assert (job["name"], job["state"], job["progress"], job["requests"]) == ("partial", "in_progress", 60.0, 5)
        assert job["request_counts"] is None and len(job["remote_batch_ids"]) == 1 and job["age_s"] >= 0
        assert await cli_json(h, "jobs", "--state", "completed") == []

        table = (await h.ws.batchd("jobs")).stdout.splitlines()
        assert table[0].split() == [
            "ID", "NAME", "STATE", "PROGRESS", "REQUESTS", "OK", "FAILED", "AGE", "PROVIDER", "OWNER",
        ]  # fmt: skip
        assert table[1].split()[:6] == [job["id"][:8], "partial", "in_progress", "60%", "5", "-"]
        assert table[1].split()[8] == "default"

        shown = await cli_json(h, "show", "partial")
        (remote,) = shown["remote_batches"]
        assert remote["remote_id"] == job["remote_batch_ids"][0] and remote["status"] == "in_progress"
        assert shown["files"]["claimed"].endswith("/partial.jsonl") and shown["timings"]["finished_at"] is None
        human = (await h.ws.batchd("show", job["id"][:8])).stdout
        assert "state      in_progress   60%" in human and remote["remote_id"] in human

        once = (await h.ws.batchd("watch", "--once")).stdout
        assert "1 job in flight" in once and "[############........]  60%" in once
        # Without a terminal, watch prints one snapshot per interval until interrupted.
        watch_log = tmp_path / "watch.out"
        command = [sys.executable, "-m", "batchd", "--config", str(h.ws.config), "watch", "--interval", "0.2"]
        with watch_log.open("wb") as out:
            async with await anyio.open_process(command, env=h.ws.env, stdout=out, stderr=subprocess.STDOUT) as watcher:
                await eventually(lambda: watch_log.read_text().count("1 job in flight") >= 3, 20, "watch snapshots")
                watcher.send_signal(signal.SIGINT)
                with anyio.fail_after(10):
                    assert await watcher.wait() == 0
        assert "Traceback" not in watch_log.read_text()

        cancelled = await h.ws.batchd("cancel", "partial")
        assert cancelled.returncode == 0, cancelled.stderr
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        (event,) = h.receiver.verified()
        assert event["type"] == "batch.cancelled"
        assert event["data"]["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
        folder = h.ws.outbox / "partial"
        assert [line["custom_id"] for line in read_jsonl(folder / "output.jsonl")] == ["q-0", "q-1", "q-2"]
        errors = read_jsonl(folder / "errors.jsonl")
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
            ("h-3", "batch_cancelled"),
            ("h-4", "batch_cancelled"),
        ]
        shown = await cli_json(h, "show", "partial")
        assert shown["state"] == "cancelled" and shown["cancel_requested"] is True
        assert shown["files"]["output_jsonl"] == str(folder / "output.jsonl")
        assert [(w["type"], w["state"]) for w in shown["webhooks"]] == [("batch.cancelled", "delivered")]

        # Retried while the daemon runs: a new job that now gets every answer.
        engine.release.set()
        retried = await h.ws.batchd("retry", "partial")
        assert retried.returncode == 0, retried.stderr
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2)
        assert h.receiver.verified()[1]["type"] == "batch.completed"
        states = [(j["name"], j["state"]) for j in await cli_json(h, "jobs")]
        assert states == [("partial", "cancelled"), ("partial", "completed")]

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0


# ---------------------------------------------------------------- logs


async def test_logs_are_json_lines_with_context_and_no_secret(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        api_key = "tgp_" + uuid.uuid4().hex
        spec_secret = "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()
        h.ws.env["TOGETHER_API_KEY"] = api_key
        h.ws.env["SPEC_HOOK_SECRET"] = spec_secret
        hooks_url = h.receiver.url.rsplit("/", 1)[0]
        text = h.ws.config.read_text(encoding="utf-8").replace(
            "[polling]",
            f'allow_webhook_urls = ["{hooks_url}/"]\nwebhook_secret_env = "SPEC_HOOK_SECRET"\n\n[polling]',
        )
        h.ws.config.write_text(text, encoding="utf-8")
        daemon = h.start("--log-level", "debug")
        await daemon.until_logged("daemon.ready")

        # A receiver that takes its token in the URL: the delivery logs name that URL.
        data = h.ws.inbox / "data"
        data.mkdir(parents=True)
        (data / "specced.jsonl").write_text("".join(json.dumps(chat(f"s-{i}")) + "\n" for i in range(3)))
        spec = {"input": "data/specced.jsonl", "webhook_url": f"{hooks_url}/spec?token={spec_secret}"}
        h.ws.drop("specced.json", json.dumps(spec).encode())
        h.ws.drop("bad.jsonl", b'{"custom_id": "x"}\n')
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 3)
        daemon.signal(signal.SIGHUP)
        await daemon.until_logged("daemon.reloaded")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0

        lines = daemon.log_path.read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all(isinstance(e, dict) and e.get("event") and e.get("timestamp") for e in entries)
        assert any(e["event"] == "webhook.delivered" and "token=***" in e["url"] for e in entries)
        created = [e for e in entries if e["event"] == "job.batch_created"]
        assert created and all(e.get("job_id") and e.get("remote_batch_id") for e in created)
        secrets = [api_key, SECRET, SECRET.removeprefix("whsec_"), spec_secret, spec_secret.removeprefix("whsec_")]
        leaks = [(n, s[:10]) for n, line in enumerate(lines) for s in secrets if s in line]
        assert leaks == []


async def test_a_retry_and_a_replay_are_taken_up_at_once_not_at_the_next_heartbeat(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # A heartbeat only every 200 s: within this test, only the command's wake-up
        # (store/signals.py) can get the retried job, which nobody holds, claimed.
        h.ws.config.write_text(h.ws.config.read_text(encoding="utf-8") + "\n[cluster]\nlease_s = 600\n")
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        h.ws.drop("flaky.jsonl", [chat("a"), chat("b", trigger={"error": "invalid_model"})])
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        assert h.receiver.verified()[0]["data"]["request_counts"] == {"total": 2, "completed": 1, "failed": 1}

        retried = await h.ws.batchd("retry", "flaky")
        assert retried.returncode == 0, retried.stderr
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2, timeout=60)
        second = h.receiver.verified()[1]
        assert second["data"]["request_counts"] == {"total": 1, "completed": 0, "failed": 1}

        replayed = await h.ws.batchd("webhooks", "replay", second["id"])
        assert replayed.returncode == 0, replayed.stderr
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 3, timeout=60)
        assert h.receiver.verified()[2]["id"] == second["id"]
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0
