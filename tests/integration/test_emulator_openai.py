"""The emulator's OpenAI dialect (`/openai/v1/...`): shapes, life cycle, refusals, and the store it shares
with the Together dialect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import Batch, FileObject

from batchd.emulator.openai import DEFAULT_FILE_TTL_S
from tests.integration.emulator_helpers import (
    CHAT,
    OPENAI,
    BearerAuth,
    asgi_emulator,
    create_batch,
    download,
    http_emulator,
    openai_create,
    openai_download,
    openai_run,
    openai_upload,
    openai_wait,
    request_line,
    to_jsonl,
    upload,
    wait_for_batch,
)

BATCH_KEYS = set(Batch.model_fields)
FILE_KEYS = set(FileObject.model_fields)
ERROR_KEYS = {"message", "type", "param", "code"}
#: A multipart form as httpx takes it.
Form = dict[str, tuple[str | None, bytes | str]]


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return sorted(line["custom_id"] for line in lines)


def assert_error(answer: httpx.Response, status: int, param: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str)
    if param is not None:
        assert error["param"] == param


# -- files --------------------------------------------------------------------


async def test_upload_answers_a_file_object_and_serves_the_content(tmp_path: Path) -> None:
    data = to_jsonl([request_line("a"), request_line("b")])
    async with asgi_emulator(tmp_path) as client:
        answer = await client.post(f"{OPENAI}/files", files={"purpose": (None, "batch"), "file": ("in.jsonl", data)})
        assert answer.status_code == 200
        record = answer.json()
        assert set(record) == FILE_KEYS
        assert record["object"] == "file" and record["purpose"] == "batch" and record["status"] == "processed"
        assert record["bytes"] == len(data) and record["filename"] == "in.jsonl"
        assert record["expires_at"] == record["created_at"] + DEFAULT_FILE_TTL_S
        file_id = record["id"]

        assert (await client.get(f"{OPENAI}/files/{file_id}")).json() == record
        assert (await client.get(f"{OPENAI}/files/{file_id}/content")).content == data
        tail = await client.get(f"{OPENAI}/files/{file_id}/content", headers={"Range": "bytes=5-"})
        assert tail.status_code == 206 and tail.content == data[5:]

        form: Form = {
            "purpose": (None, "batch"),
            "file": ("short.jsonl", data),
            "expires_after[anchor]": (None, "created_at"),
            "expires_after[seconds]": (None, "3600"),
        }
        short = (await client.post(f"{OPENAI}/files", files=form)).json()
        assert short["expires_at"] == short["created_at"] + 3600

        listing = (await client.get(f"{OPENAI}/files", params={"purpose": "batch", "limit": 1})).json()
        assert listing["object"] == "list" and listing["has_more"] is True
        assert [f["id"] for f in listing["data"]] == [short["id"]]  # newest first
        rest = (await client.get(f"{OPENAI}/files", params={"after": short["id"]})).json()
        assert [f["id"] for f in rest["data"]] == [file_id] and rest["has_more"] is False

        assert_error(await client.get(f"{OPENAI}/files/file-unknown"), 404, "id")
        bad_purpose: Form = {"purpose": (None, "batch-api"), "file": ("x.jsonl", data)}
        assert_error(await client.post(f"{OPENAI}/files", files=bad_purpose), 400, "purpose")
        not_jsonl: Form = {"purpose": (None, "batch"), "file": ("x.csv", data)}
        assert_error(await client.post(f"{OPENAI}/files", files=not_jsonl), 400, "file")


# -- batches --------------------------------------------------------------------


async def test_a_batch_in_openai_shapes_from_create_to_results(tmp_path: Path) -> None:
    lines = [
        request_line("ok-1", "one two"),
        request_line("ok-2"),
        request_line("bad-model", trigger={"error": "invalid_model"}),
        request_line("server-error", trigger={"status": 500}),
    ]
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        file_id = await openai_upload(client, to_jsonl(lines))
        created = await openai_create(client, file_id, metadata={"batchd_job_id": "job-1"})
        assert set(created) == BATCH_KEYS
        assert created["object"] == "batch" and created["id"].startswith("batch_")
        assert created["status"] == "validating" and created["metadata"] == {"batchd_job_id": "job-1"}
        assert created["expires_at"] - created["created_at"] == 24 * 3600
        assert created["output_file_id"] is None and created["error_file_id"] is None and created["errors"] is None
        assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        await client.post("/_emulator/resume")

        batch = await openai_wait(client, created["id"])
        assert batch["status"] == "completed" and batch["metadata"] == {"batchd_job_id": "job-1"}
        for key in ("in_progress_at", "finalizing_at", "completed_at"):
            assert isinstance(batch[key], int) and batch[key] >= batch["created_at"]
        for key in ("failed_at", "expired_at", "cancelling_at", "cancelled_at"):
            assert batch[key] is None
        assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
        assert batch["usage"]["input_tokens"] == 3 and batch["usage"]["total_tokens"] > 3

        output = await openai_download(client, batch["output_file_id"])
        assert ids(output) == ["ok-1", "ok-2"]
        first = output[0]
        assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
        assert first["id"].startswith("batch_req_")
        assert set(first["response"]) == {"status_code", "request_id", "body"}
        assert first["response"]["status_code"] == 200 and first["response"]["request_id"].startswith("req_")

        errors = {line["custom_id"]: line for line in await openai_download(client, batch["error_file_id"])}
        assert errors["bad-model"]["response"] is None
        assert errors["bad-model"]["error"]["code"] == "invalid_model"
        assert set(errors["bad-model"]["error"]) == {"code", "message"}
        assert errors["server-error"]["response"]["status_code"] == 500 and errors["server-error"]["error"] is None

        result = (await client.get(f"{OPENAI}/files/{batch['output_file_id']}")).json()
        assert result["purpose"] == "batch_output" and result["filename"] == f"{batch['id']}_output.jsonl"


async def test_a_completed_batch_may_have_only_an_error_file(tmp_path: Path) -> None:
    lines = [request_line(f"e{i}", trigger={"status": 400}) for i in range(3)]
    async with asgi_emulator(tmp_path) as client:
        batch = await openai_run(client, lines)
    assert batch["status"] == "completed" and batch["output_file_id"] is None and batch["error_file_id"] is not None
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}


async def test_a_bad_input_fails_with_an_errors_list(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        file_id = await openai_upload(client, to_jsonl([request_line("a"), request_line("a")]))
        batch = await openai_wait(client, (await openai_create(client, file_id))["id"])
    assert batch["status"] == "failed" and isinstance(batch["failed_at"], int) and batch["in_progress_at"] is None
    assert batch["errors"]["object"] == "list"
    (error,) = batch["errors"]["data"]
    assert error["code"] == "duplicate_custom_id" and error["line"] == 2 and error["param"] == "custom_id"
    assert "duplicate" in error["message"]
    assert batch["output_file_id"] is None and batch["error_file_id"] is None


async def test_create_refusals_name_the_parameter(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        file_id = await openai_upload(client, to_jsonl([request_line("a")]))

        async def refused(status: int, param: str | None, **body: Any) -> None:
            assert_error(await client.post(f"{OPENAI}/batches", json=body), status, param)

        base = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        await refused(404, "input_file_id", **{**base, "input_file_id": "file-unknown"})
        await refused(400, "completion_window", **{**base, "completion_window": "1h"})
        await refused(400, "endpoint", **{**base, "endpoint": "/v1/images/generations"})
        await refused(400, "metadata", **base, metadata={f"k{i}": "v" for i in range(17)})
        await refused(400, "metadata", **base, metadata={"k": "v" * 513})
        await refused(400, "metadata", **base, metadata={"k": 1})
        await refused(400, "model_id", **base, model_id="m")
        done = await openai_wait(client, (await openai_create(client, file_id))["id"])
        await refused(400, "input_file_id", **{**base, "input_file_id": done["output_file_id"]})
        assert (await client.post(f"{OPENAI}/batches", content=b"{nope")).status_code == 400
        assert_error(await client.get(f"{OPENAI}/batches/batch_unknown"), 404)
        assert_error(await client.get(f"{OPENAI}/nothing-here"), 404)


async def test_list_is_newest_first_with_cursor_pagination(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        file_id = await openai_upload(client, to_jsonl([request_line("a")]))
        made = [(await openai_create(client, file_id))["id"] for _ in range(5)]
        newest_first = made[::-1]

        page = (await client.get(f"{OPENAI}/batches", params={"limit": 2})).json()
        assert page["object"] == "list" and page["has_more"] is True
        assert [b["id"] for b in page["data"]] == newest_first[:2]
        assert page["first_id"] == newest_first[0] and page["last_id"] == newest_first[1]
        page = (await client.get(f"{OPENAI}/batches", params={"limit": 2, "after": page["last_id"]})).json()
        assert [b["id"] for b in page["data"]] == newest_first[2:4] and page["has_more"] is True
        page = (await client.get(f"{OPENAI}/batches", params={"limit": 2, "after": page["last_id"]})).json()
        assert [b["id"] for b in page["data"]] == newest_first[4:] and page["has_more"] is False
        everything = (await client.get(f"{OPENAI}/batches")).json()
        assert [b["id"] for b in everything["data"]] == newest_first and everything["has_more"] is False

        for limit in ("0", "101", "many"):
            assert_error(await client.get(f"{OPENAI}/batches", params={"limit": limit}), 400, "limit")
        assert_error(await client.get(f"{OPENAI}/batches", params={"after": "batch_unknown"}), 400, "after")
        await client.post("/_emulator/resume")


async def test_cancel_is_cancelling_until_the_worker_carries_it_out(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        await client.post("/_emulator/pause")
        batch_id = (await openai_create(client, await openai_upload(client, to_jsonl([request_line("a")]))))["id"]
        answer = await client.post(f"{OPENAI}/batches/{batch_id}/cancel")
        assert answer.status_code == 200
        cancelling = answer.json()
        assert cancelling["status"] == "cancelling" and isinstance(cancelling["cancelling_at"], int)
        assert cancelling["cancelled_at"] is None
        # Paused: the worker takes no step, so the batch stays cancelling (in both dialects).
        assert (await client.get(f"{OPENAI}/batches/{batch_id}")).json()["status"] == "cancelling"
        assert (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "CANCELING"
        again = await client.post(f"{OPENAI}/batches/{batch_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "cancelling"
        await client.post("/_emulator/resume")

        cancelled = await openai_wait(client, batch_id)
        assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] >= cancelled["cancelling_at"]
        assert_error(await client.post(f"{OPENAI}/batches/{batch_id}/cancel"), 400)
        assert_error(await client.post(f"{OPENAI}/batches/batch_unknown/cancel"), 404)


async def test_an_expired_batch_reports_every_request_it_never_ran(tmp_path: Path) -> None:
    lines = [request_line("a"), request_line("b"), request_line("stop", trigger={"expire_batch": True})]
    lines += [request_line("c"), request_line("d")]
    async with asgi_emulator(tmp_path) as client:
        batch = await openai_run(client, lines)
        assert batch["status"] == "expired" and isinstance(batch["expired_at"], int)
        assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
        assert ids(await openai_download(client, batch["output_file_id"])) == ["a", "b"]
        errors = await openai_download(client, batch["error_file_id"])
    assert ids(errors) == ["c", "d", "stop"]
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)


# -- one store, two dialects ------------------------------------------------------


async def test_files_and_batches_are_shared_between_the_dialects(tmp_path: Path) -> None:
    data = to_jsonl([request_line("x"), request_line("y")])
    async with http_emulator(tmp_path) as client:
        together_file = await upload(client, data)
        openai_file = await openai_upload(client, to_jsonl([request_line("z")]))
        assert (await client.get(f"{OPENAI}/files/{together_file}")).json()["purpose"] == "batch"
        assert (await client.get(f"/v1/files/{openai_file}")).json()["purpose"] == "batch-api"

        from_openai = await openai_wait(client, (await openai_create(client, together_file))["id"])
        from_together = await wait_for_batch(client, await create_batch(client, openai_file))
        assert from_openai["status"] == "completed" and from_together["status"] == "COMPLETED"

        # Each dialect lists both batches, in its own shape.
        together_view = (await client.get("/v1/batches")).json()
        assert [b["id"] for b in together_view] == [from_together["id"], from_openai["id"]]
        assert together_view[1]["status"] == "COMPLETED" and together_view[1]["progress"] == 100.0
        openai_view = (await client.get(f"{OPENAI}/batches")).json()["data"]
        assert [b["id"] for b in openai_view] == [from_together["id"], from_openai["id"]]
        assert openai_view[0]["status"] == "completed" and openai_view[0]["request_counts"]["completed"] == 1

        # A batch's result lines have the shape of the dialect that created it, whoever downloads them.
        openai_lines = await download(client, from_openai["output_file_id"])
        assert set(openai_lines[0]) == {"id", "custom_id", "response", "error"}
        together_lines = await openai_download(client, from_together["output_file_id"])
        assert set(together_lines[0]) == {"custom_id", "response"}


async def test_each_dialect_has_its_own_size_limit(tmp_path: Path) -> None:
    # 150 MB: over Together's 100 MB, under OpenAI's 200 MB. The record is edited rather than
    # 150 MB uploaded; validation reads the size from it.
    async with asgi_emulator(tmp_path) as client:
        file_id = await openai_upload(client, to_jsonl([request_line("a")]))
    record_path = tmp_path / "files" / f"{file_id}.json"
    record = json.loads(record_path.read_bytes())
    record["bytes"] = 150_000_000
    record_path.write_text(json.dumps(record))
    async with asgi_emulator(tmp_path) as client:
        together = await wait_for_batch(client, await create_batch(client, file_id))
        assert together["status"] == "FAILED" and "larger than 100000000 bytes" in together["error"]
        openai = await openai_wait(client, (await openai_create(client, file_id))["id"])
        assert openai["status"] == "completed"


@pytest.mark.parametrize("dialect", ["together", "openai"])
async def test_more_than_50000_requests_fail_validation(tmp_path: Path, dialect: str) -> None:
    data = b"".join(b'{"custom_id":"r%d","url":"%s","body":{}}\n' % (i, CHAT.encode()) for i in range(50_001))
    async with asgi_emulator(tmp_path) as client:
        if dialect == "together":
            job = await wait_for_batch(client, await create_batch(client, await upload(client, data)), timeout=60)
            assert job["status"] == "FAILED" and "more than 50000 requests" in job["error"]
        else:
            batch_id = (await openai_create(client, await openai_upload(client, data)))["id"]
            batch = await openai_wait(client, batch_id, timeout=60)
            assert batch["status"] == "failed"
            assert batch["errors"]["data"][0]["code"] == "too_many_requests_in_batch"


async def test_the_openai_routes_need_a_bearer_token(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path, api_key="sekret") as client:
        assert_error(await client.get(f"{OPENAI}/batches", auth=None), 401)
        assert_error(await client.get(f"{OPENAI}/batches", auth=BearerAuth("wrong")), 401)
        assert (await client.get(f"{OPENAI}/batches", auth=BearerAuth("sekret"))).status_code == 200
