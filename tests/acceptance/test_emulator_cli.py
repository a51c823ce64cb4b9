"""`batchd emulator` as a user runs it: the OpenAI, Anthropic and Gemini dialects with the official
SDKs, flags for timelines and faults, and an upstream batch that survives `kill -9` of the emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from anthropic import Anthropic
from google import genai
from google.genai import types
from openai import OpenAI

from batchd.emulator import serve_emulator
from batchd.emulator.spool import custom_id_hash, recover_spool
from tests.acceptance.conftest import eventually
from tests.integration.emulator_helpers import (
    BearerAuth,
    gemini_line,
    openai_create,
    openai_download,
    openai_upload,
    openai_wait,
    parse_jsonl,
    request_line,
    to_jsonl,
)
from tests.integration.upstream_server import CountingUpstream

REQUESTS = 1000
#: A generous bound on the requests a kill can make the emulator send again: those in flight
#: upstream (--concurrency 16) and the answers still waiting for the spool's next fsync (a few ms).
MAX_RESENT = 64


class EmulatorProcess:
    """`python -m batchd emulator --port 0 …` with its JSON log in a file; `url` once it serves."""

    def __init__(self, root: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.log_path = root / f"emulator-{len(list(root.glob('emulator-*.log')))}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")} | (env or {})
        command = [sys.executable, "-m", "batchd", "emulator", "--port", "0", "--data-dir", str(root / "data")]
        self.proc = subprocess.Popen([*command, *flags], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = ""

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the emulator exited with {self.proc.returncode}: {self.log_path.read_text()}")
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == "emulator.serving":
                self.url = entry["url"]
                return True
        return False

    async def started(self) -> str:
        await eventually(self._serving, 30, "the emulator serving")
        return self.url

    async def exited(self) -> int:
        await eventually(lambda: self.proc.poll() is not None, 30, "the emulator exiting")
        self._log.close()
        return self.proc.returncode

    async def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: self.proc.poll() is not None, 15, "the emulator exiting")
        self._log.close()
        return self.proc.returncode


def openai_sdk_batch(base_url: str, input_path: Path) -> tuple[list[str], str]:
    """The statuses a plain SDK user sees while polling, and the output."""
    with OpenAI(api_key="cli-key", base_url=f"{base_url}/openai/v1", max_retries=5) as client:
        uploaded = client.files.create(file=input_path, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        seen: list[str] = [batch.status]
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            batch = client.batches.retrieve(batch.id)
            seen.append(batch.status)
        assert batch.output_file_id is not None
        return seen, client.files.content(batch.output_file_id).text


async def test_the_command_serves_openai_with_a_timeline_an_api_key_and_faults(tmp_path: Path) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_bytes(to_jsonl([request_line(f"r{i}") for i in range(5)]))
    flags = ["--api-key", "cli-key", "--validating-s", "0.3", "--finalizing-s", "0.3"]
    flags += ["--fault-rate", "0.2", "--fault-statuses", "429,503", "--fault-retry-after", "0", "--fault-seed", "3"]
    emulator = EmulatorProcess(tmp_path, *flags)
    try:
        url = await emulator.started()
        async with httpx.AsyncClient(base_url=url) as http:
            refused = await http.get("/openai/v1/batches", headers={"Authorization": "Bearer wrong"})
            assert refused.status_code in (401, 429, 503)
            seen, output = await anyio.to_thread.run_sync(openai_sdk_batch, url, input_path)
            # With --api-key the control endpoints need it too.
            assert (await http.get("/_emulator/stats")).status_code == 401
            stats = (await http.get("/_emulator/stats", headers={"Authorization": "Bearer cli-key"})).json()
        assert "validating" in seen and "finalizing" in seen and seen[-1] == "completed"
        assert len(output.splitlines()) == 5
        # The SDK retried its way through the faults the flags asked for.
        assert stats["faults_served"]["total"] >= 1
        assert set(stats["faults_served"]) <= {"total", "429", "503"}
    finally:
        assert await emulator.stop() == 0


def anthropic_sdk_batches(base_url: str) -> tuple[list[str], dict[str, str], list[str], str]:
    """create → poll → list → results, then a second batch cancelled, as a plain SDK user does."""
    params = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with Anthropic(api_key="cli-key", base_url=f"{base_url}/anthropic", max_retries=5) as client:
        batch = client.messages.batches.create(
            requests=[{"custom_id": f"r{i}", "params": params} for i in range(3)]  # type: ignore[typeddict-item]
        )
        seen: list[str] = [batch.processing_status]
        while batch.processing_status != "ended":
            batch = client.messages.batches.retrieve(batch.id)
            seen.append(batch.processing_status)
        results = {r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)}
        other = client.messages.batches.create(
            requests=[{"custom_id": "late", "params": params}]  # type: ignore[typeddict-item]
        )
        listed = [b.id for b in client.messages.batches.list(limit=20)]
        cancelled = client.messages.batches.cancel(other.id)
        return seen, dict(results), listed, str(cancelled.processing_status) + ":" + other.id


async def test_the_command_serves_anthropic_to_the_official_sdk(tmp_path: Path) -> None:
    emulator = EmulatorProcess(tmp_path, "--api-key", "cli-key", "--validating-s", "0.3")
    try:
        url = await emulator.started()
        seen, results, listed, cancelled = await anyio.to_thread.run_sync(anthropic_sdk_batches, url)
        assert seen[0] == "in_progress" and seen[-1] == "ended"
        assert results == {"r0": "succeeded", "r1": "succeeded", "r2": "succeeded"}
        status, other_id = cancelled.split(":")
        # Validating for 0.3 s: the second batch is still running, so the cancel is accepted.
        assert status in ("canceling", "ended") and listed[0] == other_id and len(listed) == 2
    finally:
        assert await emulator.stop() == 0


def gemini_sdk_batches(base_url: str, input_path: Path) -> tuple[list[str], list[str], list[str], str]:
    """upload → create → poll → download, then an inline batch cancelled, as a plain SDK user does."""
    options = types.HttpOptions(
        base_url=f"{base_url}/gemini", timeout=30_000, retry_options=types.HttpRetryOptions(attempts=5)
    )
    with genai.Client(api_key="cli-key", http_options=options) as client:
        uploaded = client.files.upload(file=input_path, config={"mime_type": "jsonl"})
        assert uploaded.name is not None
        job = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
        assert job.name is not None
        seen: list[str] = [job.state.value if job.state else ""]
        while job.state not in (types.JobState.JOB_STATE_SUCCEEDED, types.JobState.JOB_STATE_FAILED):
            job = client.batches.get(name=job.name)
            seen.append(job.state.value if job.state else "")
        assert job.dest is not None and job.dest.file_name is not None
        keys = sorted(line["key"] for line in parse_jsonl(client.files.download(file=job.dest.file_name)))
        late: list[types.InlinedRequestDict] = [{"contents": [{"parts": [{"text": "late"}]}]}]
        other = client.batches.create(model="gemini-2.5-flash", src=late)
        assert other.name is not None
        listed = [str(batch.name) for batch in client.batches.list(config={"page_size": 1})]
        client.batches.cancel(name=other.name)
        cancelled = client.batches.get(name=other.name)
        return seen, keys, listed, f"{cancelled.state.value if cancelled.state else ''}:{other.name}"


async def test_the_command_serves_gemini_to_the_official_sdk(tmp_path: Path) -> None:
    input_path = tmp_path / "in.jsonl"
    input_path.write_bytes(to_jsonl([gemini_line(f"r{i}") for i in range(3)]))
    emulator = EmulatorProcess(tmp_path, "--api-key", "cli-key", "--validating-s", "0.3")
    try:
        url = await emulator.started()
        seen, keys, listed, cancelled = await anyio.to_thread.run_sync(gemini_sdk_batches, url, input_path)
        assert seen[0] == "JOB_STATE_PENDING" and seen[-1] == "JOB_STATE_SUCCEEDED"
        assert keys == ["r0", "r1", "r2"]
        state, other_name = cancelled.split(":", 1)
        # Validating for 0.3 s: the second batch has not run, so the cancel takes it.
        assert state == "JOB_STATE_CANCELLED" and listed[0] == other_name and len(listed) == 2
    finally:
        assert await emulator.stop() == 0


async def test_a_killed_emulator_resumes_its_upstream_batch_without_resending(tmp_path: Path) -> None:
    lines = [request_line(f"req-{i:04d}", f"question {i}") for i in range(REQUESTS)]
    victim: list[EmulatorProcess] = []

    async def kill_half_way(number: int) -> None:
        if number == REQUESTS // 2:
            os.kill(victim[0].proc.pid, signal.SIGKILL)

    upstream = CountingUpstream(on_request=kill_half_way)
    async with serve_emulator(upstream.app()) as upstream_url:
        flags = ("--upstream-url", upstream_url, "--concurrency", "16")
        victim.append(EmulatorProcess(tmp_path, *flags))
        async with httpx.AsyncClient(base_url=await victim[0].started(), auth=BearerAuth("k")) as client:
            batch_id = (await openai_create(client, await openai_upload(client, to_jsonl(lines))))["id"]
        assert await victim[0].exited() == -signal.SIGKILL

        # What the killed emulator had made durable: those requests must never be sent again.
        durable = recover_spool(tmp_path / "data" / "spool" / f"{batch_id}.jsonl").answered
        assert len(durable) >= REQUESTS // 2 - MAX_RESENT
        survivor = EmulatorProcess(tmp_path, *flags)
        try:
            async with httpx.AsyncClient(base_url=await survivor.started(), auth=BearerAuth("k")) as client:
                batch = await openai_wait(client, batch_id, timeout=60)
                output = await openai_download(client, batch["output_file_id"])
        finally:
            assert await survivor.stop() == 0

    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == REQUESTS
    assert sorted(line["custom_id"] for line in output) == [line["custom_id"] for line in lines]
    for i in range(REQUESTS):
        if custom_id_hash(f"req-{i:04d}") in durable:
            assert upstream.received[f"question {i}"] == 1
    sent_twice = [text for text, count in upstream.received.items() if count > 1]
    assert max(upstream.received.values()) == 2 or not sent_twice
    assert len(sent_twice) <= MAX_RESENT and len(upstream.received) == REQUESTS
