"""The real `batchd run` with provider.kind = "local": its embedded backend on a loopback port
answers only to the token of this start (0600 in the state directory), refuses oversized and
malformed bodies, and the daemon keeps running and taking new work through all of it."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest

from tests.acceptance.conftest import (
    DaemonProcess,
    Emulator,
    Workspace,
    chat,
    eventually,
    local_backend,
    read_jsonl,
)
from tests.databases import database_url

pytestmark = pytest.mark.each_database

#: The body cap the test configures (the default is 100 MB and a bit; see test_config).
CAP = 2_000_000
HUGE = 1 << 30


def local_workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    url = database_url(root / "state" / "batchd.db")
    config = root / "batchd.toml"
    config.write_text(
        f"""
state_dir = "state"
database_url = "{url}"

[provider]
kind = "local"
max_batch_bytes = 1000000

[local]
max_body_bytes = {CAP}

[inbox]
settle_s = 0.2
rescan_s = 1.0

[polling]
min_interval_s = 0.2
max_interval_s = 1.0
""",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    return Workspace(root, config, env, url)


def job_json(ws: Workspace, name: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads((ws.outbox / name / "job.json").read_text(encoding="utf-8"))
    return parsed


async def finished(ws: Workspace, name: str, daemon: DaemonProcess) -> dict[str, Any]:
    """The job's job.json once its results are in the outbox (the daemon must stay up meanwhile)."""

    def done() -> bool:
        assert daemon.proc.poll() is None, daemon.log_path.read_text()
        return (ws.outbox / name / "job.json").exists()

    await eventually(done, 60, f"{name} in the outbox")
    return job_json(ws, name)


def huge(start: bytes = b"") -> Iterator[bytes]:
    yield start
    block = b"x" * (1 << 20)
    for _ in range(HUGE // len(block)):
        yield block


def send_huge(url: str, method: str, headers: dict[str, str], declared: bool) -> httpx.Response:
    """A 1 GiB body from a generator, with the synchronous client (it reads the answer of a server
    that stopped reading; the async one cannot once its write failed)."""
    start = b""
    if url.endswith("/files"):
        headers = {**headers, "Content-Type": "multipart/form-data; boundary=x"}
        start = b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    if declared:
        headers = {**headers, "Content-Length": str(len(start) + HUGE)}
    with httpx.Client(trust_env=False) as client:
        return client.request(method, url, content=huge(start), headers=headers)


async def test_the_local_backend_answers_only_its_token_and_refuses_what_could_harm_it(tmp_path: Path) -> None:
    ws = local_workspace(tmp_path)
    daemon = DaemonProcess(ws)
    try:
        await daemon.until_logged("daemon.ready")
        ws.drop("before.jsonl", [chat(f"b-{i}", f"question {i}") for i in range(3)])
        before = await finished(ws, "before", daemon)
        assert before["status"] == "completed"

        token_file = ws.root / "state" / "local" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        async with httpx.AsyncClient(trust_env=False) as http:
            backend = local_backend(ws, daemon, http)
            assert backend.url.startswith("http://127.0.0.1:") and backend.token
            await unauthenticated_requests_see_nothing(backend, http)
            await oversized_and_malformed_bodies_are_refused(backend, http)
            # With the token, the control routes work (the tests' rig reads it from the state directory).
            assert (await backend.control("GET", "stats"))["paused"] is False

        # The daemon is still running and takes new work.
        assert daemon.proc.poll() is None
        sent = [chat(f"a-{i}", f"again {i}") for i in range(4)]
        ws.drop("after.jsonl", sent)
        after = await finished(ws, "after", daemon)
        assert after["status"] == "completed"
        answered = read_jsonl(ws.outbox / "after" / "output.jsonl")
        assert [line["custom_id"] for line in answered] == [line["custom_id"] for line in sent]

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        # The token never reached the log, and a restart makes a new one.
        assert backend.token not in daemon.log_path.read_text(encoding="utf-8")
        again = DaemonProcess(ws)
        await again.until_logged("daemon.ready")
        assert token_file.read_text(encoding="ascii").strip() != backend.token
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0
    finally:
        daemon.kill()


async def unauthenticated_requests_see_nothing(backend: Emulator, http: httpx.AsyncClient) -> None:
    """Without this start's token: 401 on the API, on file content and on every control route."""
    bearer = {"Authorization": f"Bearer {backend.token}"}
    batches = (await http.get(f"{backend.url}/v1/batches", headers=bearer)).json()
    files = (await http.get(f"{backend.url}/v1/files", headers=bearer)).json()["data"]
    assert batches and files
    batch_id = batches[0]["id"]
    file_ids = [f["id"] for f in files]
    secrets = [batch_id, *file_ids, "b-0", "question 0"]
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/batches", {}),
        ("GET", f"/v1/batches/{batch_id}", {}),
        ("GET", "/v1/files", {}),
        *[("GET", f"/v1/files/{file_id}/content", {}) for file_id in file_ids],
        ("GET", "/openai/v1/batches", {}),
        ("GET", f"/openai/v1/files/{file_ids[0]}/content", {}),
        ("POST", f"/v1/batches/{batch_id}/cancel", {}),
        ("GET", "/_emulator/stats", {}),
        ("GET", "/_emulator/faults", {}),
        ("POST", "/_emulator/faults", {"json": {"method": "POST", "path": "/v1/batches", "status": 500}}),
        ("POST", "/_emulator/pause", {}),
    ]
    for method, path, extra in requests:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {backend.token}"}):
            answer = await http.request(method, f"{backend.url}{path}", headers=headers, **extra)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert not [s for s in secrets if s in answer.text], (path, answer.text)
    # None of it took: no fault pending, not paused.
    assert await backend.control("GET", "faults") == {"faults": []}
    assert (await backend.control("GET", "stats"))["paused"] is False


async def oversized_and_malformed_bodies_are_refused(backend: Emulator, http: httpx.AsyncClient) -> None:
    """Bodies over [local] max_body_bytes: 413 (declared: before a byte is read); bad JSON: 400."""
    bearer = {"Authorization": f"Bearer {backend.token}"}
    for path in ("/v1/files", "/v1/batches", "/_emulator/faults"):
        for headers in (bearer, {}):
            for declared in (True, False):
                url = f"{backend.url}{path}"
                answer = await anyio.to_thread.run_sync(send_huge, url, "POST", headers, declared)
                # Without the token, a body of unknown length is refused for that, unread.
                expected = 413 if headers or declared else 401
                assert answer.status_code == expected, (path, headers, declared, answer.text)
                assert answer.headers["connection"] == "close"
    for body in (b"{", b"[]", ("[" * 100_000).encode(), ("[" * 65 + "]" * 65).encode()):
        answer = await http.post(f"{backend.url}/v1/batches", content=body, headers=bearer)
        assert answer.status_code == 400 and isinstance(answer.json()["error"], str), answer.text
