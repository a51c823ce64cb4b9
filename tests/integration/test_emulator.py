"""The emulator's Together dialect, triggers, control endpoints and persistence."""

from __future__ import annotations

import hashlib
import logging
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from batchd.emulator import EchoEngine, create_app, serve_emulator
from batchd.models import BatchEndpoint
from tests.integration.emulator_helpers import (
    CHAT,
    NO_AUTH,
    BearerAuth,
    HoldEngine,
    asgi_emulator,
    create_batch,
    download,
    http_emulator,
    request_line,
    run_batch,
    to_jsonl,
    upload,
    wait_for_batch,
)

# The together SDK refuses file ids that do not match this (together/lib/resources/files.py).
SDK_SAFE_FILE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BATCH_JOB_KEYS = {
    "id",
    "user_id",
    "input_file_id",
    "file_size_bytes",
    "status",
    "job_deadline",
    "created_at",
    "endpoint",
    "progress",
    "model_id",
    "output_file_id",
    "error_file_id",
    "error",
    "completed_at",
}


class RecordingEngine:
    """Echo that remembers the bodies it was given."""

    def __init__(self) -> None:
        self.echo = EchoEngine()
        self.bodies: list[dict[str, Any]] = []

    async def respond(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.bodies.append(body)
        return await self.echo.respond(endpoint, body)


def upload_form(data: bytes, name: str = "batch.jsonl") -> dict[str, tuple[None, str]]:
    return {
        "purpose": (None, "batch-api"),
        "file_name": (None, name),
        "file_type": (None, "jsonl"),
        "checksum": (None, hashlib.sha256(data).hexdigest()),
    }


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["custom_id"] for line in lines]


# -- files --------------------------------------------------------------------


async def test_three_step_upload_by_hand(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a"), request_line("b")])
    async with asgi_emulator(tmp_path) as client:
        started = await client.post("/v1/files", files=upload_form(data))
        assert started.status_code == 302
        file_id = started.headers["x-together-file-id"]
        assert file_id.startswith("file-") and SDK_SAFE_FILE_ID.match(file_id)
        location = httpx.URL(started.headers["location"])
        assert location.is_absolute_url
        assert location.path == f"/_emulator/upload/{file_id}" and location.params["signature"]

        pending = (await client.get(f"/v1/files/{file_id}")).json()
        assert pending["Processed"] is False
        not_yet = await client.post(f"/v1/files/{file_id}/preprocess")
        assert not_yet.status_code == 400

        put = await client.put(location, content=data, auth=NO_AUTH)
        assert put.status_code == 200
        done = await client.post(f"/v1/files/{file_id}/preprocess")
        assert done.status_code == 200
        record = done.json()
        assert isinstance(record.pop("created_at"), int)
        assert record == {
            "id": file_id,
            "object": "file",
            "filename": "batch.jsonl",
            "bytes": len(data),
            "purpose": "batch-api",
            "FileType": "jsonl",
            "LineCount": 2,
            "Processed": True,
        }
        listing = (await client.get("/v1/files")).json()
        assert listing["object"] == "list" and [f["id"] for f in listing["data"]] == [file_id]
        assert (await client.get(f"/v1/files/{file_id}/content")).content == data
        assert (await client.get("/v1/files/file-unknown")).status_code == 404
        assert (await client.post("/v1/files/file-unknown/preprocess")).status_code == 404


async def test_same_checksum_answers_409_with_the_processed_file(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a")])
    async with asgi_emulator(tmp_path) as client:
        # A file that never got its content is not reused: each try gets a fresh id.
        first = await client.post("/v1/files", files=upload_form(data))
        second = await client.post("/v1/files", files=upload_form(data))
        assert first.status_code == second.status_code == 302
        assert first.headers["x-together-file-id"] != second.headers["x-together-file-id"]

        file_id = await upload(client, data)
        again = await client.post("/v1/files", files=upload_form(data, name="other-name.jsonl"))
        assert again.status_code == 409
        assert again.json() == {"file_id": file_id}


async def test_the_checksum_reuse_survives_a_restart_and_ends_with_the_file(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a")])
    async with asgi_emulator(tmp_path) as client:
        file_id = await upload(client, data)
    async with asgi_emulator(tmp_path) as client:
        # Read back from disk: the same bytes still answer 409 with the stored file.
        again = await client.post("/v1/files", files=upload_form(data))
        assert again.status_code == 409 and again.json() == {"file_id": file_id}
        assert (await client.delete(f"/v1/files/{file_id}")).status_code == 200
        # Deleted: the same bytes are a new file, stored anew.
        fresh = await client.post("/v1/files", files=upload_form(data))
        assert fresh.status_code == 302 and fresh.headers["x-together-file-id"] != file_id
        assert await upload(client, data) != file_id


async def test_presigned_put_refuses_an_authorization_header(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a")])
    async with asgi_emulator(tmp_path) as client:
        started = await client.post("/v1/files", files=upload_form(data))
        location = started.headers["location"]
        leaked = await client.put(location, content=data)  # the client's auth adds the API key
        assert leaked.status_code == 400
        assert b"InvalidArgument" in leaked.content
        assert (await client.put(location, content=data, auth=NO_AUTH)).status_code == 200


async def test_presigned_put_refuses_a_checksum_mismatch_and_a_bad_signature(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a")])
    async with asgi_emulator(tmp_path) as client:
        started = await client.post("/v1/files", files=upload_form(data))
        file_id = started.headers["x-together-file-id"]
        location = httpx.URL(started.headers["location"])

        wrong = await client.put(location, content=data + b"tampered", auth=NO_AUTH)
        assert wrong.status_code == 400 and b"BadDigest" in wrong.content
        assert (await client.post(f"/v1/files/{file_id}/preprocess")).status_code == 400

        forged = await client.put(location.copy_set_param("signature", "0" * 64), content=data, auth=NO_AUTH)
        assert forged.status_code == 403


async def test_direct_multipart_upload(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a"), request_line("b"), request_line("c")])
    async with asgi_emulator(tmp_path) as client:
        answer = await client.post("/v1/files", files={"purpose": (None, "batch-api"), "file": ("direct.jsonl", data)})
        assert answer.status_code == 200
        record = answer.json()
        assert record["Processed"] is True and record["LineCount"] == 3 and record["bytes"] == len(data)
        assert record["filename"] == "direct.jsonl" and record["FileType"] == "jsonl"
        assert (await client.get(f"/v1/files/{record['id']}/content")).content == data
        bad = await client.post("/v1/files", files={"purpose": (None, "nonsense"), "file": ("x.jsonl", data)})
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


async def test_content_honours_range(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    async with asgi_emulator(tmp_path) as client:
        file_id = await upload(client, data)
        url = f"/v1/files/{file_id}/content"
        whole = await client.get(url)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["content-length"] == str(len(data)) and whole.headers["accept-ranges"] == "bytes"

        tail = await client.get(url, headers={"Range": "bytes=1000-"})
        assert tail.status_code == 206 and tail.content == data[1000:]
        assert tail.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert tail.headers["content-length"] == str(len(data) - 1000)

        middle = await client.get(url, headers={"Range": "bytes=10-19"})
        assert middle.status_code == 206 and middle.content == data[10:20]

        beyond = await client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"

        suffix = await client.get(url, headers={"Range": "bytes=-5"})  # not supported: whole file
        assert suffix.status_code == 200 and suffix.content == data


# -- auth ---------------------------------------------------------------------


async def test_auth_accepts_any_token_unless_an_api_key_is_set(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path / "open") as client:
        assert (await client.get("/v1/batches", auth=BearerAuth("whatever"))).status_code == 200
        missing = await client.get("/v1/batches", auth=None)
        assert missing.status_code == 401
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        assert (await client.get("/v1/files", headers={"Authorization": "Bearer "}, auth=None)).status_code == 401
        # Without an api_key the control endpoints are open (a developer's emulator on loopback).
        assert (await client.get("/_emulator/stats", auth=None)).status_code == 200

    async with asgi_emulator(tmp_path / "locked", api_key="sekret") as client:
        assert (await client.get("/v1/batches", auth=BearerAuth("wrong"))).status_code == 401
        assert (await client.get("/v1/batches", auth=BearerAuth("sekret"))).status_code == 200
        basic = await client.get("/v1/batches", headers={"Authorization": "Basic sekret"}, auth=None)
        assert basic.status_code == 401
        # With one, every route needs it: the control endpoints too.
        assert (await client.get("/_emulator/stats", auth=None)).status_code == 401
        assert (await client.get("/_emulator/stats", auth=BearerAuth("wrong"))).status_code == 401
        assert (await client.get("/_emulator/stats", auth=BearerAuth("sekret"))).status_code == 200


# -- batches ------------------------------------------------------------------


async def test_create_get_list_and_errors(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        file_id = await upload(client, to_jsonl([request_line("a")]))
        created = await client.post(
            "/v1/batches",
            json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "model_id": "m"},
        )
        assert created.status_code == 201
        body = created.json()
        assert body["warning"] is None
        job = body["job"]
        assert set(job) == BATCH_JOB_KEYS
        assert job["status"] == "VALIDATING" and job["input_file_id"] == file_id and job["model_id"] == "m"
        assert job["endpoint"] == CHAT and job["output_file_id"] is None and job["completed_at"] is None
        created_at = datetime.fromisoformat(job["created_at"])
        assert datetime.fromisoformat(job["job_deadline"]) - created_at == timedelta(hours=24)

        second = await create_batch(client, file_id)
        listing = (await client.get("/v1/batches")).json()
        assert isinstance(listing, list)
        assert [b["id"] for b in listing] == [second, job["id"]]  # newest first
        fetched = (await client.get(f"/v1/batches/{job['id']}")).json()
        assert fetched["id"] == job["id"] and set(fetched) == BATCH_JOB_KEYS

        missing = await client.get("/v1/batches/00000000-0000-0000-0000-000000000000")
        assert missing.status_code == 404 and isinstance(missing.json()["error"], str)
        for bad in (
            {"input_file_id": "file-unknown", "endpoint": CHAT},
            {"input_file_id": file_id, "endpoint": "/v1/images/generations"},
            {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "soon"},
        ):
            refused = await client.post("/v1/batches", json=bad)
            assert refused.status_code == 400 and isinstance(refused.json()["error"], str)

        started = await client.post("/v1/files", files=upload_form(b"{}\n"))
        unprocessed = started.headers["x-together-file-id"]
        refused = await client.post("/v1/batches", json={"input_file_id": unprocessed, "endpoint": CHAT})
        assert refused.status_code == 400


async def test_results_are_not_in_input_order_but_each_custom_id_appears_once(tmp_path: Path) -> None:
    lines = [request_line(f"req-{i:03d}", f"text {i}") for i in range(30)]
    async with asgi_emulator(tmp_path) as client:
        job, output, errors = await run_batch(client, lines)
    assert job["status"] == "COMPLETED" and job["progress"] == 100.0 and job["completed_at"] is not None
    assert job["error_file_id"] is None and errors == []
    got = ids(output)
    assert sorted(got) == ids(lines) and got != ids(lines)
    assert got == sorted(got, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    first = output[0]
    assert set(first) == {"custom_id", "response"} and first["response"]["status_code"] == 200
    number = first["custom_id"].removeprefix("req-").lstrip("0") or "0"
    assert first["response"]["body"]["choices"][0]["message"]["content"] == f"echo: text {number}"


async def test_completions_and_embeddings_endpoints(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        endpoint = BatchEndpoint.COMPLETIONS
        job, output, _ = await run_batch(client, [request_line("c", "once upon", endpoint=endpoint)], endpoint)
        assert job["status"] == "COMPLETED"
        assert output[0]["response"]["body"]["choices"][0]["text"] == "echo: once upon"

        endpoint = BatchEndpoint.EMBEDDINGS
        lines = [request_line("e1", "same", endpoint=endpoint), request_line("e2", "same", endpoint=endpoint)]
        job, output, _ = await run_batch(client, lines, endpoint)
        vectors = [line["response"]["body"]["data"][0]["embedding"] for line in output]
        assert job["status"] == "COMPLETED" and vectors[0] == vectors[1] and len(vectors[0]) == 16


async def test_bad_input_fails_the_batch_at_validation(tmp_path: Path) -> None:
    wrong_url = request_line("b")
    wrong_url["url"] = BatchEndpoint.COMPLETIONS
    cases = {
        "url": [request_line("a"), wrong_url],
        "duplicate": [request_line("a"), request_line("a")],
        "unknown keys": [request_line("a", trigger={"explode": True})],
    }
    async with asgi_emulator(tmp_path) as client:
        for needle, lines in cases.items():
            job, _, _ = await run_batch(client, lines)
            assert job["status"] == "FAILED" and needle in job["error"]
            assert job["output_file_id"] is None and job["error_file_id"] is None
        file_id = await upload(client, b'{"custom_id": "a"\n')
        job = await wait_for_batch(client, await create_batch(client, file_id))
        assert job["status"] == "FAILED" and "line 1" in job["error"]


# -- triggers -----------------------------------------------------------------


async def test_error_status_and_fail_once_triggers(tmp_path: Path) -> None:
    lines = [
        request_line("ok"),
        request_line("bad-model", trigger={"error": "invalid_model"}),
        request_line("server-error", trigger={"status": 500}),
        request_line("flaky", trigger={"fail_once": 503}),
    ]
    async with asgi_emulator(tmp_path) as client:
        job, output, errors = await run_batch(client, lines)
        assert job["status"] == "COMPLETED"
        assert ids(output) == ["ok"]
        by_id = {line["custom_id"]: line for line in errors}
        assert set(by_id) == {"bad-model", "server-error", "flaky"}
        error_line = by_id["bad-model"]
        assert set(error_line) == {"custom_id", "error"} and error_line["error"]["code"] == "invalid_model"
        assert isinstance(error_line["error"]["message"], str)
        assert by_id["server-error"]["response"]["status_code"] == 500
        assert set(by_id["server-error"]["response"]["body"]["error"]) == {"message", "type", "param", "code"}
        assert by_id["flaky"]["response"]["status_code"] == 503

        # The same file again: the flaky request already failed once, so now it succeeds.
        again = await wait_for_batch(client, await create_batch(client, job["input_file_id"]))
        assert sorted(ids(await download(client, again["output_file_id"]))) == ["flaky", "ok"]


async def test_the_engine_never_sees_the_trigger(tmp_path: Path) -> None:
    engine = RecordingEngine()
    async with asgi_emulator(tmp_path, engine=engine) as client:
        await run_batch(client, [request_line("a", trigger={"fail_once": 500})])
        await run_batch(client, [request_line("a", trigger={"fail_once": 500})])
    assert engine.bodies == [{"model": "echo-model", "messages": [{"role": "user", "content": "hello"}]}]


@pytest.mark.parametrize(("trigger", "status"), [("expire_batch", "EXPIRED"), ("fail_batch", "FAILED")])
async def test_stop_triggers_keep_the_lines_before(tmp_path: Path, trigger: str, status: str) -> None:
    lines = (
        [request_line(f"before-{i}") for i in range(3)]
        + [request_line("stop", trigger={trigger: True})]
        + [request_line(f"after-{i}") for i in range(3)]
    )
    async with asgi_emulator(tmp_path) as client:
        job, output, errors = await run_batch(client, lines)
    assert job["status"] == status and job["completed_at"] is not None
    assert sorted(ids(output)) == ["before-0", "before-1", "before-2"] and errors == []
    assert job["progress"] == pytest.approx(100 * 3 / 7, abs=0.01)
    if status == "FAILED":
        assert "line 4" in job["error"]
    else:
        assert job["error"] is None


async def test_completion_window_runs_out_on_the_injected_clock(tmp_path: Path) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def clock() -> datetime:
        return now

    async with asgi_emulator(tmp_path, clock=clock) as client:
        await client.post("/_emulator/pause")
        file_id = await upload(client, to_jsonl([request_line("a")]))
        created = await client.post(
            "/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "1h"}
        )
        job = created.json()["job"]
        assert job["created_at"] == "2026-01-01T00:00:00Z" and job["job_deadline"] == "2026-01-01T01:00:00Z"
        now += timedelta(hours=2)
        await client.post("/_emulator/resume")
        job = await wait_for_batch(client, job["id"])
    assert job["status"] == "EXPIRED" and job["output_file_id"] is None
    assert job["completed_at"] == "2026-01-01T02:00:00Z"


# -- pause, cancel --------------------------------------------------------------


async def test_pause_holds_batches_until_resume(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        assert (await client.post("/_emulator/pause")).json() == {"paused": True}
        batch_id = await create_batch(client, await upload(client, to_jsonl([request_line("a")])))
        for _ in range(5):  # each request lets the worker run; it must not advance
            assert (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "VALIDATING"
        assert (await client.get("/_emulator/stats")).json()["paused"] is True
        assert (await client.post("/_emulator/resume")).json() == {"paused": False}
        assert (await wait_for_batch(client, batch_id))["status"] == "COMPLETED"


async def test_pause_holds_answers_of_a_batch_in_progress(tmp_path: Path) -> None:
    engine = HoldEngine()
    lines = [request_line(f"fast-{i}") for i in range(3)] + [request_line("slow", "please hold")]
    async with asgi_emulator(tmp_path, engine=engine) as client:
        batch_id = await create_batch(client, await upload(client, to_jsonl(lines)))
        await wait_for_batch(client, batch_id, until=lambda job: job["progress"] == 75.0)
        await client.post("/_emulator/pause")
        engine.release.set()
        for _ in range(5):
            job = (await client.get(f"/v1/batches/{batch_id}")).json()
            assert job["status"] == "IN_PROGRESS" and job["progress"] == 75.0
        await client.post("/_emulator/resume")
        job = await wait_for_batch(client, batch_id)
        assert job["status"] == "COMPLETED" and len(await download(client, job["output_file_id"])) == 4


async def test_cancel_in_progress_keeps_answered_requests(tmp_path: Path) -> None:
    engine = HoldEngine()
    lines = [request_line(f"fast-{i}") for i in range(3)] + [request_line("slow", "please hold")]
    async with asgi_emulator(tmp_path, engine=engine) as client:
        batch_id = await create_batch(client, await upload(client, to_jsonl(lines)))
        await wait_for_batch(client, batch_id, until=lambda job: job["progress"] == 75.0)
        cancelled = await client.post(f"/v1/batches/{batch_id}/cancel")
        assert cancelled.status_code == 200
        job = cancelled.json()
        assert job["status"] == "CANCELLED" and job["completed_at"] is not None and job["error_file_id"] is None
        assert sorted(ids(await download(client, job["output_file_id"]))) == ["fast-0", "fast-1", "fast-2"]
        engine.release.set()
        again = await client.post(f"/v1/batches/{batch_id}/cancel")
        assert again.status_code == 400 and isinstance(again.json()["error"], str)
        assert (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "CANCELLED"


async def test_cancel_while_validating_and_paused(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        batch_id = await create_batch(client, await upload(client, to_jsonl([request_line("a")])))
        job = (await client.post(f"/v1/batches/{batch_id}/cancel")).json()
        assert job["status"] == "CANCELLED" and job["output_file_id"] is None
        await client.post("/_emulator/resume")
        assert (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "CANCELLED"
        unknown = await client.post("/v1/batches/00000000-0000-0000-0000-000000000000/cancel")
        assert unknown.status_code == 404


# -- faults and stats ---------------------------------------------------------------


async def test_fault_answers_the_next_matching_requests(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        file_id = await upload(client, to_jsonl([request_line("a")]))
        fault = {"method": "POST", "path": "/v1/batches", "status": 503, "times": 1, "retry_after": 2}
        posted = await client.post("/_emulator/faults", json=fault)
        assert posted.status_code == 200 and len(posted.json()["faults"]) == 1
        refused = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert isinstance(refused.json()["error"], str)  # the batch endpoints' error shape
        assert (await client.get("/v1/batches")).json() == []
        await create_batch(client, file_id)

        wildcard = {"method": "GET", "path": "/v1/files/*/content", "status": 500, "times": 2}
        await client.post("/_emulator/faults", json=wildcard)
        for _ in range(2):
            failed = await client.get(f"/v1/files/{file_id}/content")
            assert failed.status_code == 500 and set(failed.json()["error"]) == {"message", "type", "param", "code"}
        assert (await client.get(f"/v1/files/{file_id}/content")).status_code == 200

        await client.post("/_emulator/faults", json={"method": "GET", "path": "/v1/batches", "status": 500})
        assert (await client.delete("/_emulator/faults")).json() == {"faults": []}
        assert (await client.get("/v1/batches")).status_code == 200

        bad = await client.post("/_emulator/faults", json={"method": "GET", "path": "/v1/batches"})
        assert bad.status_code == 400
        stats = (await client.get("/_emulator/stats")).json()
        assert stats["requests"]["POST /v1/batches"] == 2
        assert len(stats["batch_creates"]) == 1


async def test_act_fault_creates_the_batch_but_loses_the_answer(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        file_id = await upload(client, to_jsonl([request_line("a")]))
        await client.post(
            "/_emulator/faults", json={"method": "POST", "path": "/v1/batches", "status": 503, "act": True}
        )
        lost = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT})
        assert lost.status_code == 503
        creates = (await client.get("/_emulator/stats")).json()["batch_creates"]
        assert [c["input_file_id"] for c in creates] == [file_id]
        listed = (await client.get("/v1/batches")).json()
        assert [b["id"] for b in listed] == [creates[0]["id"]]
        assert creates[0]["created_at"] == listed[0]["created_at"]
        assert (await wait_for_batch(client, creates[0]["id"]))["status"] == "COMPLETED"


async def test_truncated_download_then_resume_with_range(tmp_path: Path) -> None:
    data = to_jsonl(request_line(f"r{i}", "x" * 200) for i in range(500))  # several 64 KiB chunks
    async with http_emulator(tmp_path) as client:
        file_id = await upload(client, data)
        url = f"/v1/files/{file_id}/content"
        await client.post("/_emulator/faults", json={"method": "GET", "path": url, "truncate_at": 1000})
        received = b""
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(data))
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received += chunk
        assert received == data[:1000]
        rest = await client.get(url, headers={"Range": f"bytes={len(received)}-"})
        assert rest.status_code == 206 and received + rest.content == data


# -- serving, persistence -------------------------------------------------------


async def test_restart_picks_up_a_validating_batch(tmp_path: Path) -> None:
    lines = [request_line(f"r{i}") for i in range(5)]
    async with http_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        file_id = await upload(client, to_jsonl(lines))
        batch_id = await create_batch(client, file_id)
        assert (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "VALIDATING"

    async with http_emulator(tmp_path) as client:
        job = await wait_for_batch(client, batch_id)
        assert job["status"] == "COMPLETED"
        assert sorted(ids(await download(client, job["output_file_id"]))) == ids(lines)
        assert (await client.get(f"/v1/files/{file_id}")).json()["Processed"] is True
        creates = (await client.get("/_emulator/stats")).json()["batch_creates"]
        assert [c["id"] for c in creates] == [batch_id]


async def test_restart_reruns_a_batch_stopped_in_progress(tmp_path: Path) -> None:
    engine = HoldEngine()
    lines = [request_line(f"fast-{i}") for i in range(3)] + [request_line("slow", "please hold")]
    async with http_emulator(tmp_path, engine=engine) as client:
        batch_id = await create_batch(client, await upload(client, to_jsonl(lines)))
        await wait_for_batch(client, batch_id, until=lambda job: job["progress"] == 75.0)
        # Leaving the block stops the server while "slow" is still being answered.

    async with http_emulator(tmp_path) as client:
        job = await wait_for_batch(client, batch_id)
        assert job["status"] == "COMPLETED"
        assert sorted(ids(await download(client, job["output_file_id"]))) == sorted(ids(lines))


async def test_fail_once_memory_survives_a_restart(tmp_path: Path) -> None:
    lines = [request_line("flaky", trigger={"fail_once": 500})]
    async with asgi_emulator(tmp_path) as client:
        _, output, errors = await run_batch(client, lines)
        assert output == [] and ids(errors) == ["flaky"]
    async with asgi_emulator(tmp_path) as client:
        _, output, errors = await run_batch(client, lines)
        assert ids(output) == ["flaky"] and errors == []


async def test_serve_emulator_leaves_signal_handlers_alone(tmp_path: Path) -> None:
    def owner(signum: int, frame: object) -> None:
        """Stands for the daemon's own handler."""

    previous = signal.signal(signal.SIGTERM, owner)
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        async with serve_emulator(create_app(tmp_path), port=0) as base_url:
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url) and not base_url.endswith(":0")
            assert signal.getsignal(signal.SIGTERM) is owner
            assert signal.getsignal(signal.SIGINT) is interrupt
            async with httpx.AsyncClient(base_url=base_url) as client:
                assert (await client.get("/_emulator/stats")).status_code == 200
        assert signal.getsignal(signal.SIGTERM) is owner
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_exceptions_come_out_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(LookupError):
        async with serve_emulator(create_app(tmp_path / "served")):
            raise LookupError("from the caller")
    with pytest.raises(LookupError):
        async with asgi_emulator(tmp_path / "in-process"):
            raise LookupError("from the caller")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("the data dir cannot be created here")
    with pytest.raises(RuntimeError, match="failed to start"):
        async with serve_emulator(create_app(not_a_dir)):
            pass


async def test_expire_once_expires_the_first_batch_only(tmp_path: Path) -> None:
    lines = [request_line("a"), request_line("b", trigger={"expire_once": True}), request_line("c")]
    async with http_emulator(tmp_path) as client:
        first, answered, _ = await run_batch(client, lines)
        assert first["status"] == "EXPIRED" and [x["custom_id"] for x in answered] == ["a"]
        # The same lines resubmitted (a follow-up round) run normally.
        again, answered, _ = await run_batch(client, lines[1:])
        assert again["status"] == "COMPLETED" and sorted(x["custom_id"] for x in answered) == ["b", "c"]


@pytest.mark.parametrize("path", ["/v1/files", "/openai/v1/files"])
async def test_an_upload_its_client_cuts_off_is_one_log_line_and_stores_nothing(
    tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    form = (
        b'--cut\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--cut\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        + to_jsonl([request_line("a")])
    )
    async with serve_emulator(create_app(tmp_path), port=0) as base_url:
        url = httpx.URL(base_url)
        assert url.port is not None
        with capture_logs() as logs:
            # A client killed mid-upload: the headers promise far more body than ever comes.
            stream = await anyio.connect_tcp(url.host, url.port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer test\r\nContent-Length: 1000000\r\n"
                "Content-Type: multipart/form-data; boundary=cut\r\n\r\n"
            )
            await stream.send(head.encode() + form)
            await stream.aclose()
            with anyio.fail_after(10):
                while not any(e["event"] == "emulator.client_disconnected" for e in logs):  # noqa: ASYNC110 - a log line: no event to await
                    await anyio.sleep(0.01)
        async with httpx.AsyncClient(base_url=base_url, auth=BearerAuth("test")) as client:
            listed = (await client.get(path)).json()
    assert [e for e in logs if e["event"] == "emulator.client_disconnected"] == [
        {"event": "emulator.client_disconnected", "method": "POST", "path": path, "log_level": "info"}
    ]
    assert (listed if isinstance(listed, list) else listed["data"]) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
