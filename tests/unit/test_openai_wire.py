"""OpenAIProvider against a scripted OpenAI over httpx.MockTransport: the exact wire."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from batchd.backoff import RetryPolicy
from batchd.config import load_settings
from batchd.models import PROVIDER_LIMITS, RemoteStatus
from batchd.providers.base import Provider, ProviderError
from batchd.providers.openai import OpenAIProvider, errors_text, parse_batch
from batchd.service import open_provider
from tests.hand_clock import RecordingSleep
from tests.unit.fake_http import (
    BrokenStream,
    FakeApi,
    Handler,
    StreamingTransport,
    answer,
    form_parts,
    raise_,
)

KEY = "sk-proj-secret-key-do-not-log"
BASE = "https://api.openai.test/v1"
T0 = 1764100000


def batch(**overrides: Any) -> dict[str, Any]:
    """A Batch as OpenAI sends it."""
    body: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": "in_progress",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": T0,
        "in_progress_at": T0 + 5,
        "expires_at": T0 + 86400,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 2, "completed": 1, "failed": 0},
        "metadata": {"batchd_job_id": "job-1"},
    }
    body.update(overrides)
    return body


def file_object(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "file-new",
        "object": "file",
        "bytes": len(BATCH_BYTES),
        "created_at": T0,
        "filename": "batch.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": None,
    }
    body.update(overrides)
    return body


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi()


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def http(fake: FakeApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        yield client


@pytest.fixture
def provider(http: httpx.AsyncClient, sleep: RecordingSleep) -> OpenAIProvider:
    return OpenAIProvider(http, base_url=BASE + "/", api_key=KEY, retry=RetryPolicy(attempts=3), sleep=sleep)


# -- construction ---------------------------------------------------------


def test_provider_defaults(provider: OpenAIProvider, http: httpx.AsyncClient) -> None:
    checked: Provider = provider
    assert checked.kind == "openai"
    assert provider.limits == PROVIDER_LIMITS["openai"]
    # OpenAI's base URL keeps its /v1; only the trailing slash goes.
    assert provider.base_url == BASE
    assert OpenAIProvider(http, api_key=KEY).base_url == "https://api.openai.com/v1"


# -- upload ---------------------------------------------------------------

BATCH_BYTES = b'{"custom_id": "a"}\n' * 1000


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(BATCH_BYTES)
    return path


async def test_upload_one_multipart_post(provider: OpenAIProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", answer(200, json=file_object()))

    stored = await provider.upload(batch_file, filename="batch.jsonl", sha256="ab" * 32)

    assert stored.id == "file-new"
    assert (stored.bytes, stored.filename, stored.purpose) == (len(BATCH_BYTES), "batch.jsonl", "batch")
    assert stored.created_at == datetime.fromtimestamp(T0, UTC)
    (request,) = fake.requests
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/files")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    # An exact length, not chunked: the body is streamed but its size is known.
    assert request.headers["content-length"] == str(len(fake.bodies[0]))
    assert "transfer-encoding" not in request.headers
    parts = form_parts(request, fake.bodies[0])
    names = [part.get_param("name", header="content-disposition") for part in parts]
    assert names == ["purpose", "file"]
    purpose, file_part = parts
    assert purpose.get_content() == "batch" and purpose.get_filename() is None
    assert file_part.get_filename() == "batch.jsonl"
    assert file_part.get_content_type() == "application/octet-stream"
    assert file_part.get_payload(decode=True) == BATCH_BYTES


async def test_upload_file_returns_the_id(provider: OpenAIProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", answer(200, json=file_object(id="file-x")))
    assert await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64) == "file-x"


async def test_upload_filename_is_quoted_like_a_browser_does(
    provider: OpenAIProvider, fake: FakeApi, batch_file: Path
) -> None:
    fake.on("POST", "/v1/files", answer(200, json=file_object()))
    await provider.upload(batch_file, filename='a"b\r\nc.jsonl', sha256="0" * 64)
    assert b'filename="a%22b%0D%0Ac.jsonl"' in fake.bodies[0]


async def test_upload_retried_streams_the_file_again(
    provider: OpenAIProvider, fake: FakeApi, batch_file: Path, sleep: RecordingSleep
) -> None:
    fake.on("POST", "/v1/files", answer(503), raise_(httpx.WriteError("reset")), answer(200, json=file_object()))
    assert await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64) == "file-new"
    assert len(fake.requests) == 3 and len(sleep.calls) == 2
    assert BATCH_BYTES in fake.bodies[2]


async def test_upload_refused(provider: OpenAIProvider, fake: FakeApi, batch_file: Path) -> None:
    body = {"error": {"message": "Invalid file format", "type": "invalid_request_error", "param": None, "code": None}}
    fake.on("POST", "/v1/files", answer(400, json=body))
    with pytest.raises(ProviderError) as info:
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)
    assert not info.value.retryable and info.value.status_code == 400
    assert "Invalid file format (type=invalid_request_error)" in info.value.message
    assert len(fake.requests) == 1


async def test_upload_answer_without_an_id(provider: OpenAIProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", answer(200, json={"object": "file"}))
    with pytest.raises(ProviderError, match="without an id"):
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)


# -- create ---------------------------------------------------------------


async def create(provider: OpenAIProvider, job_id: str | None = "job-1") -> Any:
    return await provider.create_batch(
        input_file_id="file-in", endpoint="/v1/chat/completions", completion_window="24h", job_id=job_id
    )


async def test_create_sends_metadata_and_reads_the_bare_batch(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches", answer(200, json=batch(status="validating")))
    created = await create(provider)
    assert created.id == "batch_1"
    assert created.status is RemoteStatus.VALIDATING
    assert created.metadata == {"batchd_job_id": "job-1"}
    (request,) = fake.requests
    assert str(request.url) == f"{BASE}/batches"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(fake.bodies[0]) == {
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"batchd_job_id": "job-1"},
    }


async def test_create_without_a_job_sends_no_metadata(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches", answer(200, json=batch(metadata=None)))
    created = await create(provider, job_id=None)
    assert created.metadata is None
    assert "metadata" not in json.loads(fake.bodies[0])


@pytest.mark.parametrize(
    "handler",
    [
        answer(503, json={"error": {"message": "overloaded", "type": "server_error"}}),
        answer(500),
        answer(408),
        raise_(httpx.ReadTimeout("timed out")),
        raise_(httpx.RemoteProtocolError("peer closed")),
        answer(200, text="<html>"),
    ],
    ids=["503", "500", "408", "timeout", "protocol", "unreadable-200"],
)
async def test_create_lost_answer_is_outcome_unknown_and_sent_once(
    provider: OpenAIProvider, fake: FakeApi, sleep: RecordingSleep, handler: Handler
) -> None:
    fake.on("POST", "/v1/batches", handler)
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert info.value.outcome_unknown and info.value.retryable
    assert len(fake.requests) == 1
    assert sleep.calls == []


async def test_create_429_is_retryable_with_known_outcome(
    provider: OpenAIProvider, fake: FakeApi, sleep: RecordingSleep
) -> None:
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    fake.on("POST", "/v1/batches", answer(429, headers={"retry-after-ms": "2500"}, json=body))
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert info.value.retryable and not info.value.outcome_unknown
    assert info.value.retry_after == 2.5
    assert len(fake.requests) == 1 and sleep.calls == []


async def test_create_400_is_final(provider: OpenAIProvider, fake: FakeApi) -> None:
    body = {"error": {"message": "Invalid endpoint", "type": "invalid_request_error", "param": "endpoint"}}
    fake.on("POST", "/v1/batches", answer(400, json=body))
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert not info.value.retryable and not info.value.outcome_unknown
    assert "Invalid endpoint" in info.value.message and "param=endpoint" in info.value.message


# -- get / cancel ---------------------------------------------------------


async def test_get_reads_every_field(provider: OpenAIProvider, fake: FakeApi) -> None:
    wire = batch(
        status="completed",
        output_file_id="file-out",
        error_file_id="",
        finalizing_at=T0 + 50,
        completed_at=T0 + 60,
        request_counts={"total": 2, "completed": 2, "failed": 0},
        metadata={"batchd_job_id": "job-1", "team": "search"},
    )
    fake.on("GET", "/v1/batches/batch_1", answer(200, json=wire))
    got = await provider.get_batch("batch_1")
    assert got.status is RemoteStatus.COMPLETED
    assert got.created_at == datetime.fromtimestamp(T0, UTC)
    assert got.output_file_id == "file-out"
    # An empty string means no file.
    assert got.error_file_id is None
    assert got.request_counts == {"total": 2, "completed": 2, "failed": 0}
    assert got.metadata == {"batchd_job_id": "job-1", "team": "search"}
    assert got.error is None
    assert got.raw == wire
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_completed_without_an_output_file(provider: OpenAIProvider, fake: FakeApi) -> None:
    wire = batch(status="completed", output_file_id="", error_file_id="file-err")
    fake.on("GET", "/v1/batches/batch_1", answer(200, json=wire))
    got = await provider.get_batch("batch_1")
    assert (got.status, got.output_file_id, got.error_file_id) == (RemoteStatus.COMPLETED, None, "file-err")


async def test_get_429_retried_honouring_retry_after(
    provider: OpenAIProvider, fake: FakeApi, sleep: RecordingSleep
) -> None:
    fake.on(
        "GET",
        "/v1/batches/batch_1",
        answer(429, headers={"retry-after": "3"}, json={"error": {"message": "slow down"}}),
        answer(200, json=batch()),
    )
    assert (await provider.get_batch("batch_1")).id == "batch_1"
    assert sleep.calls == [3.0]


async def test_get_not_found_is_final(provider: OpenAIProvider, fake: FakeApi) -> None:
    body = {"error": {"message": "No batch found with id 'nope'.", "type": "invalid_request_error"}}
    fake.on("GET", "/v1/batches/nope", answer(404, json=body))
    with pytest.raises(ProviderError) as info:
        await provider.get_batch("nope")
    assert not info.value.retryable and info.value.status_code == 404
    assert "No batch found" in info.value.message
    assert len(fake.requests) == 1


async def test_batch_id_is_one_path_segment(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches/a/../b", answer(200, json=batch(id="a/../b")))
    await provider.get_batch("a/../b")
    assert fake.requests[0].url.raw_path == b"/v1/batches/a%2F..%2Fb"


async def test_cancel(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches/batch_1/cancel", answer(200, json=batch(status="cancelling", cancelling_at=T0 + 9)))
    assert (await provider.cancel_batch("batch_1")).status is RemoteStatus.CANCELLING
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


# -- list -----------------------------------------------------------------


def page(ids: list[str], *, has_more: bool, last_id: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": [batch(id=i) for i in ids], "has_more": has_more}
    if last_id:
        body.update(first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)
    return body


async def test_list_follows_the_cursor_through_every_page(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on(
        "GET",
        "/v1/batches",
        answer(200, json=page(["b3", "b2"], has_more=True)),
        answer(200, json=page(["b1"], has_more=True, last_id=False)),
        answer(200, json=page([], has_more=False)),
    )
    batches = await provider.list_batches()
    assert [b.id for b in batches] == ["b3", "b2", "b1"]
    assert [dict(r.url.params) for r in fake.requests] == [
        {"limit": "100"},
        {"limit": "100", "after": "b2"},
        # Without last_id, the cursor is the last batch of the page.
        {"limit": "100", "after": "b1"},
    ]


async def test_list_page_retried_on_its_own(provider: OpenAIProvider, fake: FakeApi, sleep: RecordingSleep) -> None:
    fake.on(
        "GET",
        "/v1/batches",
        answer(200, json=page(["b2"], has_more=True)),
        answer(502),
        answer(200, json=page(["b1"], has_more=False)),
    )
    assert [b.id for b in await provider.list_batches()] == ["b2", "b1"]
    assert [r.url.params.get("after") for r in fake.requests] == [None, "b2", "b2"]
    assert len(sleep.calls) == 1


async def test_list_cursor_that_does_not_move_is_an_error(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches", answer(200, json=page(["b2"], has_more=True)))
    with pytest.raises(ProviderError, match="same cursor"):
        await provider.list_batches()
    assert len(fake.requests) == 2


def dated_page(items: list[tuple[str, int]], *, has_more: bool) -> dict[str, Any]:
    """A page of batches given as (id, created_at), newest first as OpenAI lists them."""
    data = [batch(id=i, created_at=t) for i, t in items]
    return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"], "has_more": has_more}


async def test_list_of_wanted_batches_stops_once_all_are_found(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on(
        "GET",
        "/v1/batches",
        answer(200, json=dated_page([("b9", T0 + 9), ("b8", T0 + 8)], has_more=True)),
        answer(200, json=dated_page([("b7", T0 + 7), ("b6", T0 + 6)], has_more=True)),
        answer(200, json=dated_page([("b5", T0 + 5), ("b4", T0 + 4)], has_more=True)),
    )
    batches = await provider.list_batches(wanted=["b8", "b7"])
    assert [b.id for b in batches] == ["b8", "b7"]
    assert [r.url.params.get("after") for r in fake.requests] == [None, "b8"]


def three_dated_pages(fake: FakeApi) -> None:
    fake.script.clear()
    fake.on(
        "GET",
        "/v1/batches",
        answer(200, json=dated_page([("b9", T0 + 9), ("b8", T0 + 8)], has_more=True)),
        answer(200, json=dated_page([("b7", T0 + 7), ("b4", T0 + 4)], has_more=True)),
        answer(200, json=dated_page([("b3", T0 + 3), ("b2", T0 + 2)], has_more=False)),
    )


async def test_list_stops_at_the_page_that_reaches_since(provider: OpenAIProvider, fake: FakeApi) -> None:
    since = datetime.fromtimestamp(T0 + 5, UTC)
    three_dated_pages(fake)
    # b2 is wanted but older than `since`: not searched for beyond the page that reached it.
    batches = await provider.list_batches(wanted=["b9", "b2"], since=since)
    assert [b.id for b in batches] == ["b9"]
    assert len(fake.requests) == 2
    # Without `wanted` (reconciliation), the same bound; what was read is returned, not filtered.
    three_dated_pages(fake)
    assert [b.id for b in await provider.list_batches(since=since)] == ["b9", "b8", "b7", "b4"]
    assert len(fake.requests) == 4


async def test_list_without_arguments_still_reads_every_page(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on(
        "GET",
        "/v1/batches",
        answer(200, json=dated_page([("b2", T0 + 2)], has_more=True)),
        answer(200, json=dated_page([("b1", T0 + 1)], has_more=False)),
    )
    assert [b.id for b in await provider.list_batches()] == ["b2", "b1"]
    assert len(fake.requests) == 2


async def test_list_parses_only_wanted_items(provider: OpenAIProvider, fake: FakeApi) -> None:
    broken = [batch(id="odd", status="sleeping"), batch(id=None), batch(id=["x"]), {"object": "batch"}]
    body = {"object": "list", "data": [*broken, batch(id="b1")], "has_more": False}
    fake.on("GET", "/v1/batches", answer(200, json=body))
    assert [b.id for b in await provider.list_batches(wanted={"b1", "b0"})] == ["b1"]
    # Asked for everything, the same page is malformed.
    with pytest.raises(ProviderError, match="unknown status"):
        await provider.list_batches()


async def test_list_of_no_wanted_batch_asks_nothing(provider: OpenAIProvider, fake: FakeApi) -> None:
    assert await provider.list_batches(wanted=set()) == []
    assert fake.requests == []


async def test_list_page_without_any_cursor_is_an_error(provider: OpenAIProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches", answer(200, json={"object": "list", "data": [{"id": 7}], "has_more": True}))
    with pytest.raises(ProviderError, match="no cursor"):
        await provider.list_batches(wanted={"b1"})


@pytest.mark.parametrize("body", [[batch()], {"object": "list"}, {"data": ["x"]}])
async def test_list_malformed(provider: OpenAIProvider, fake: FakeApi, body: Any) -> None:
    fake.on("GET", "/v1/batches", answer(200, json=body))
    with pytest.raises(ProviderError, match="data"):
        await provider.list_batches()


# -- wire parsing ---------------------------------------------------------


@pytest.mark.parametrize("status", [s.value for s in RemoteStatus])
def test_every_status_is_read(status: str) -> None:
    assert parse_batch(batch(status=status)).status.value == status


def test_validation_errors_name_their_lines() -> None:
    wire = batch(
        status="failed",
        failed_at=T0 + 3,
        errors={
            "object": "list",
            "data": [
                {
                    "code": "missing_required_parameter",
                    "line": 2,
                    "message": "custom_id is missing",
                    "param": "custom_id",
                },
                {"code": "invalid_url", "line": 5, "message": "url must be /v1/chat/completions", "param": None},
                {"code": "too_large", "line": None, "message": "file too large", "param": None},
            ],
        },
    )
    assert parse_batch(wire).error == (
        "line 2: custom_id is missing (code=missing_required_parameter, param=custom_id); "
        "line 5: url must be /v1/chat/completions (code=invalid_url); "
        "file too large (code=too_large)"
    )


def test_many_errors_are_summarised() -> None:
    data = [{"code": "bad", "line": i, "message": "bad line"} for i in range(1, 26)]
    text = errors_text({"object": "list", "data": data})
    assert text is not None
    assert text.count("bad line") == 10 and text.endswith("; and 15 more")


@pytest.mark.parametrize("wire", [batch(status="paused"), batch(id=None), {"status": "completed"}, batch(id="")])
def test_parse_batch_malformed(wire: dict[str, Any]) -> None:
    with pytest.raises(ProviderError):
        parse_batch(wire)


def test_parse_batch_tolerates_odd_fields() -> None:
    parsed = parse_batch(batch(request_counts="many", metadata=["x"], created_at="not a time", errors={"data": []}))
    assert (parsed.request_counts, parsed.metadata, parsed.created_at, parsed.error) == (None, None, None, None)


# -- download (the shared implementation, on OpenAI's path) ------------------

CONTENT = bytes(range(256)) * 400
CONTENT_PATH = "/v1/files/file-out/content"


def serve_content(request: httpx.Request) -> httpx.Response:
    header = request.headers.get("range")
    if header is None:
        return httpx.Response(200, content=CONTENT)
    start = int(header.removeprefix("bytes=").removesuffix("-"))
    return httpx.Response(
        206, content=CONTENT[start:], headers={"Content-Range": f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"}
    )


async def test_download_resumes_a_dropped_body_with_range(
    provider: OpenAIProvider, fake: FakeApi, tmp_path: Path
) -> None:
    dropped = answer(200, stream=BrokenStream(CONTENT, 50_000), headers={"Content-Length": str(len(CONTENT))})
    fake.on("GET", CONTENT_PATH, dropped, serve_content)
    dest = tmp_path / "out.jsonl"
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert [r.headers.get("range") for r in fake.requests] == [None, "bytes=50000-"]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert str(fake.requests[0].url) == f"{BASE}/files/file-out/content"


# -- secrets and memory -----------------------------------------------------


async def test_key_never_in_repr_or_logs(
    provider: OpenAIProvider, fake: FakeApi, batch_file: Path, tmp_path: Path
) -> None:
    assert KEY not in repr(provider)
    fake.on("POST", "/v1/files", answer(500), answer(200, json=file_object()))
    fake.on("POST", "/v1/batches", answer(200, json=batch()))
    fake.on("GET", "/v1/batches", answer(429), answer(200, json=page(["b1"], has_more=False)))
    fake.on("GET", CONTENT_PATH, serve_content)
    with capture_logs() as logs:
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)
        await create(provider)
        await provider.list_batches()
        await provider.download_file("file-out", tmp_path / "o.jsonl")
        fake.on("GET", "/v1/batches/b-2", raise_(httpx.ConnectError("refused")))
        with pytest.raises(ProviderError) as info:
            await provider.get_batch("b-2")
    assert {"provider.upload", "provider.create", "provider.retry", "provider.download"} <= {e["event"] for e in logs}
    assert KEY not in repr(logs)
    assert KEY not in str(info.value)


BIG = 32 * 2**20
PIECE = b"x" * 65536


async def test_upload_streams_from_disk(fake: FakeApi, sleep: RecordingSleep, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        for _ in range(BIG // len(PIECE)):
            f.write(PIECE)
    fake.keep_bodies = False
    fake.on("POST", "/v1/files", answer(200, json=file_object(bytes=BIG)))
    async with httpx.AsyncClient(transport=StreamingTransport(fake)) as http:
        provider = OpenAIProvider(http, base_url=BASE, api_key=KEY, sleep=sleep)
        tracemalloc.start()
        try:
            await provider.upload_file(big, filename="big.jsonl", sha256="0" * 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert fake.body_sizes[0] > BIG
    assert peak < BIG // 4


# -- configuration ----------------------------------------------------------


async def test_the_daemon_opens_openai_for_kind_openai(tmp_path: Path) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text('state_dir = "state"\n[provider]\nkind = "openai"\n', encoding="utf-8")
    settings = load_settings(config, environ={"OPENAI_API_KEY": KEY})
    async with httpx.AsyncClient() as http, open_provider(settings, http) as opened:
        assert isinstance(opened, OpenAIProvider)
        assert (opened.kind, opened.base_url) == ("openai", "https://api.openai.com/v1")
        assert opened.limits == PROVIDER_LIMITS["openai"]
