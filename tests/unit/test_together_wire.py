"""TogetherProvider against a scripted Together over httpx.MockTransport: the exact wire."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from batchd.backoff import RetryPolicy
from batchd.models import PROVIDER_LIMITS, RemoteStatus
from batchd.providers.base import Provider, ProviderError
from batchd.providers.together import TogetherProvider, normalise_base_url, parse_batch_job
from batchd.providers.wire import ArrayItems, parse_error_message
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

KEY = "tgp_v1_secret-key-do-not-log"
BASE = "https://api.together.test"
STORAGE = "https://storage.test/upload/abc?sig=xyz"


def job(**overrides: Any) -> dict[str, Any]:
    """A BatchJob as Together sends it."""
    body: dict[str, Any] = {
        "id": "b-1",
        "user_id": "u-1",
        "input_file_id": "file-1",
        "file_size_bytes": 170,
        "status": "IN_PROGRESS",
        "job_deadline": "2026-11-26T21:00:00Z",
        "created_at": "2026-11-25T21:00:00Z",
        "endpoint": "/v1/chat/completions",
        "progress": 42.0,
        "model_id": None,
        "output_file_id": None,
        "error_file_id": None,
        "error": None,
        "completed_at": None,
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
def provider(http: httpx.AsyncClient, sleep: RecordingSleep) -> TogetherProvider:
    return TogetherProvider(http, base_url=BASE + "/v1/", api_key=KEY, retry=RetryPolicy(attempts=3), sleep=sleep)


# -- construction ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.together.ai", "https://api.together.ai"),
        ("https://api.together.ai/", "https://api.together.ai"),
        ("https://api.together.ai/v1", "https://api.together.ai"),
        ("https://api.together.ai/v1/", "https://api.together.ai"),
        ("http://127.0.0.1:8787/prefix/v1", "http://127.0.0.1:8787/prefix"),
        ("https://api.together.ai/v10", "https://api.together.ai/v10"),
    ],
)
def test_normalise_base_url(given: str, expected: str) -> None:
    assert normalise_base_url(given) == expected


def test_provider_defaults(provider: TogetherProvider) -> None:
    checked: Provider = provider
    assert checked.kind == "together"
    assert provider.limits == PROVIDER_LIMITS["together"]
    assert provider.base_url == BASE


def test_local_kind_takes_local_limits(http: httpx.AsyncClient) -> None:
    local = TogetherProvider(http, base_url="http://127.0.0.1:1", api_key="k", kind="local")
    assert local.limits == PROVIDER_LIMITS["local"]


# -- upload ---------------------------------------------------------------


BATCH_BYTES = b'{"custom_id": "a"}\n' * 1000


@pytest.fixture
def batch_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(BATCH_BYTES)
    return path


def redirect_to_storage(request: httpx.Request) -> httpx.Response:
    return httpx.Response(302, headers={"Location": STORAGE, "X-Together-File-Id": "file-new"})


async def test_upload_three_steps(provider: TogetherProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", redirect_to_storage)
    fake.on("PUT", "/upload/abc", answer(200))
    fake.on("POST", "/v1/files/file-new/preprocess", answer(200, json={"id": "file-new", "Processed": True}))

    file_id = await provider.upload_file(batch_file, filename="batch.jsonl", sha256="ab" * 32)

    assert file_id == "file-new"
    assert [(r.method, str(r.url)) for r in fake.requests] == [
        ("POST", f"{BASE}/v1/files"),
        ("PUT", STORAGE),
        ("POST", f"{BASE}/v1/files/file-new/preprocess"),
    ]
    start, put, preprocess = fake.requests
    start_body, put_body, _ = fake.bodies

    # Step 1: exactly four plain form fields, no file part.
    assert start.headers["authorization"] == f"Bearer {KEY}"
    assert start.headers["content-type"].startswith("multipart/form-data; boundary=")
    parts = form_parts(start, start_body)
    assert all(part.get_filename() is None for part in parts)
    fields = {part.get_param("name", header="content-disposition"): part.get_content() for part in parts}
    assert fields == {
        "purpose": "batch-api",
        "file_name": "batch.jsonl",
        "file_type": "jsonl",
        "checksum": "ab" * 32,
    }

    # Step 2: raw bytes to storage, never our key.
    assert "authorization" not in put.headers
    assert put.headers["content-type"] == "application/octet-stream"
    assert put.headers["content-length"] == str(len(BATCH_BYTES))
    assert "transfer-encoding" not in put.headers
    assert put_body == BATCH_BYTES

    # Step 3: authorised, no body.
    assert preprocess.headers["authorization"] == f"Bearer {KEY}"


async def test_upload_relative_location_resolves_against_the_api(
    provider: TogetherProvider, fake: FakeApi, batch_file: Path
) -> None:
    fake.on("POST", "/v1/files", answer(302, headers={"Location": "/_store/x", "X-Together-File-Id": "f-2"}))
    fake.on("PUT", "/_store/x", answer(200))
    fake.on("POST", "/v1/files/f-2/preprocess", answer(200, json={}))
    assert await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64) == "f-2"
    assert str(fake.requests[1].url) == f"{BASE}/_store/x"
    assert "authorization" not in fake.requests[1].headers


async def test_upload_409_reuses_the_existing_file(provider: TogetherProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", answer(409, json={"file_id": "file-old"}))
    assert await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64) == "file-old"
    assert len(fake.requests) == 1


async def test_upload_start_other_status_is_an_error(
    provider: TogetherProvider, fake: FakeApi, batch_file: Path
) -> None:
    body = {"error": {"message": "Invalid purpose", "type": "invalid_request_error", "param": "purpose"}}
    fake.on("POST", "/v1/files", answer(400, json=body))
    with pytest.raises(ProviderError) as info:
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)
    assert not info.value.retryable
    assert info.value.status_code == 400
    assert "Invalid purpose" in info.value.message
    assert "invalid_request_error" in info.value.message
    assert len(fake.requests) == 1


async def test_upload_302_without_headers_is_an_error(
    provider: TogetherProvider, fake: FakeApi, batch_file: Path
) -> None:
    fake.on("POST", "/v1/files", answer(302, headers={"Location": STORAGE}))
    with pytest.raises(ProviderError, match="X-Together-File-Id"):
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)


async def test_upload_steps_are_retried(
    provider: TogetherProvider, fake: FakeApi, batch_file: Path, sleep: RecordingSleep
) -> None:
    fake.on("POST", "/v1/files", answer(503), redirect_to_storage)
    fake.on("PUT", "/upload/abc", raise_(httpx.WriteError("reset")), answer(200))
    fake.on("POST", "/v1/files/file-new/preprocess", answer(500), answer(200, json={}))
    assert await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64) == "file-new"
    assert len(fake.requests) == 6
    assert len(sleep.calls) == 3
    # The retried PUT streams the whole file again.
    assert fake.bodies[3] == BATCH_BYTES


async def test_upload_put_refused_is_an_error(provider: TogetherProvider, fake: FakeApi, batch_file: Path) -> None:
    fake.on("POST", "/v1/files", redirect_to_storage)
    fake.on("PUT", "/upload/abc", answer(403, text="<Error>SignatureDoesNotMatch</Error>"))
    with pytest.raises(ProviderError, match="SignatureDoesNotMatch"):
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)
    assert not fake.sent("POST", "/v1/files/file-new/preprocess")


# -- create ---------------------------------------------------------------


async def create(provider: TogetherProvider) -> Any:
    return await provider.create_batch(
        input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h", job_id="j-1"
    )


async def test_create_201(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches", answer(201, json={"job": job(status="VALIDATING"), "warning": None}))
    batch = await create(provider)
    assert batch.id == "b-1"
    assert batch.status is RemoteStatus.VALIDATING
    assert batch.input_file_id == "file-1"
    request = fake.requests[0]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(fake.bodies[0]) == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }


async def test_create_null_job_carries_the_warning(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches", answer(201, json={"job": None, "warning": "model not available"}))
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert "model not available" in info.value.message
    assert not info.value.retryable
    assert not info.value.outcome_unknown


@pytest.mark.parametrize(
    "handler",
    [
        answer(503, json={"error": "capacity"}),
        answer(500),
        raise_(httpx.ReadTimeout("timed out")),
        raise_(httpx.RemoteProtocolError("peer closed")),
        answer(201, text="<html>"),
    ],
    ids=["503", "500", "timeout", "protocol", "unreadable-201"],
)
async def test_create_lost_answer_is_outcome_unknown_and_sent_once(
    provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep, handler: Handler
) -> None:
    fake.on("POST", "/v1/batches", handler)
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert info.value.outcome_unknown
    assert info.value.retryable
    assert len(fake.requests) == 1
    assert sleep.calls == []


async def test_create_429_is_retryable_with_known_outcome(
    provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep
) -> None:
    fake.on("POST", "/v1/batches", answer(429, headers={"retry-after": "4"}, json={"error": "rate"}))
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert info.value.retryable
    assert not info.value.outcome_unknown
    assert info.value.retry_after == 4.0
    assert info.value.status_code == 429
    assert len(fake.requests) == 1
    assert sleep.calls == []


async def test_create_400_is_final(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches", answer(400, json={"error": "Invalid endpoint"}))
    with pytest.raises(ProviderError) as info:
        await create(provider)
    assert not info.value.retryable
    assert not info.value.outcome_unknown
    assert "Invalid endpoint" in info.value.message


# -- get / list / cancel --------------------------------------------------


async def test_get_429_retried_honouring_retry_after(
    provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep
) -> None:
    fake.on(
        "GET",
        "/v1/batches/b-1",
        answer(429, headers={"retry-after": "3"}, json={"error": "slow down"}),
        answer(200, json=job(status="COMPLETED", output_file_id="file-out")),
    )
    batch = await provider.get_batch("b-1")
    assert batch.status is RemoteStatus.COMPLETED
    assert batch.output_file_id == "file-out"
    # Jitter for the first retry is at most 0.5 s; the server asked for 3.
    assert sleep.calls == [3.0]
    assert len(fake.requests) == 2


async def test_get_transport_error_retried(provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep) -> None:
    fake.on("GET", "/v1/batches/b-1", raise_(httpx.ConnectError("refused")), answer(200, json=job()))
    assert (await provider.get_batch("b-1")).id == "b-1"
    assert len(sleep.calls) == 1


async def test_get_gives_up_after_the_policy(provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep) -> None:
    fake.on("GET", "/v1/batches/b-1", answer(503, json={"error": "capacity"}))
    with pytest.raises(ProviderError) as info:
        await provider.get_batch("b-1")
    assert info.value.status_code == 503
    assert info.value.retryable
    assert len(fake.requests) == 3
    assert len(sleep.calls) == 2


async def test_batch_endpoint_error_shape(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches/nope", answer(404, json={"error": "Batch job not found"}))
    with pytest.raises(ProviderError) as info:
        await provider.get_batch("nope")
    assert not info.value.retryable
    assert info.value.status_code == 404
    assert "Batch job not found" in info.value.message
    assert len(fake.requests) == 1


async def test_batch_id_is_one_path_segment(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches/a/../b", answer(200, json=job(id="a/../b")))
    await provider.get_batch("a/../b")
    assert fake.requests[0].url.raw_path == b"/v1/batches/a%2F..%2Fb"


async def test_list_bare_array(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches", answer(200, json=[job(id="b-1"), job(id="b-2", status="CANCELING")]))
    batches = await provider.list_batches()
    assert [(b.id, b.status) for b in batches] == [
        ("b-1", RemoteStatus.IN_PROGRESS),
        ("b-2", RemoteStatus.CANCELLING),
    ]


async def test_list_parses_only_wanted_items(provider: TogetherProvider, fake: FakeApi) -> None:
    listed = [job(id="odd", status="SLEEPING"), job(id=None), job(id="b-1"), job(id="b-2")]
    fake.on("GET", "/v1/batches", answer(200, json=listed))
    since = datetime(2020, 1, 1, tzinfo=UTC)
    batches = await provider.list_batches(wanted=["b-2", "b-9"], since=since)
    assert [b.id for b in batches] == ["b-2"]
    # One array, no pages: one call whatever is asked.
    assert len(fake.requests) == 1
    with pytest.raises(ProviderError, match="unknown status"):
        await provider.list_batches()
    assert await provider.list_batches(wanted=()) == []
    assert len(fake.requests) == 2


async def test_list_not_an_array(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("GET", "/v1/batches", answer(200, json={"data": []}))
    with pytest.raises(ProviderError, match="array"):
        await provider.list_batches()


async def test_cancel(provider: TogetherProvider, fake: FakeApi) -> None:
    fake.on("POST", "/v1/batches/b-1/cancel", answer(200, json=job(status="CANCELLED")))
    assert (await provider.cancel_batch("b-1")).status is RemoteStatus.CANCELLED
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"


# -- wire parsing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        ("VALIDATING", RemoteStatus.VALIDATING),
        ("IN_PROGRESS", RemoteStatus.IN_PROGRESS),
        ("COMPLETED", RemoteStatus.COMPLETED),
        ("FAILED", RemoteStatus.FAILED),
        ("EXPIRED", RemoteStatus.EXPIRED),
        ("CANCELLED", RemoteStatus.CANCELLED),
        ("CANCELING", RemoteStatus.CANCELLING),
        ("in_progress", RemoteStatus.IN_PROGRESS),
    ],
)
def test_status_normalised(wire: str, status: RemoteStatus) -> None:
    assert parse_batch_job(job(status=wire)).status is status


def test_parse_batch_job_fields() -> None:
    wire = job(
        status="FAILED",
        created_at="2026-11-25T21:00:00.123456Z",
        output_file_id="",
        error_file_id="file-err",
        error="input file malformed",
        progress=100,
    )
    batch = parse_batch_job(wire)
    assert batch.created_at == datetime(2026, 11, 25, 21, 0, 0, 123456, tzinfo=UTC)
    assert batch.created_at.tzinfo is not None
    assert batch.output_file_id is None
    assert batch.error_file_id == "file-err"
    assert batch.error == "input file malformed"
    assert batch.progress == 100.0
    assert batch.endpoint == "/v1/chat/completions"
    assert batch.raw == wire


def test_parse_batch_job_offset_time_and_error_object() -> None:
    batch = parse_batch_job(
        job(created_at="2026-11-25T23:00:00+02:00", error={"message": "quota exceeded", "code": "quota"})
    )
    assert batch.created_at == datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
    assert batch.error == "quota exceeded (code=quota)"


@pytest.mark.parametrize("wire", [job(status="SOMETHING_NEW"), job(id=None), {"status": "COMPLETED"}])
def test_parse_batch_job_malformed(wire: dict[str, Any]) -> None:
    with pytest.raises(ProviderError):
        parse_batch_job(wire)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"error": "Batch job not found"}, "Batch job not found"),
        (
            {"error": {"message": "bad file", "type": "invalid_request_error", "param": None, "code": 400}},
            "bad file (type=invalid_request_error, code=400)",
        ),
        ({"error": {"message": "plain"}}, "plain"),
        ({"message": "top level"}, "top level"),
        ("not an object", None),
        ({}, None),
    ],
)
def test_error_message_shapes(payload: Any, message: str | None) -> None:
    assert parse_error_message(payload) == message


# -- download -------------------------------------------------------------

CONTENT = bytes(range(256)) * 400  # 102,400 bytes


def serve_content(request: httpx.Request) -> httpx.Response:
    """Honours `Range: bytes=N-` like a storage server."""
    header = request.headers.get("range")
    if header is None:
        return httpx.Response(200, content=CONTENT)
    start = int(header.removeprefix("bytes=").removesuffix("-"))
    if start >= len(CONTENT):
        return httpx.Response(416, headers={"Content-Range": f"bytes */{len(CONTENT)}"})
    return httpx.Response(
        206,
        content=CONTENT[start:],
        headers={"Content-Range": f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}"},
    )


def short_body(cut: int) -> Handler:
    """Announces the whole length but sends only `cut` bytes."""
    return answer(200, content=CONTENT[:cut], headers={"Content-Length": str(len(CONTENT))})


def ranges(fake: FakeApi) -> Iterator[str | None]:
    return (r.headers.get("range") for r in fake.requests)


CONTENT_PATH = "/v1/files/file-out/content"


async def test_download_whole(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    fake.on("GET", CONTENT_PATH, serve_content)
    dest = tmp_path / "out.jsonl"
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    request = fake.requests[0]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "range" not in request.headers


async def test_download_short_body_resumed_with_range(
    provider: TogetherProvider, fake: FakeApi, sleep: RecordingSleep, tmp_path: Path
) -> None:
    fake.on("GET", CONTENT_PATH, short_body(30_000), serve_content)
    dest = tmp_path / "out.jsonl"
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert list(ranges(fake)) == [None, "bytes=30000-"]
    assert len(sleep.calls) == 1


async def test_download_dropped_connection_keeps_prefix(
    provider: TogetherProvider, fake: FakeApi, tmp_path: Path
) -> None:
    dropped = answer(200, stream=BrokenStream(CONTENT, 50_000), headers={"Content-Length": str(len(CONTENT))})
    fake.on("GET", CONTENT_PATH, dropped, serve_content)
    dest = tmp_path / "out.jsonl"
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert list(ranges(fake)) == [None, "bytes=50000-"]


async def test_download_short_body_without_retries_leaves_prefix(
    http: httpx.AsyncClient, fake: FakeApi, sleep: RecordingSleep, tmp_path: Path
) -> None:
    once = TogetherProvider(http, base_url=BASE, api_key=KEY, retry=RetryPolicy(attempts=1), sleep=sleep)
    fake.on("GET", CONTENT_PATH, short_body(1000))
    dest = tmp_path / "out.jsonl"
    with pytest.raises(ProviderError) as info:
        await once.download_file("file-out", dest)
    assert info.value.retryable
    assert dest.read_bytes() == CONTENT[:1000]


async def test_download_existing_prefix_resumes(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    fake.on("GET", CONTENT_PATH, serve_content)
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(CONTENT[:777])
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert list(ranges(fake)) == ["bytes=777-"]


async def test_download_range_ignored_rewrites(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    fake.on("GET", CONTENT_PATH, answer(200, content=CONTENT))
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"stale prefix that is not the file")
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT


async def test_download_already_complete(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    fake.on("GET", CONTENT_PATH, serve_content)
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(CONTENT)
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert list(ranges(fake)) == [f"bytes={len(CONTENT)}-"]


async def test_download_wrong_206_start_starts_over(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    wrong = answer(206, content=CONTENT[5:], headers={"Content-Range": f"bytes 5-{len(CONTENT) - 1}/{len(CONTENT)}"})
    fake.on("GET", CONTENT_PATH, wrong, serve_content)
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(CONTENT[:10])
    assert await provider.download_file("file-out", dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert list(ranges(fake)) == ["bytes=10-", None]


async def test_download_not_found(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    body = {"error": {"message": "File not found", "type": "invalid_request_error", "code": "not_found"}}
    fake.on("GET", CONTENT_PATH, answer(404, json=body))
    with pytest.raises(ProviderError) as info:
        await provider.download_file("file-out", tmp_path / "out.jsonl")
    assert not info.value.retryable
    assert "File not found" in info.value.message


# -- secrets --------------------------------------------------------------


async def test_key_never_in_repr_or_logs(
    provider: TogetherProvider, fake: FakeApi, batch_file: Path, tmp_path: Path
) -> None:
    assert KEY not in repr(provider)
    assert KEY not in str(vars(provider).get("base_url"))
    fake.on("POST", "/v1/files", answer(503), redirect_to_storage)
    fake.on("PUT", "/upload/abc", answer(200))
    fake.on("POST", "/v1/files/file-new/preprocess", answer(200, json={}))
    fake.on("POST", "/v1/batches", answer(201, json={"job": job(), "warning": "w"}))
    fake.on("GET", "/v1/batches/b-1", answer(429, json={"error": "slow"}), answer(200, json=job()))
    fake.on("GET", CONTENT_PATH, short_body(10), serve_content)
    with capture_logs() as logs:
        await provider.upload_file(batch_file, filename="b.jsonl", sha256="0" * 64)
        await create(provider)
        await provider.get_batch("b-1")
        await provider.download_file("file-out", tmp_path / "o.jsonl")
        fake.on("GET", "/v1/batches/b-2", raise_(httpx.ConnectError("refused")))
        with pytest.raises(ProviderError) as info:
            await provider.get_batch("b-2")
    names = {entry["event"] for entry in logs}
    assert {"provider.upload", "provider.create", "provider.retry", "provider.download"} <= names
    assert KEY not in repr(logs)
    assert KEY not in str(info.value)


# -- memory ---------------------------------------------------------------

BIG = 32 * 2**20
PIECE = b"x" * 65536


def traced_peak() -> int:
    return tracemalloc.get_traced_memory()[1]


async def test_upload_streams_from_disk(fake: FakeApi, sleep: RecordingSleep, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        for _ in range(BIG // len(PIECE)):
            f.write(PIECE)
    fake.keep_bodies = False
    fake.on("POST", "/v1/files", redirect_to_storage)
    fake.on("PUT", "/upload/abc", answer(200))
    fake.on("POST", "/v1/files/file-new/preprocess", answer(200, json={}))
    async with httpx.AsyncClient(transport=StreamingTransport(fake)) as http:
        provider = TogetherProvider(http, base_url=BASE, api_key=KEY, sleep=sleep)
        tracemalloc.start()
        try:
            await provider.upload_file(big, filename="big.jsonl", sha256="0" * 64)
            peak = traced_peak()
        finally:
            tracemalloc.stop()
    assert fake.body_sizes[1] == BIG
    assert peak < BIG // 4


async def test_download_streams_to_disk(provider: TogetherProvider, fake: FakeApi, tmp_path: Path) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(BIG // len(PIECE)):
            yield PIECE

    fake.on("GET", CONTENT_PATH, lambda r: httpx.Response(200, content=body(), headers={"Content-Length": str(BIG)}))
    dest = tmp_path / "big.jsonl"
    tracemalloc.start()
    try:
        assert await provider.download_file("file-out", dest) == BIG
        peak = traced_peak()
    finally:
        tracemalloc.stop()
    assert dest.stat().st_size == BIG
    assert peak < BIG // 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty body"),
        (b"  [1, 2]", "array of objects"),
        (b'[{"id": "b-1", "status": ', "not JSON"),
        (b"[{oops}]", "not JSON"),
        (b'{"id": "b-1"}', "expected a JSON array"),
    ],
)
async def test_list_bodies_that_are_not_an_array_of_objects(
    provider: TogetherProvider, fake: FakeApi, body: bytes, message: str
) -> None:
    fake.on("GET", "/v1/batches", answer(200, content=body))
    with pytest.raises(ProviderError, match=message):
        await provider.list_batches()


def test_array_items_come_out_whole_whatever_the_chunks() -> None:
    listed = [job(id=f"b-{i}", progress=0.5 * i) for i in range(50)]
    body = json.dumps(listed).encode()
    for size in (1, 7, 4096):
        array = ArrayItems("together.list")
        items = []
        for start in range(0, len(body), size):
            items.extend(array.feed(body[start : start + size]))
        items.extend(array.close())
        assert items == listed  # floats as floats, every object once, in order


async def test_a_long_account_list_is_never_in_memory_whole(provider: TogetherProvider, fake: FakeApi) -> None:
    # 20,000 batches (about 10 MB of JSON) for a sweep that wants two of them.
    chunk = b"".join(b"," + json.dumps(job(id=f"old-{i}")).encode() for i in range(1000))

    def stream(request: httpx.Request) -> httpx.Response:
        async def parts() -> AsyncIterator[bytes]:
            yield b"[" + json.dumps(job(id="b-1")).encode()
            for _ in range(20):
                yield chunk
            yield b"," + json.dumps(job(id="b-2")).encode() + b"]"

        return httpx.Response(200, content=parts())

    fake.on("GET", "/v1/batches", stream)
    tracemalloc.start()
    try:
        batches = await provider.list_batches(wanted=["b-1", "b-2"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [b.id for b in batches] == ["b-1", "b-2"]
    # The objects of a chunk or two at a time: less than half of the body's bytes, let alone the
    # objects of the whole array (reading the body whole peaks at several times its size).
    assert peak < 20 * len(chunk) / 2
