"""The seed document's usage examples, run against batchd's emulator over loopback.

`Client()` in the examples reads TOGETHER_API_KEY and TOGETHER_BASE_URL, set
here, so even the constructor line is the seed's own. The examples write their
files into the current folder, which is the test's tmp_path.
"""

from __future__ import annotations

import ast
import inspect
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from batchd import AsyncClient, Client
from batchd.emulator import create_app, serve_emulator
from tests.integration.seed_examples import ASYNC, SYNC

KEY = "seed-example-key"


def run_block(name: str, source: str, namespace: dict[str, Any]) -> None:
    exec(compile(source, f"<seed example: {name}>", "exec"), namespace)


async def run_async_block(name: str, source: str, namespace: dict[str, Any]) -> None:
    code = compile(source, f"<seed example: {name} (async)>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        await result


async def wait_until_completed(client: AsyncClient, batch_id: str) -> None:
    with anyio.fail_after(20):
        while (await client.batches.get_batch(batch_id)).status != "completed":  # noqa: ASYNC110 - polled over HTTP
            await anyio.sleep(0.02)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def emulator_in_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The emulator on its own event loop in a thread: the sync examples block the test's thread."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(serve_emulator(create_app(tmp_path / "emulator"))) as url,
    ):
        monkeypatch.setenv("TOGETHER_API_KEY", KEY)
        monkeypatch.setenv("TOGETHER_BASE_URL", url)
        yield url


def check_output(out: str, work: Path) -> None:
    """What every run of the four examples must have printed and written."""
    assert "Batch job created: " in out
    assert "Status: validating" in out
    assert "Batch processing completed!" in out
    assert "Results downloaded to batch_results.jsonl" in out
    assert "Created batch job for 1000 documents: " in out
    assert "Total results: 2\nSuccessful: 2\nFailed: 0\nSample responses:\n" in out
    assert "request-1: echo: What is AI?..." in out
    assert "request-2: echo: Explain machine learning..." in out
    results = lines(work / "batch_results.jsonl")
    assert {r["custom_id"] for r in results} == {"request-1", "request-2"}
    assert len(lines(work / "batch_texts_1000.jsonl")) == 1000


def test_seed_examples_sync(emulator_in_thread: str, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = emulator_in_thread
    real_sleep = time.sleep
    slept: list[float] = []

    def example_sleep(seconds: float) -> None:
        # The monitoring example waits a minute between polls; a test cannot. The first wait
        # lets the paused emulator go on, then every wait is a short real one, so the
        # example's own loop is what sees the batch finish.
        if threading.current_thread() is not threading.main_thread():
            real_sleep(seconds)
            return
        slept.append(seconds)
        if len(slept) == 1:
            control.post(f"{url}/_emulator/resume").raise_for_status()
        real_sleep(0.02)

    namespace: dict[str, Any] = {"__name__": "__seed__"}
    with httpx.Client(trust_env=False) as control, pytest.MonkeyPatch.context() as patch:
        # Paused: the batch is still validating when the monitor first looks, so it waits at least once.
        control.post(f"{url}/_emulator/pause").raise_for_status()
        patch.setattr(time, "sleep", example_sleep)
        try:
            for name, source in SYNC.items():
                run_block(name, source, namespace)
        finally:
            client = namespace.get("client")
            if isinstance(client, Client):
                client.close()
        stats = control.get(f"{url}/_emulator/stats").json()

    assert slept and set(slept) == {60}
    check_output(capsys.readouterr().out, in_tmp)
    assert len(stats["batch_creates"]) == 2
    assert stats["requests"]["POST /v1/batches"] == 2


async def test_seed_examples_async(
    tmp_path: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, Any] = {"__name__": "__seed__"}
    async with serve_emulator(create_app(tmp_path / "emulator")) as url:
        monkeypatch.setenv("TOGETHER_API_KEY", KEY)
        monkeypatch.setenv("TOGETHER_BASE_URL", url)
        async with httpx.AsyncClient(trust_env=False) as control:
            await control.post(f"{url}/_emulator/pause")
            try:
                await run_async_block("basic", ASYNC["basic"], namespace)
                await control.post(f"{url}/_emulator/resume")
                # The async monitor sleeps a minute between polls (asyncio.sleep, which this
                # event loop and the emulator in it share, so it is not patched): the test
                # waits for the batch to end first, and the monitor's first look sees it done.
                client = namespace["client"]
                assert isinstance(client, AsyncClient)
                await wait_until_completed(client, namespace["batch"].id)
                for name in ("monitor", "large", "results"):
                    await run_async_block(name, ASYNC[name], namespace)
            finally:
                client = namespace.get("client")
                if isinstance(client, AsyncClient):
                    await client.close()
    out = capsys.readouterr().out
    check_output(out, in_tmp)
    # The monitor looked once and found the batch done.
    assert out.count("Status: completed") == 1
