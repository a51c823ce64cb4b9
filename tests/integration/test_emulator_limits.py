"""What the emulator refuses without harm: bodies over its cap (413, unread), malformed or too-deep
JSON (400 in the dialect's shape, or a failed batch naming the line), and it keeps serving after."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest

from batchd.emulator.bodies import MAX_JSON_BODY_BYTES
from batchd.jsonl import MAX_JSON_DEPTH
from tests.integration.emulator_helpers import (
    NO_AUTH,
    asgi_emulator,
    create_batch,
    http_emulator,
    openai_create,
    openai_upload,
    openai_wait,
    request_line,
    run_batch,
    to_jsonl,
    upload,
    wait_for_batch,
)

CAP = 64 * 1024
CHUNK = 16 * 1024


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


class Body:
    """A body streamed from a generator (never built in memory) that counts what was taken of it."""

    def __init__(self, size: int, start: bytes = b"") -> None:
        self.size = size
        self.start = start
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.start:
            self.taken += len(self.start)
            yield self.start
        block = b"x" * CHUNK
        while self.taken < self.size:
            self.taken += CHUNK
            yield block

    async def stream(self) -> AsyncIterator[bytes]:
        """The same bytes for the async client."""
        for block in self:
            yield block


def send_blocking(base_url: str, method: str, path: str, body: Body, token: str | None) -> httpx.Response:
    """Send `body` with the synchronous client, which reads the answer of a server that stopped reading.

    (The async client cannot: once a write fails, its anyio stream refuses to read the 413 that
    arrived. A server that closes early is within its rights; curl and the sync client cope.)
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body.start:
        headers["Content-Type"] = FORM
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False) as client:
        return client.request(method, path, content=body)


def assert_shape(path: str, answer: httpx.Response) -> None:
    """The error body of the dialect that serves `path`."""
    if path.startswith("/_emulator/upload/"):
        assert answer.headers["content-type"].startswith("application/xml"), answer.text
        assert "<Code>EntityTooLarge</Code>" in answer.text
        return
    body = answer.json()
    if path.startswith("/v1/batches"):
        assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


TOO_LARGE_ROUTES = [
    ("POST", "/v1/batches"),
    ("POST", "/v1/files"),
    ("POST", "/openai/v1/batches"),
    ("POST", "/openai/v1/files"),
    ("POST", "/_emulator/faults"),
    ("PUT", "/_emulator/upload/file-x?signature=y"),
]
#: A form's body starts like one, with a file part (a form parser reads nothing of a body that is not a form).
FORM = "multipart/form-data; boundary=x"
FORM_START = b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
FORM_ROUTES = ("/v1/files", "/openai/v1/files")


async def test_a_declared_body_over_the_cap_gets_413_before_any_of_it_is_read(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path, api_key="test-key", max_body_bytes=CAP) as client:
        for method, path in TOO_LARGE_ROUTES:
            body = Body(10 * CAP)
            auth = NO_AUTH if path.startswith("/_emulator/upload/") else httpx.USE_CLIENT_DEFAULT
            answer = await client.request(
                method, path, content=body.stream(), headers={"Content-Length": str(body.size)}, auth=auth
            )
            assert answer.status_code == 413, (path, answer.text)
            assert answer.headers["connection"] == "close"
            assert_shape(path, answer)
            # The app never asked for a byte of it (the client streams only what receive() asks for).
            assert body.taken == 0, path
        # The cap is the cap: a body just within it is read (and refused for what it says, not its size).
        within = await client.post("/v1/batches", content=b" " * (CAP - 1))
        assert within.status_code == 400


async def test_a_chunked_body_is_cut_off_at_the_cap_and_nothing_is_kept(tmp_path: Path) -> None:
    async with http_emulator(tmp_path, max_body_bytes=CAP) as client:
        file_id = await upload(client, to_jsonl([request_line("a")]))
        started = await client.post(
            "/v1/files",
            files={
                "purpose": (None, "batch-api"),
                "file_name": (None, "big.jsonl"),
                "file_type": (None, "jsonl"),
                "checksum": (None, "0" * 64),
            },
        )
        presigned = started.headers["location"]
        # The real upload URL this time: a bad signature is refused before the body is read.
        for method, path in [*TOO_LARGE_ROUTES[:-1], ("PUT", presigned)]:
            # 64 MiB, of which only about the cap is sent.
            body = Body(1024 * CAP, FORM_START if path in FORM_ROUTES else b"")
            token = None if "/_emulator/upload/" in path else "test-key"
            answer = await anyio.to_thread.run_sync(send_blocking, str(client.base_url), method, path, body, token)
            assert "content-length" not in answer.request.headers  # chunked
            assert answer.status_code == 413, (path, answer.text)
            assert answer.headers["connection"] == "close"
            assert_shape(httpx.URL(path).path, answer)
            # Cut off near the cap (what the sockets' buffers took in the meantime aside).
            assert body.taken < body.size // 4, path
        # Nothing of the cut uploads was kept, and the emulator still serves.
        assert list((tmp_path / "tmp").iterdir()) == []
        listed = (await client.get("/v1/files")).json()["data"]
        assert [f["id"] for f in listed if f["Processed"]] == [file_id]
        job, output, _ = await run_batch(client, [request_line("after")])
        assert job["status"] == "COMPLETED" and len(output) == 1


async def test_a_body_without_the_token_is_refused_unread_and_its_connection_closed(tmp_path: Path) -> None:
    async with http_emulator(tmp_path, api_key="test-key") as client:
        for method, path in TOO_LARGE_ROUTES[:-1]:
            body = Body(1024 * CAP, FORM_START if path in FORM_ROUTES else b"")
            answer = await anyio.to_thread.run_sync(send_blocking, str(client.base_url), method, path, body, "wrong")
            assert answer.status_code == 401 and answer.headers["connection"] == "close", path
            # Not read to its end to keep the connection: the client's writes stopped soon.
            assert body.taken < body.size // 4, path
        assert (await client.get("/v1/batches")).status_code == 200


async def test_a_json_body_has_a_smaller_cap_of_its_own(tmp_path: Path) -> None:
    # Parsed JSON takes many times its size in memory: a batch create is never near a megabyte.
    padding = "x" * MAX_JSON_BODY_BYTES
    async with asgi_emulator(tmp_path) as client:
        for path in ("/v1/batches", "/openai/v1/batches", "/_emulator/faults"):
            answer = await client.post(path, json={"input_file_id": padding})
            assert answer.status_code == 413, path
            assert_shape(path, answer)


#: Not JSON, not an object, or too deep: 400 on every JSON route.
BAD_JSON: list[bytes] = [
    b"",
    b"not json",
    b"{",
    b'{"input_file_id": "file-1",}',
    b"{'input_file_id': 'file-1'}",
    b"\xff\xfe\x00{}",
    b"[]",
    b"1",
    b'"text"',
    b"null",
    b"true",
    b"1" * 5000,
    nested(MAX_JSON_DEPTH + 1).encode(),
    nested(100_000).encode(),
    b"[" * 100_000,
    b'{"a": ' + nested(MAX_JSON_DEPTH).encode() + b"}",
]
#: Objects with fields of every wrong kind: refused (400, or 404 for a file that does not exist).
WRONG_FIELDS: list[bytes] = [
    b'{"a": NaN, "b": Infinity}',  # JSON as Python writes it: parsed, then refused for its fields
    b'{"input_file_id": {"x": 1}, "endpoint": ["a"], "completion_window": {"h": 1}}',
    b'{"input_file_id": "file-none", "endpoint": {}, "completion_window": []}',
    b'{"input_file_id": [], "metadata": [1], "model_id": 5, "priority": true}',
    b'{"endpoint": "/v1/chat/completions", "metadata": {"k": {"deep": [1]}}}',
    b'{"method": "GET", "path": "/v1/x", "status": 500, "times": 1' + b"0" * 400 + b"}",
    b'{"method": "GET", "path": "/v1/x", "status": 1e999}',
    b'{"method": "GET", "path": "/v1/x", "delay_s": -1}',
    b'{"method": "GET", "path": "/v1/x", "retry_after": 1' + b"0" * 400 + b', "status": 503}',
    b'{"method": [], "path": {}}',
    b'{"rate": 1' + b"0" * 400 + b"}",
    b'{"rate": 0.5, "statuses": [{}], "seed": "s"}',
    b'{"rate": 0.5, "retry_after": 1' + b"0" * 400 + b"}",
    b'{"latency_s": 1' + b"0" * 400 + b"}",
    b'{"latency_s": "slow"}',
]

JSON_ROUTES = ["/v1/batches", "/openai/v1/batches", "/_emulator/faults"]


async def test_bad_json_bodies_answer_400_in_the_dialects_shape_and_never_500(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        for path in JSON_ROUTES:
            for body in BAD_JSON + WRONG_FIELDS:
                answer = await client.post(path, content=body, headers={"Content-Type": "application/json"})
                expected = (400,) if body in BAD_JSON else (400, 404)
                assert answer.status_code in expected, (path, body[:80], answer.status_code, answer.text)
                assert_shape(path, answer)
        # No fault was taken from any of them, and the emulator still serves.
        assert (await client.get("/_emulator/faults")).json() == {"faults": []}
        job, output, _ = await run_batch(client, [request_line("after")])
        assert job["status"] == "COMPLETED" and len(output) == 1


MANY_FIELDS = b"".join(b'--x\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n1\r\n' % i for i in range(1500))
BAD_FORMS: list[tuple[str, bytes]] = [
    ("multipart/form-data", b"no boundary"),
    ("multipart/form-data; boundary=x", b"garbage without any boundary"),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--x--\r\n"),
    ("multipart/form-data; boundary=x", b"--x\r\n" + b"A" * 20_000),
    ("multipart/form-data; boundary=x", MANY_FIELDS),
    ("application/x-www-form-urlencoded", b"%%%purpose=%ZZ&&=="),
    ("application/json", b'{"purpose": "batch"}'),
    ("text/plain", b"\xff\xfe"),
]


async def test_malformed_upload_forms_are_refused_without_a_500(tmp_path: Path) -> None:
    async with http_emulator(tmp_path) as client:
        for path in ("/v1/files", "/openai/v1/files"):
            for content_type, body in BAD_FORMS:
                answer = await client.post(path, content=body, headers={"Content-Type": content_type})
                assert 400 <= answer.status_code < 500, (path, content_type, answer.status_code, answer.text)
        job, output, _ = await run_batch(client, [request_line("after")])
        assert job["status"] == "COMPLETED" and len(output) == 1


def line_with(custom_id: str, value: Any) -> bytes:
    line = request_line(custom_id)
    line["body"]["extra"] = "PLACEHOLDER"
    return json.dumps(line).replace('"PLACEHOLDER"', value if isinstance(value, str) else json.dumps(value)).encode()


# A request line is itself one level and its body another: "extra" sits at depth 3.
AT_THE_LIMIT = nested(MAX_JSON_DEPTH - 2)
PAST_THE_LIMIT = nested(MAX_JSON_DEPTH - 1)


async def test_an_input_line_at_the_depth_limit_runs(tmp_path: Path) -> None:
    async with asgi_emulator(tmp_path) as client:
        data = line_with("deep", AT_THE_LIMIT) + b"\n"
        job = await wait_for_batch(client, await create_batch(client, await upload(client, data)))
        assert job["status"] == "COMPLETED", job["error"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (line_with("deep", PAST_THE_LIMIT), "line 2: nested deeper than 64 levels"),
        (nested(100_000).encode(), "line 2: nested deeper than 64 levels"),
        (b'{"custom_id": "x", "body": {"a": NaN', "line 2: not valid JSON"),
        (b"[1, 2]", "line 2: not a JSON object"),
    ],
)
async def test_a_bad_input_line_fails_the_batch_naming_the_line(tmp_path: Path, bad: bytes, message: str) -> None:
    data = line_with("a", 1) + b"\n" + bad + b"\n" + line_with("c", 1) + b"\n"
    async with asgi_emulator(tmp_path) as client:
        job = await wait_for_batch(client, await create_batch(client, await upload(client, data)))
        assert job["status"] == "FAILED" and job["error"] == message
        batch = await openai_wait(client, (await openai_create(client, await openai_upload(client, data)))["id"])
        assert batch["status"] == "failed"
        (error,) = batch["errors"]["data"]
        assert (error["line"], error["code"], error["message"]) == (2, "invalid_json_line", message)
        # And the emulator carries on with the next batch.
        job, output, _ = await run_batch(client, [request_line("after")])
        assert job["status"] == "COMPLETED" and len(output) == 1
