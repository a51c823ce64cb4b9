"""The emulator's injected faults beyond statuses: dropped connections, slow answers, latency,
the seeded random mode, and their counts in /_emulator/stats."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchd.emulator import RandomFaults, create_app, serve_emulator
from batchd.emulator.faults import FaultSpecError
from tests.integration.emulator_helpers import (
    CHAT,
    OPENAI,
    BearerAuth,
    asgi_emulator,
    http_emulator,
    openai_upload,
    request_line,
    to_jsonl,
)


async def served(client: httpx.AsyncClient) -> dict[str, int]:
    counts: dict[str, int] = (await client.get("/_emulator/stats")).json()["faults_served"]
    return counts


async def test_a_dropped_connection_gets_no_response_at_all(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        await client.post("/_emulator/faults", json={"method": "GET", "path": "/v1/batches", "drop": True})
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get("/v1/batches")
        assert (await client.get("/v1/batches")).status_code == 200
        assert await served(client) == {"total": 1, "drop": 1}


async def test_a_dropped_answer_after_acting_loses_only_the_answer(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        file_id = await openai_upload(client, to_jsonl([request_line("a")]))
        fault = {"method": "POST", "path": f"{OPENAI}/batches", "drop": True, "act": True}
        await client.post("/_emulator/faults", json=fault)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(
                f"{OPENAI}/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            )
        listed = (await client.get(f"{OPENAI}/batches")).json()["data"]
        assert [b["input_file_id"] for b in listed] == [file_id]


async def test_in_process_a_drop_raises_what_a_client_would_see(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/faults", json={"method": "GET", "path": "/v1/files", "drop": True})
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/v1/files")


async def test_slow_answers_and_latency(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        await client.post("/_emulator/faults", json={"method": "GET", "path": "/v1/batches", "delay_s": 0.3})
        started = time.monotonic()
        assert (await client.get("/v1/batches")).status_code == 200  # slow, then the real answer
        assert time.monotonic() - started >= 0.3

        slow_error = {"method": "GET", "path": "/v1/batches", "delay_s": 0.3, "status": 503}
        await client.post("/_emulator/faults", json=slow_error)
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/v1/batches", timeout=0.05)

        listing = (await client.post("/_emulator/faults", json={"latency_s": 0.2})).json()
        assert listing["latency_s"] == 0.2
        started = time.monotonic()
        assert (await client.get("/v1/files")).status_code == 200
        assert time.monotonic() - started >= 0.2
        assert (await client.delete("/_emulator/faults")).json() == {"faults": []}
        assert await served(client) == {"total": 2, "delay": 1, "503": 1}


async def _statuses(tmp_path: Path, spec: dict[str, Any], count: int) -> list[int]:
    async with asgi_emulator(tmp_path) as client:
        posted = await client.post("/_emulator/faults", json=spec)
        assert posted.json()["random"] == {"retry_after": None, "seed": None, **spec}
        statuses = [(await client.get("/v1/batches")).status_code for _ in range(count)]
        # Control endpoints are never faulted, even at rate 1.
        await client.post("/_emulator/faults", json={"rate": 1.0})
        assert (await client.get("/_emulator/stats")).status_code == 200
        assert (await client.get("/v1/batches")).status_code in (429, 500, 503)
        await client.delete("/_emulator/faults")
        assert (await client.get("/v1/batches")).status_code == 200
    return statuses


async def test_random_faults_are_seeded_and_counted(tmp_path: Path) -> None:
    spec = {"rate": 0.3, "statuses": [429, 503], "retry_after": 1, "seed": 7}
    first = await _statuses(tmp_path / "one", spec, 60)
    second = await _statuses(tmp_path / "two", spec, 60)
    assert first == second  # the same seed, the same requests: the same faults
    failures = [s for s in first if s != 200]
    assert set(failures) == {429, 503} and 8 <= len(failures) <= 30

    async with asgi_emulator(tmp_path / "three") as client:
        await client.post("/_emulator/faults", json=spec)
        answers = [await client.get(f"{OPENAI}/batches") for _ in range(40)]
        faulted = [a for a in answers if a.status_code != 200]
        assert faulted and all(a.headers["retry-after"] == "1" for a in faulted)
        assert all(set(a.json()["error"]) == {"message", "type", "param", "code"} for a in faulted)
        counts = await served(client)
        assert counts["total"] == len(faulted) == counts.get("429", 0) + counts.get("503", 0)


async def test_random_drops_over_a_real_socket(tmp_path: Path) -> None:
    app = create_app(tmp_path, random_faults=RandomFaults(rate=1.0, statuses=("drop",), seed=1))
    async with serve_emulator(app) as url, httpx.AsyncClient(base_url=url, auth=BearerAuth("k")) as client:
        for _ in range(3):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/v1/batches")
        assert (await client.get("/_emulator/faults")).json()["random"]["statuses"] == ["drop"]
        assert await served(client) == {"total": 3, "drop": 3}


@pytest.mark.parametrize(
    "spec",
    [
        {"rate": 1.5},
        {"rate": 0.2, "statuses": [200]},
        {"rate": 0.2, "statuses": []},
        {"rate": 0.2, "seed": "x"},
        {"rate": 0.2, "surprise": True},
        {"latency_s": -1},
        {"method": "GET", "path": "/v1/batches", "drop": True, "status": 500},
        {"method": "GET", "path": "/v1/batches", "delay_s": "slow"},
        {"method": "GET", "path": "/v1/batches", "drop": "yes"},
    ],
)
async def test_malformed_faults_are_refused(tmp_path: Path, spec: dict[str, Any]) -> None:
    async with asgi_emulator(tmp_path) as client:
        assert (await client.post("/_emulator/faults", json=spec)).status_code == 400
        assert (await client.get("/_emulator/faults")).json() == {"faults": []}


def test_random_faults_check_their_arguments() -> None:
    with pytest.raises(FaultSpecError):
        RandomFaults(rate=-0.1)
    with pytest.raises(FaultSpecError):
        RandomFaults(rate=0.1, statuses=(302,))
    assert RandomFaults(rate=0.0).draw("GET", "/v1/batches") is None
