"""The installed command line as a user runs it: exit codes, output, files."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.acceptance.conftest import chat, harness, read_jsonl
from tests.databases import database_url


def batchd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args], env={**base, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def local_config(tmp_path: Path) -> Path:
    config = tmp_path / "batchd.toml"
    config.write_text('state_dir = "state"\n', encoding="utf-8")
    return config


def test_validate_exit_codes_and_line_numbered_problems(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [chat("a"), chat("b")])
    ok = batchd("validate", str(good))
    assert ok.returncode == 0 and "2 requests" in ok.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(chat("a")).encode() + b"\n{nope\n" + json.dumps(chat("a")).encode() + b"\n")
    result = batchd("validate", str(bad))
    assert result.returncode == 1
    assert "bad.jsonl" in result.stdout and "line 2" in result.stdout and "line 3" in result.stdout

    as_json = batchd("validate", "--json", str(bad))
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1
    assert [(p["line"], p["rule"]) for p in report["problems"]] == [(2, "json"), (3, "duplicate_custom_id")]

    assert batchd("validate", str(tmp_path / "missing.jsonl")).returncode == 2
    assert batchd("validate").returncode == 2


def test_submit_drops_atomically_and_refuses_bad_files(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    src = write_jsonl(tmp_path / "src.jsonl", [chat("a")])
    result = batchd("--config", str(config), "submit", str(src), "--name", "nightly run")
    assert result.returncode == 0, result.stderr
    inbox = tmp_path / "state" / "inbox"
    assert (inbox / "nightly run.jsonl").read_bytes() == src.read_bytes()
    assert [p.name for p in inbox.iterdir()] == ["nightly run.jsonl"]  # no temporary left behind

    again = batchd("--config", str(config), "submit", str(src), "--name", "nightly run")
    assert again.returncode == 1 and "already waiting" in again.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n", encoding="utf-8")
    refused = batchd("--config", str(config), "submit", str(bad))
    assert refused.returncode == 1 and "custom_id" in refused.stderr
    assert not (inbox / "bad.jsonl").exists()


def test_configuration_errors_exit_two(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    result = batchd("--config", str(config), "jobs", env={"BATCHD_POLLING_MIN_INTERVAL_S": "soon"})
    assert result.returncode == 2 and "polling.min_interval_s" in result.stderr
    missing = batchd("--config", str(tmp_path / "nope.toml"), "jobs")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert batchd("--config", str(config), "run", "--timeout", "3").returncode == 2


@pytest.mark.each_database
def test_jobs_on_a_database_without_tables_or_without_a_server(tmp_path: Path) -> None:
    url = database_url(tmp_path / "state" / "batchd.db")
    config = tmp_path / "batchd.toml"
    config.write_text(f'state_dir = "state"\ndatabase_url = "{url}"\n', encoding="utf-8")
    empty = batchd("--config", str(config), "jobs")
    assert (empty.returncode, empty.stdout) == (0, "no jobs\n"), empty.stderr
    # Nothing tracked is not the answer when the database cannot be reached.
    down = batchd("--config", str(config), "jobs", env={"BATCHD_DATABASE_URL": "'postgresql://u@127.0.0.1:1/db'"})
    assert down.returncode == 1 and "cannot read the database" in down.stderr and "Traceback" not in down.stderr


def test_run_and_webhooks_stop_with_a_message_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    # Nothing listens on port 1: the server is down. The password must not reach the message.
    down = {"BATCHD_DATABASE_URL": "'postgresql://batchd:hunter2@127.0.0.1:1/batchd'"}
    for command in (["run"], ["webhooks"]):
        result = batchd("--config", str(config), *command, env=down)
        assert result.returncode == 1, (command, result.stderr)
        assert "cannot open the database postgresql+psycopg://batchd:***@127.0.0.1:1/batchd" in result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr, result.stderr

    # A database written by a newer batchd is not touched: the daemon says to upgrade.
    (tmp_path / "state").mkdir(exist_ok=True)
    db = tmp_path / "state" / "batchd.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (999)")
    newer = batchd("--config", str(config), "run", env={"BATCHD_DATABASE_URL": f"'sqlite:///{db}'"})
    assert newer.returncode == 1 and "schema version 999" in newer.stderr and "upgrade batchd" in newer.stderr
    assert "Traceback" not in newer.stderr, newer.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(999,)]


@pytest.mark.each_database
async def test_jobs_show_cancel_and_retry_beside_a_finished_run(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.ws.drop("report.jsonl", [chat("a"), chat("b"), chat("c", trigger={"error": "invalid_model"})])
        done = await h.ws.batchd("run", "--once", "--timeout", "60", timeout=90)
        assert done.returncode == 0, done.stdout

        listing = await h.ws.batchd("jobs", "--json")
        (job,) = json.loads(listing.stdout)
        assert (job["name"], job["state"], job["requests"]) == ("report", "completed", 3)
        assert job["request_counts"] == {"total": 3, "completed": 2, "failed": 1}

        table = await h.ws.batchd("jobs")
        assert "completed" in table.stdout and "report" in table.stdout

        shown = await h.ws.batchd("show", "--json", job["id"][:6])
        assert json.loads(shown.stdout)["remote_batches"][0]["remote_id"] == job["remote_batch_ids"][0]
        assert (await h.ws.batchd("show", "no-such-job")).returncode == 1

        refused = await h.ws.batchd("cancel", "report")
        assert refused.returncode == 1 and "already completed" in refused.stderr

        # A manual retry resubmits only what did not succeed, as a new job with its own outbox folder.
        retried = await h.ws.batchd("retry", "report")
        assert retried.returncode == 0, retried.stderr
        assert "retrying 1 request of" in retried.stdout  # singular: "1 requests" was a rough edge
        again = await h.ws.batchd("run", "--once", "--timeout", "60", timeout=90)
        assert again.returncode == 0
        jobs = json.loads((await h.ws.batchd("jobs", "--json")).stdout)
        assert [(j["state"], j["requests"]) for j in jobs] == [("completed", 3), ("completed", 1)]
        retry_folder = h.ws.outbox / f"report.{jobs[1]['id'][:8]}"
        assert sorted(p.name for p in h.ws.outbox.iterdir()) == ["report", retry_folder.name]
        assert [e["custom_id"] for e in read_jsonl(retry_folder / "errors.jsonl")] == ["c"]

        h.ws.drop("clean.jsonl", [chat("z")])
        assert (await h.ws.batchd("run", "--once", "--timeout", "60", timeout=90)).returncode == 0
        nothing = await h.ws.batchd("retry", "clean")
        assert nothing.returncode == 1 and "nothing to retry" in nothing.stderr


def test_demo_runs_offline_and_exits_zero(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "TOGETHER_API_KEY": "", "http_proxy": "http://127.0.0.1:9", "https_proxy": ""}
    result = batchd("demo", env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout
    assert "signature verified" in result.stdout
    # Plain sentences, not a Python dict; no path of the workspace it deletes.
    assert "5 requests, 5 completed, 0 failed" in result.stdout and "{'" not in result.stdout
    assert "batchd-demo-" not in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_emulator_command_serves_the_together_dialect(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "batchd", "emulator", "--port", str(port), "--data-dir", str(tmp_path / "emu")]
    async with (
        await anyio.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc,
        httpx.AsyncClient() as http,
    ):

        async def answers() -> bool:
            try:
                r = await http.get(f"http://127.0.0.1:{port}/v1/batches", headers={"Authorization": "Bearer k"})
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json() == []

        with anyio.fail_after(30):
            while not await answers():  # noqa: ASYNC110 - the server is another process
                await anyio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            assert await proc.wait() == 0
    assert (tmp_path / "emu").is_dir()
