"""The emulator's Gemini dialect over loopback: the wire shapes of PROVIDERS.md (uploads, files,
batches from a file or inline, states, pages, cancel, delete, downloads, errors, triggers), at
both API versions."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchd.emulator import create_app, serve_emulator
from tests.integration.emulator_helpers import (
    GEMINI,
    GEMINI_KEY,
    HoldEngine,
    gemini_create,
    gemini_download,
    gemini_line,
    gemini_request,
    gemini_upload,
    gemini_wait,
    openai_upload,
    to_jsonl,
)

VERSIONS = ["v1", "v1beta"]
START = {
    "X-Goog-Upload-Protocol": "resumable",
    "X-Goog-Upload-Command": "start",
    "X-Goog-Upload-Header-Content-Type": "application/jsonl",
}


class OpenAIKey(httpx.Auth):
    """A bearer token on the OpenAI dialect's paths only, so that Gemini's are tried without a key."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if request.url.path.startswith("/openai/"):
            request.headers["Authorization"] = "Bearer k"
        yield request


@asynccontextmanager
async def emulator(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The emulator on a loopback port, and a client that sends no key to Gemini unless told to."""
    async with (
        serve_emulator(create_app(tmp_path / "emulator", **options)) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, auth=OpenAIKey()) as client,
    ):
        yield url, client


def assert_google_error(response: httpx.Response, code: int, status: str) -> str:
    """The response is Google's error shape with this code and status; returns its message."""
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "status"} and error["code"] == code and error["status"] == status
    message: str = error["message"]
    return message


async def start_upload(client: httpx.AsyncClient, size: int, version: str = "v1beta", **body: Any) -> httpx.Response:
    headers = {**GEMINI_KEY, **START, "X-Goog-Upload-Header-Content-Length": str(size)}
    return await client.post(f"{GEMINI}/upload/{version}/files", headers=headers, json={"file": body})


def by_key(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["key"]: line for line in lines if "key" in line}


# -- uploads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_resumable_upload_in_pieces_with_a_self_authorising_session_url(tmp_path: Path, version: str) -> None:
    data = to_jsonl([gemini_line(f"k{i}") for i in range(20)])
    half = len(data) // 2
    async with emulator(tmp_path) as (url, client):
        refused = await client.post(f"{GEMINI}/upload/{version}/files", headers={**START}, json={"file": {}})
        assert_google_error(refused, 401, "UNAUTHENTICATED")

        started = await start_upload(client, len(data), version, display_name="my-requests")
        assert started.status_code == 200 and started.content == b""
        assert started.headers["x-goog-upload-status"] == "active"
        session = started.headers["x-goog-upload-url"]
        assert session.startswith(f"{url}{GEMINI}/upload/{version}/files?") and "upload_id=" in session

        # No key on the session URL (the SDK sends none there), and a key is no reason to refuse.
        first = await client.post(
            session, headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}, content=data[:half]
        )
        assert first.status_code == 200 and first.headers["x-goog-upload-status"] == "active"
        assert first.headers["x-goog-upload-size-received"] == str(half)
        wrong = await client.post(
            session, headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}, content=data[half:]
        )
        assert_google_error(wrong, 400, "INVALID_ARGUMENT")
        assert wrong.headers["x-goog-upload-status"] == "active"
        assert wrong.headers["x-goog-upload-size-received"] == str(half)
        query = await client.post(session, headers={"X-Goog-Upload-Command": "query"})
        assert query.headers["x-goog-upload-size-received"] == str(half)
        bogus = await client.post(session, headers={"X-Goog-Upload-Command": "upload, query"})
        assert_google_error(bogus, 400, "INVALID_ARGUMENT")

        last = await client.post(
            session,
            headers={**GEMINI_KEY, "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": str(half)},
            content=data[half:],
        )
        assert last.status_code == 200, last.text
        assert last.headers["x-goog-upload-status"] == "final"
        file = last.json()["file"]
        assert file["name"].startswith("files/") and file["displayName"] == "my-requests"
        assert file["mimeType"] == "application/jsonl" and file["sizeBytes"] == str(len(data))
        assert file["sha256Hash"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert file["state"] == "ACTIVE" and file["source"] == "UPLOADED"
        assert file["uri"] == f"{url}{GEMINI}/{version}/{file['name']}"
        created = datetime.fromisoformat(file["createTime"])
        assert datetime.fromisoformat(file["expirationTime"]) - created == timedelta(hours=48)
        assert file["updateTime"] == file["createTime"]

        # The session is over: its URL opens nothing any more.
        again = await client.post(session, headers={"X-Goog-Upload-Command": "query"})
        assert_google_error(again, 404, "NOT_FOUND")
        assert again.headers["x-goog-upload-status"] == "final"
        forged = session.replace("signature=", "signature=0")
        assert (await client.post(forged, headers={"X-Goog-Upload-Command": "query"})).status_code == 404
        got = await client.get(f"{GEMINI}/{version}/{file['name']}", headers=GEMINI_KEY)
        assert got.status_code == 200 and got.json() == file


async def test_an_upload_must_match_its_declared_size_and_a_name_is_taken_once(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        short = (await start_upload(client, 10)).headers["x-goog-upload-url"]
        cut = await client.post(
            short, headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}, content=b"12345"
        )
        assert_google_error(cut, 400, "INVALID_ARGUMENT")
        assert cut.headers["x-goog-upload-status"] == "final"
        long = (await start_upload(client, 3)).headers["x-goog-upload-url"]
        over = await client.post(
            long, headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"}, content=b"12345"
        )
        assert_google_error(over, 400, "INVALID_ARGUMENT")
        assert over.headers["x-goog-upload-status"] == "final"

        named = await start_upload(client, 2, name="files/my-input")
        done = await client.post(
            named.headers["x-goog-upload-url"],
            headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
            content=b"{}",
        )
        assert done.json()["file"]["name"] == "files/my-input"
        assert_google_error(await start_upload(client, 2, name="my-input"), 409, "ALREADY_EXISTS")
        assert_google_error(await start_upload(client, 2, name="Bad_Name"), 400, "INVALID_ARGUMENT")
        not_resumable = await client.post(
            f"{GEMINI}/upload/v1beta/files",
            headers={**GEMINI_KEY, **START, "X-Goog-Upload-Protocol": "multipart"},
            json={},
        )
        assert_google_error(not_resumable, 400, "INVALID_ARGUMENT")
        no_size = await client.post(f"{GEMINI}/upload/v1beta/files", headers={**GEMINI_KEY, **START}, json={})
        assert_google_error(no_size, 400, "INVALID_ARGUMENT")


async def test_files_are_listed_by_page_read_and_deleted(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        names = [(await gemini_upload(client, b"{}\n", display_name=f"f{i}"))["name"] for i in range(3)]
        # Another dialect's file is not Gemini's.
        await openai_upload(client, b"{}\n")
        first = (await client.get(f"{GEMINI}/v1beta/files", params={"pageSize": 2}, headers=GEMINI_KEY)).json()
        assert [f["name"] for f in first["files"]] == names[::-1][:2]
        second = await client.get(
            f"{GEMINI}/v1/files", params={"pageSize": 2, "pageToken": first["nextPageToken"]}, headers=GEMINI_KEY
        )
        assert [f["name"] for f in second.json()["files"]] == [names[0]] and "nextPageToken" not in second.json()
        assert len((await client.get(f"{GEMINI}/v1/files", headers=GEMINI_KEY)).json()["files"]) == 3

        deleted = await client.delete(f"{GEMINI}/v1/{names[1]}", headers=GEMINI_KEY)
        assert deleted.status_code == 200 and deleted.json() == {}
        assert_google_error(await client.get(f"{GEMINI}/v1/{names[1]}", headers=GEMINI_KEY), 404, "NOT_FOUND")
        assert_google_error(await client.delete(f"{GEMINI}/v1/{names[1]}", headers=GEMINI_KEY), 404, "NOT_FOUND")
        bad = await client.get(f"{GEMINI}/v1/files", params={"pageToken": "garbage!"}, headers=GEMINI_KEY)
        assert_google_error(bad, 400, "INVALID_ARGUMENT")


# -- batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_file_batch_succeeds_with_response_and_error_lines(tmp_path: Path, version: str) -> None:
    lines = [
        json.dumps(gemini_line("ok-1", "first question")),
        json.dumps(gemini_line("ok-2", "second")),
        json.dumps(gemini_line("limited", trigger={"status": 429})),
        json.dumps(gemini_line("timed-out", trigger={"error": "DEADLINE_EXCEEDED"})),
        json.dumps({"key": "no-contents", "request": {"contents": []}}),
        json.dumps(gemini_line("ok-1", "the same key again")),
        json.dumps({"request": gemini_request()}),
        "this is not JSON",
    ]
    async with emulator(tmp_path) as (url, client):
        file = await gemini_upload(client, "\n".join(lines).encode() + b"\n", version=version)
        created = await client.post(
            f"{GEMINI}/{version}/models/gemini-2.5-flash:batchGenerateContent",
            headers=GEMINI_KEY,
            # snake_case, as the REST docs write it
            json={"batch": {"display_name": "job-7", "input_config": {"file_name": file["name"]}}},
        )
        assert created.status_code == 200, created.text
        operation = created.json()
        assert operation["name"].startswith("batches/") and operation["done"] is False
        meta = operation["metadata"]
        assert meta["@type"] == "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
        assert meta["name"] == operation["name"] and meta["displayName"] == "job-7"
        assert meta["model"] == "models/gemini-2.5-flash" and meta["inputConfig"] == {"fileName": file["name"]}
        assert meta["state"] == "BATCH_STATE_PENDING" and meta["createTime"].endswith("Z")
        assert meta["batchStats"]["requestCount"] == "8" and "output" not in meta and "endTime" not in meta

        done = await gemini_wait(client, operation["name"], version=version)
        meta = done["metadata"]
        # A batch with error lines still SUCCEEDS: the lines say what failed.
        assert (
            meta["state"] == "BATCH_STATE_SUCCEEDED" and done["done"] is True and meta["endTime"] >= meta["createTime"]
        )
        assert meta["batchStats"] == {
            "requestCount": "8",
            "successfulRequestCount": "2",
            "failedRequestCount": "6",
            "pendingRequestCount": "0",
        }
        output = meta["output"]
        assert set(output) == {"responsesFile"} and output["responsesFile"].startswith("files/")
        assert done["response"] == {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
            **output,
        }
        responses = (await client.get(f"{GEMINI}/{version}/{output['responsesFile']}", headers=GEMINI_KEY)).json()
        assert responses["source"] == "GENERATED" and responses["downloadUri"].startswith(url)

        results = await gemini_download(client, output["responsesFile"])
        assert len(results) == 8
        keyed = by_key(results)
        answer = keyed["ok-2"]["response"]
        assert answer["candidates"] == [
            {"content": {"role": "model", "parts": [{"text": "echo: second"}]}, "finishReason": "STOP", "index": 0}
        ]
        assert answer["usageMetadata"] == {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}
        assert answer["modelVersion"] == "gemini-2.5-flash"
        assert keyed["limited"]["error"] == {
            "code": 429,
            "message": "Emulated HTTP 429",
            "status": "RESOURCE_EXHAUSTED",
        }
        assert keyed["timed-out"]["error"]["code"] == 504
        assert keyed["timed-out"]["error"]["status"] == "DEADLINE_EXCEEDED"
        assert keyed["no-contents"]["error"]["status"] == "INVALID_ARGUMENT"
        assert "contents" in keyed["no-contents"]["error"]["message"]
        oks = [line for line in results if line.get("key") == "ok-1"]
        assert sorted(("response" in line, "error" in line) for line in oks) == [(False, True), (True, False)]
        keyless = [line for line in results if "key" not in line]
        assert sorted(line["error"]["message"] for line in keyless) == [
            "line 7: key must be a non-empty string",
            "line 8: not valid JSON",
        ]

        # Both download paths, the whole file and a Range of it.
        whole = await client.get(
            f"{GEMINI}/{version}/{output['responsesFile']}:download", params={"alt": "media"}, headers=GEMINI_KEY
        )
        older = await client.get(
            f"{GEMINI}/download/{version}/{output['responsesFile']}:download",
            params={"alt": "media"},
            headers={**GEMINI_KEY, "Range": "bytes=10-"},
        )
        assert older.status_code == 206 and older.content == whole.content[10:]
        assert older.headers["content-range"] == f"bytes 10-{len(whole.content) - 1}/{len(whole.content)}"
        no_media = await client.get(f"{GEMINI}/v1/{output['responsesFile']}:download", headers=GEMINI_KEY)
        assert_google_error(no_media, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_inline_batch_answers_in_the_batch_in_request_order(tmp_path: Path, version: str) -> None:
    requests: list[Any] = [{"request": gemini_request(f"question {i}"), "metadata": {"key": f"q{i}"}} for i in range(3)]
    requests.insert(1, {"request": gemini_request("no metadata", trigger={"status": 503})})
    requests.append({"request": {"contents": "not a list"}, "metadata": {"key": "bad"}})
    requests.append(
        {
            "request": {
                **gemini_request("last"),
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {"maxOutputTokens": 5},
            }
        }
    )
    async with emulator(tmp_path) as (_url, client):
        operation = await gemini_create(client, {"requests": {"requests": requests}}, version=version)
        assert "inputConfig" not in operation["metadata"]
        done = await gemini_wait(client, operation["name"], version=version)
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    inlined = done["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert done["response"]["inlinedResponses"]["inlinedResponses"] == inlined
    assert [item.get("metadata") for item in inlined] == [
        {"key": "q0"}, None, {"key": "q1"}, {"key": "q2"}, {"key": "bad"}, None,
    ]  # fmt: skip
    assert inlined[0]["response"]["candidates"][0]["content"]["parts"] == [{"text": "echo: question 0"}]
    assert inlined[1]["error"] == {"code": 503, "message": "Emulated HTTP 503", "status": "UNAVAILABLE"}
    assert inlined[4]["error"]["status"] == "INVALID_ARGUMENT" and "response" not in inlined[4]
    # The system instruction counts in the prompt: "be brief" and "last".
    assert inlined[5]["response"]["usageMetadata"]["promptTokenCount"] == 3


async def test_states_pending_running_and_cancelled(tmp_path: Path) -> None:
    engine = HoldEngine()
    async with emulator(tmp_path, engine=engine) as (_url, client):
        await client.post("/_emulator/pause")
        held = await gemini_create(client, {"requests": {"requests": [{"request": gemini_request()}]}})
        for _ in range(3):
            assert (await gemini_wait(client, held["name"], until=lambda _: True))["metadata"]["state"] == (
                "BATCH_STATE_PENDING"
            )
        cancelled = await client.post(f"{GEMINI}/v1beta/{held['name']}:cancel", headers=GEMINI_KEY)
        assert cancelled.status_code == 200 and cancelled.json() == {}
        done = await gemini_wait(client, held["name"])
        assert done["metadata"]["state"] == "BATCH_STATE_CANCELLED" and "output" not in done["metadata"]
        again = await client.post(f"{GEMINI}/v1/{held['name']}:cancel", headers=GEMINI_KEY)
        assert_google_error(again, 400, "FAILED_PRECONDITION")
        await client.post("/_emulator/resume")

        running = await gemini_create(
            client,
            {"requests": {"requests": [{"request": gemini_request("fast")}, {"request": gemini_request("hold")}]}},
        )
        seen = await gemini_wait(
            client, running["name"], until=lambda op: op["metadata"]["batchStats"]["successfulRequestCount"] == "1"
        )
        assert seen["metadata"]["state"] == "BATCH_STATE_RUNNING" and seen["done"] is False
        assert seen["metadata"]["batchStats"]["pendingRequestCount"] == "1"
        engine.release.set()
        assert (await gemini_wait(client, running["name"]))["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"


async def test_an_expired_batch_gives_no_results_and_a_failed_one_says_why(tmp_path: Path) -> None:
    lines = [gemini_line("a"), gemini_line("b", trigger={"expire_batch": True}), gemini_line("c")]
    failing = [gemini_line("a"), gemini_line("b", trigger={"fail_batch": True})]
    async with emulator(tmp_path) as (_url, client):
        expired = await gemini_create(client, {"fileName": (await gemini_upload(client, to_jsonl(lines)))["name"]})
        done = await gemini_wait(client, expired["name"])
        assert done["metadata"]["state"] == "BATCH_STATE_EXPIRED" and done["done"] is True
        assert "output" not in done["metadata"] and "response" not in done
        assert done["metadata"]["batchStats"]["successfulRequestCount"] == "1"
        assert done["metadata"]["batchStats"]["pendingRequestCount"] == "2"

        failed = await gemini_create(client, {"fileName": (await gemini_upload(client, to_jsonl(failing)))["name"]})
        done = await gemini_wait(client, failed["name"])
        assert done["metadata"]["state"] == "BATCH_STATE_FAILED"
        assert done["error"]["code"] == 13 and "line 2" in done["error"]["message"]

        # A trigger with a typo fails the batch rather than passing silently.
        typo = [gemini_line("a", trigger={"expire_bach": True})]
        bad = await gemini_create(client, {"fileName": (await gemini_upload(client, to_jsonl(typo)))["name"]})
        done = await gemini_wait(client, bad["name"])
        assert done["metadata"]["state"] == "BATCH_STATE_FAILED" and done["error"]["code"] == 3


async def test_a_batch_expires_48_hours_after_its_creation(tmp_path: Path) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def clock() -> datetime:
        return now

    async with emulator(tmp_path, clock=clock) as (_url, client):
        await client.post("/_emulator/pause")
        operation = await gemini_create(client, {"requests": {"requests": [{"request": gemini_request()}]}})
        assert operation["metadata"]["createTime"] == "2026-01-01T00:00:00Z"
        now += timedelta(hours=48, seconds=1)
        await client.post("/_emulator/resume")
        done = await gemini_wait(client, operation["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_EXPIRED" and done["metadata"]["endTime"] == "2026-01-03T00:00:01Z"


async def test_batches_list_newest_first_with_stable_page_tokens(tmp_path: Path) -> None:
    inline = {"requests": {"requests": [{"request": gemini_request()}]}}
    async with emulator(tmp_path) as (_url, client):
        await client.post("/_emulator/pause")
        names = [(await gemini_create(client, inline))["name"] for _ in range(5)]
        first = (await client.get(f"{GEMINI}/v1beta/batches", params={"pageSize": 2}, headers=GEMINI_KEY)).json()
        assert [op["name"] for op in first["operations"]] == names[::-1][:2]
        # A batch created meanwhile goes on the first page; the token goes on where it was.
        newest = (await gemini_create(client, inline))["name"]
        token = first["nextPageToken"]
        second = (
            await client.get(f"{GEMINI}/v1/batches", params={"pageSize": 2, "pageToken": token}, headers=GEMINI_KEY)
        ).json()
        assert [op["name"] for op in second["operations"]] == names[::-1][2:4]
        third = (
            await client.get(
                f"{GEMINI}/v1/batches", params={"pageSize": 2, "pageToken": second["nextPageToken"]}, headers=GEMINI_KEY
            )
        ).json()
        assert [op["name"] for op in third["operations"]] == [names[0]] and "nextPageToken" not in third
        everything = (await client.get(f"{GEMINI}/v1/batches", headers=GEMINI_KEY)).json()["operations"]
        assert [op["name"] for op in everything] == [newest, *names[::-1]]
        bad = await client.get(f"{GEMINI}/v1/batches", params={"pageToken": "nonsense"}, headers=GEMINI_KEY)
        assert_google_error(bad, 400, "INVALID_ARGUMENT")
        negative = await client.get(f"{GEMINI}/v1/batches", params={"pageSize": -1}, headers=GEMINI_KEY)
        assert_google_error(negative, 400, "INVALID_ARGUMENT")


async def test_delete_forgets_a_batch_and_cancels_one_still_running(tmp_path: Path) -> None:
    inline = {"requests": {"requests": [{"request": gemini_request()}]}}
    async with emulator(tmp_path) as (_url, client):
        from_file = await gemini_create(
            client, {"fileName": (await gemini_upload(client, to_jsonl([gemini_line("a")])))["name"]}
        )
        responses = (await gemini_wait(client, from_file["name"]))["metadata"]["output"]["responsesFile"]
        finished = await gemini_create(client, inline)
        assert (await gemini_wait(client, finished["name"]))["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
        await client.post("/_emulator/pause")
        waiting = await gemini_create(client, inline)
        for operation in (from_file, finished, waiting):
            deleted = await client.delete(f"{GEMINI}/v1beta/{operation['name']}", headers=GEMINI_KEY)
            assert deleted.status_code == 200 and deleted.json() == {}
            gone = await client.get(f"{GEMINI}/v1beta/{operation['name']}", headers=GEMINI_KEY)
            assert_google_error(gone, 404, "NOT_FOUND")
        assert (await client.get(f"{GEMINI}/v1beta/batches", headers=GEMINI_KEY)).json() == {"operations": []}
        assert_google_error(
            await client.delete(f"{GEMINI}/v1beta/{finished['name']}", headers=GEMINI_KEY), 404, "NOT_FOUND"
        )
        # A file batch's responses file is a file of its own: it outlives the batch.
        assert [line["key"] for line in await gemini_download(client, responses)] == ["a"]


async def test_a_batch_survives_a_restart_with_its_name_file_and_error_lines(tmp_path: Path) -> None:
    lines = [json.dumps(gemini_line("a")), json.dumps(gemini_line("b")), "not JSON"]
    async with emulator(tmp_path) as (_url, client):
        await client.post("/_emulator/pause")
        file = await gemini_upload(client, "\n".join(lines).encode())
        operation = await gemini_create(client, {"fileName": file["name"]})
    async with emulator(tmp_path) as (_url, client):
        done = await gemini_wait(client, operation["name"])
        again = (await client.get(f"{GEMINI}/v1beta/{file['name']}", headers=GEMINI_KEY)).json()
        assert again | {"uri": file["uri"]} == file  # (another port now)
    meta = done["metadata"]
    assert meta["state"] == "BATCH_STATE_SUCCEEDED" and meta["displayName"] == "test-batch"
    assert (
        meta["inputConfig"] == {"fileName": file["name"]} and meta["createTime"] == operation["metadata"]["createTime"]
    )
    assert meta["batchStats"]["successfulRequestCount"] == "2" and meta["batchStats"]["failedRequestCount"] == "1"


# -- errors and keys -------------------------------------------------------------------------


async def test_creates_that_cannot_make_a_batch_are_refused_in_google_s_shape(tmp_path: Path) -> None:
    create = f"{GEMINI}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
    async with emulator(tmp_path) as (_url, client):
        empty = await gemini_upload(client, b"\n\n")
        in_file = {"fileName": empty["name"]}
        cases: list[tuple[Any, int, str]] = [
            ({"batch": {"inputConfig": {"fileName": "files/missing"}}}, 404, "NOT_FOUND"),
            ({"batch": {"inputConfig": in_file}}, 400, "INVALID_ARGUMENT"),
            (
                {"batch": {"inputConfig": {"fileName": empty["name"], "requests": {"requests": []}}}},
                400,
                "INVALID_ARGUMENT",
            ),
            ({"batch": {"inputConfig": {"requests": {"requests": []}}}}, 400, "INVALID_ARGUMENT"),
            ({"batch": {"inputConfig": {"requests": {}}}}, 400, "INVALID_ARGUMENT"),
            ({"batch": {"displayName": 7, "inputConfig": {"requests": {"requests": []}}}}, 400, "INVALID_ARGUMENT"),
            ({"batch": {}}, 400, "INVALID_ARGUMENT"),
            ([], 400, "INVALID_ARGUMENT"),
        ]
        for body, code, status in cases:
            assert_google_error(await client.post(create, headers=GEMINI_KEY, json=body), code, status)
        not_json = await client.post(create, headers=GEMINI_KEY, content=b"{")
        assert_google_error(not_json, 400, "INVALID_ARGUMENT")
        assert (await client.get(f"{GEMINI}/v1beta/batches", headers=GEMINI_KEY)).json() == {"operations": []}


async def test_every_error_under_gemini_has_google_s_shape(tmp_path: Path) -> None:
    async with emulator(tmp_path, max_body_bytes=4096) as (_url, client):
        assert_google_error(await client.get(f"{GEMINI}/v1beta/nowhere", headers=GEMINI_KEY), 404, "NOT_FOUND")
        assert_google_error(await client.put(f"{GEMINI}/v1beta/batches", headers=GEMINI_KEY), 405, "INVALID_ARGUMENT")
        assert_google_error(await client.get(f"{GEMINI}/v1/batches/nope", headers=GEMINI_KEY), 404, "NOT_FOUND")
        too_large = await client.post(
            f"{GEMINI}/v1beta/models/m:batchGenerateContent", headers=GEMINI_KEY, content=b"x" * 5000
        )
        assert_google_error(too_large, 413, "INVALID_ARGUMENT")
        assert too_large.headers["connection"] == "close"
    async with emulator(tmp_path / "again") as (_url, client):
        await client.post("/_emulator/faults", json={"method": "GET", "path": f"{GEMINI}/v1/batches", "status": 429})
        assert_google_error(await client.get(f"{GEMINI}/v1/batches", headers=GEMINI_KEY), 429, "RESOURCE_EXHAUSTED")
        await client.post("/_emulator/faults", json={"method": "GET", "path": f"{GEMINI}/v1/batches/*", "status": 503})
        assert_google_error(await client.get(f"{GEMINI}/v1/batches/x", headers=GEMINI_KEY), 503, "UNAVAILABLE")


async def test_the_key_comes_as_a_header_a_query_parameter_or_a_bearer_token(tmp_path: Path) -> None:
    async with emulator(tmp_path, api_key="secret") as (_url, client):
        listing = f"{GEMINI}/v1beta/batches"
        assert (await client.get(listing, headers={"x-goog-api-key": "secret"})).status_code == 200
        assert (await client.get(listing, params={"key": "secret"})).status_code == 200
        assert (await client.get(listing, headers={"authorization": "Bearer secret"})).status_code == 200
        for refused in (
            await client.get(listing),
            await client.get(listing, headers={"x-goog-api-key": "wrong"}),
            await client.get(listing, params={"key": "wrong"}),
        ):
            assert_google_error(refused, 401, "UNAUTHENTICATED")
        # The upload session's URL needs no key, even when the emulator has one.
        started = await client.post(
            f"{GEMINI}/upload/v1/files",
            headers={"x-goog-api-key": "secret", **START, "X-Goog-Upload-Header-Content-Length": "3"},
            json={},
        )
        finished = await client.post(
            started.headers["x-goog-upload-url"],
            headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
            content=b"{}\n",
        )
        assert finished.status_code == 200 and finished.json()["file"]["sizeBytes"] == "3"
        # Without its signature the session's URL opens nothing.
        stripped = started.headers["x-goog-upload-url"].split("&signature=")[0]
        assert (await client.post(stripped, headers={"X-Goog-Upload-Command": "query"})).status_code == 404


async def test_a_batch_other_dialects_made_is_not_gemini_s(tmp_path: Path) -> None:
    async with emulator(tmp_path) as (_url, client):
        file_id = await openai_upload(client, to_jsonl([{"custom_id": "a"}]))
        created = await client.post(
            "/openai/v1/batches",
            json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        assert created.status_code == 200
        assert_google_error(
            await client.get(f"{GEMINI}/v1/batches/{created.json()['id']}", headers=GEMINI_KEY), 404, "NOT_FOUND"
        )
        assert (await client.get(f"{GEMINI}/v1/batches", headers=GEMINI_KEY)).json() == {"operations": []}
        # Nor is another dialect's file a Gemini batch's input.
        refused = await client.post(
            f"{GEMINI}/v1/models/m:batchGenerateContent",
            headers=GEMINI_KEY,
            json={"batch": {"inputConfig": {"fileName": f"files/{file_id}"}}},
        )
        assert_google_error(refused, 404, "NOT_FOUND")
