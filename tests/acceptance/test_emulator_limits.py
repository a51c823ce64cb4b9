"""`batchd emulator` as a process: no binding beyond loopback without --api-key, and bodies far over
--max-body-bytes refused with 413 while the process's memory stays where it was."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.acceptance.test_emulator_cli import EmulatorProcess
from tests.integration.emulator_helpers import BearerAuth, request_line, run_batch, to_jsonl, upload

CAP = 1_000_000
#: Each oversized body claims (or streams) this much: a thousand times the cap.
HUGE = 1 << 30
#: How much the peak memory may grow while the bodies are refused: a small fraction of one body.
MEMORY_SLACK = 64 << 20
FORM = "multipart/form-data; boundary=x"
FORM_START = b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "emulator.example.com"])
async def test_binding_beyond_loopback_without_an_api_key_is_a_usage_error(tmp_path: Path, host: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    command = [sys.executable, "-m", "batchd", "emulator", "--host", host, "--port", "0"]
    done = await anyio.run_process([*command, "--data-dir", str(tmp_path / "data")], env=env, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert host in line and "--api-key" in line and "BATCHD_EMULATOR_API_KEY" in line
    assert not (tmp_path / "data").exists()


async def test_beyond_loopback_with_a_key_every_route_needs_it(tmp_path: Path) -> None:
    emulator = EmulatorProcess(tmp_path, "--host", "0.0.0.0", env={"BATCHD_EMULATOR_API_KEY": "wide-key"})
    try:
        url = await emulator.started()
        async with httpx.AsyncClient(base_url=url) as http:
            for path in ("/v1/batches", "/openai/v1/files", "/_emulator/stats"):
                assert (await http.get(path)).status_code == 401
                assert (await http.get(path, headers={"Authorization": "Bearer other"})).status_code == 401
                assert (await http.get(path, headers={"Authorization": "Bearer wide-key"})).status_code == 200
            assert (await http.post("/_emulator/pause")).status_code == 401
        assert "wide-key" not in emulator.log_path.read_text()
    finally:
        assert await emulator.stop() == 0


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def huge_body(start: bytes = b"") -> Iterator[bytes]:
    """HUGE bytes from a generator: never in memory here either."""
    yield start
    block = b"x" * (1 << 20)
    for _ in range(HUGE // len(block)):
        yield block


def send_huge(base_url: str, method: str, path: str, declared: bool) -> int:
    """One huge body, declared (Content-Length) or chunked, with the synchronous client (it reads
    the answer of a server that stopped reading); the status it got."""
    # The upload URL carries its signature and refuses an Authorization header.
    headers = {} if "/_emulator/upload/" in path else {"Authorization": "Bearer k"}
    start = b""
    if path.endswith("/files"):
        headers["Content-Type"] = FORM
        start = FORM_START
    if declared:
        headers["Content-Length"] = str(len(start) + HUGE)
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False) as client:
        return client.request(method, path, content=huge_body(start)).status_code


async def test_bodies_far_over_the_cap_get_413_and_memory_does_not_grow(tmp_path: Path) -> None:
    emulator = EmulatorProcess(tmp_path, "--max-body-bytes", str(CAP))
    try:
        url = await emulator.started()
        async with httpx.AsyncClient(base_url=url, auth=BearerAuth("k")) as client:
            # Warm up every route (imports, first parses), then measure from there.
            await run_batch(client, [request_line("warm-up")])
            started = await client.post(
                "/v1/files",
                files={"purpose": (None, "batch-api"), "file_name": (None, "big.jsonl"),
                       "file_type": (None, "jsonl"), "checksum": (None, hashlib.sha256(b"x").hexdigest())},
            )  # fmt: skip
            presigned = started.headers["location"]
            assert await anyio.to_thread.run_sync(send_huge, url, "POST", "/_emulator/faults", True) == 413
            before = peak_rss(emulator.proc.pid)

            routes = [
                ("POST", "/v1/batches"),
                ("POST", "/v1/files"),
                ("POST", "/openai/v1/batches"),
                ("POST", "/openai/v1/files"),
                ("POST", "/_emulator/faults"),
                ("PUT", presigned),
            ]
            for method, path in routes:
                for declared in (True, False):
                    status = await anyio.to_thread.run_sync(send_huge, url, method, path, declared)
                    assert status == 413, (method, path, declared)
            grown = peak_rss(emulator.proc.pid) - before
            print(f"peak RSS {before / 2**20:.1f} MiB before, grew {grown / 2**20:.2f} MiB over 12 bodies of 1 GiB")
            assert grown < MEMORY_SLACK, f"peak memory grew by {grown} bytes"

            # Still serving, and nothing of the refused uploads was kept.
            assert list((tmp_path / "data" / "tmp").iterdir()) == []
            file_id = await upload(client, to_jsonl([request_line("after")]), name="after.jsonl")
            job, output, _ = await run_batch(client, [request_line("after-2")])
            assert file_id and job["status"] == "COMPLETED" and len(output) == 1
    finally:
        assert await emulator.stop() == 0
