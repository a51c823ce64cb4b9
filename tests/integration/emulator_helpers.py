"""Helpers for tests that talk to the embedded emulator (over loopback HTTP or ASGITransport)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

from batchd.emulator import EchoEngine, create_app, serve_emulator
from batchd.emulator.state import BatchStatus, EmulatorState, StoredBatch, _batch_to_json
from batchd.models import BatchEndpoint

CHAT = BatchEndpoint.CHAT_COMPLETIONS
TERMINAL = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})


class HoldEngine:
    """Echo, except that a request whose message says "hold" waits until `release` is set
    (to catch a batch, and the job that owns it, mid-run)."""

    def __init__(self) -> None:
        self.echo = EchoEngine()
        self.release = anyio.Event()

    async def respond(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "hold" in json.dumps(body):
            await self.release.wait()
        return await self.echo.respond(endpoint, body)


class BearerAuth(httpx.Auth):
    """Adds the API key; a request sent with `auth=NO_AUTH` (the presigned PUT) goes without it."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


#: Per-request override of the client's auth: send no Authorization header.
NO_AUTH = httpx.Auth()


def request_line(
    custom_id: str,
    text: str = "hello",
    *,
    trigger: dict[str, Any] | None = None,
    endpoint: str = CHAT,
) -> dict[str, Any]:
    """One batch input line for `endpoint`, with an optional `batchd_emulator` trigger."""
    body: dict[str, Any] = {"model": "echo-model"}
    if endpoint == BatchEndpoint.CHAT_COMPLETIONS:
        body["messages"] = [{"role": "user", "content": text}]
    elif endpoint == BatchEndpoint.COMPLETIONS:
        body["prompt"] = text
    else:
        body["input"] = text
    if trigger is not None:
        body["batchd_emulator"] = trigger
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


def to_jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    """Encode request lines as a JSONL file."""
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Decode a JSONL file."""
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@asynccontextmanager
async def asgi_emulator(data_dir: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an in-process emulator (no socket). ASGITransport does not run the
    lifespan, so it is entered here: that loads the state and starts the batch worker."""
    app = create_app(data_dir, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://emulator.test", auth=BearerAuth("test-key")
        ) as client:
            yield client


@asynccontextmanager
async def http_emulator(data_dir: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an emulator served over real loopback HTTP."""
    async with (
        serve_emulator(create_app(data_dir, **options)) as base_url,
        httpx.AsyncClient(base_url=base_url, auth=BearerAuth("test-key")) as client,
    ):
        yield client


def seed_history(
    data_dir: Path,
    count: int,
    *,
    newest: datetime,
    spacing: timedelta = timedelta(minutes=1),
    dialect: str = "openai",
    input_file_id: str = "file-history",
) -> list[str]:
    """An account's history: `count` completed batches written straight into an emulator's data
    dir before it starts (it reads every record at start), the newest created at `newest` and each
    one `spacing` before the next. Returns their ids, newest first.

    Creating them over HTTP would write (and fsync) each record: minutes for 20,000.
    """
    batches_dir = EmulatorState(data_dir).batches_dir
    batches_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for seq in range(1, count + 1):
        created = newest - spacing * (count - seq)
        batch = StoredBatch(
            id=EmulatorState.new_batch_id(dialect),
            seq=seq,
            dialect=dialect,
            input_file_id=input_file_id,
            endpoint=CHAT,
            completion_window="24h",
            created_at=created,
            deadline=created + timedelta(hours=24),
            file_size_bytes=100,
            status=BatchStatus.COMPLETED,
            total=1,
            completed=1,
            finished_at=created + timedelta(seconds=30),
        )
        (batches_dir / f"{batch.id}.json").write_text(json.dumps(_batch_to_json(batch)), encoding="utf-8")
        ids.append(batch.id)
    return ids[::-1]


async def upload(client: httpx.AsyncClient, data: bytes, name: str = "batch.jsonl") -> str:
    """Together's three-step upload; returns the file id (an existing one on 409)."""
    form = {
        "purpose": (None, "batch-api"),
        "file_name": (None, name),
        "file_type": (None, "jsonl"),
        "checksum": (None, hashlib.sha256(data).hexdigest()),
    }
    started = await client.post("/v1/files", files=form)
    if started.status_code == 409:
        file_id: str = started.json()["file_id"]
        return file_id
    assert started.status_code == 302, started.text
    put = await client.put(started.headers["location"], content=data, auth=NO_AUTH)
    assert put.status_code == 200, put.text
    file_id = started.headers["x-together-file-id"]
    done = await client.post(f"/v1/files/{file_id}/preprocess")
    assert done.status_code == 200, done.text
    return file_id


async def create_batch(client: httpx.AsyncClient, file_id: str, endpoint: str = CHAT, **extra: Any) -> str:
    """Create a batch and return its id."""
    answer = await client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra},
    )
    assert answer.status_code == 201, answer.text
    batch_id: str = answer.json()["job"]["id"]
    return batch_id


async def wait_for_batch(
    client: httpx.AsyncClient,
    batch_id: str,
    statuses: Iterable[str] = TERMINAL,
    *,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll until the batch reaches one of `statuses` (or satisfies `until`).

    Polling at a short interval is the one wait allowed here: the worker
    advances in the background and has no event to await over HTTP.
    """
    wanted = set(statuses)
    with anyio.fail_after(timeout):
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
            if until(job) if until is not None else job["status"] in wanted:
                return job
            await anyio.sleep(0.01)


async def download(client: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    """The lines of a stored file; [] for a null file id."""
    if file_id is None:
        return []
    answer = await client.get(f"/v1/files/{file_id}/content")
    assert answer.status_code == 200, answer.text
    return parse_jsonl(answer.content)


async def run_batch(
    client: httpx.AsyncClient, lines: list[dict[str, Any]], endpoint: str = CHAT
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Upload, create, wait for the end; return (job, output lines, error lines)."""
    file_id = await upload(client, to_jsonl(lines))
    job = await wait_for_batch(client, await create_batch(client, file_id, endpoint))
    return job, await download(client, job["output_file_id"]), await download(client, job["error_file_id"])


# -- the OpenAI dialect ----------------------------------------------------------

OPENAI = "/openai/v1"
OPENAI_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


async def openai_upload(client: httpx.AsyncClient, data: bytes, name: str = "batch.jsonl") -> str:
    """OpenAI's one-step multipart upload with purpose=batch; returns the file id."""
    answer = await client.post(f"{OPENAI}/files", files={"purpose": (None, "batch"), "file": (name, data)})
    assert answer.status_code == 200, answer.text
    file_id: str = answer.json()["id"]
    return file_id


async def openai_create(client: httpx.AsyncClient, file_id: str, endpoint: str = CHAT, **extra: Any) -> dict[str, Any]:
    """Create a batch through the OpenAI dialect; returns the Batch object."""
    answer = await client.post(
        f"{OPENAI}/batches",
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra},
    )
    assert answer.status_code == 200, answer.text
    batch: dict[str, Any] = answer.json()
    return batch


async def openai_wait(
    client: httpx.AsyncClient,
    batch_id: str,
    *,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll the OpenAI dialect until the batch is terminal (or satisfies `until`)."""
    with anyio.fail_after(timeout):
        while True:
            batch: dict[str, Any] = (await client.get(f"{OPENAI}/batches/{batch_id}")).json()
            if until(batch) if until is not None else batch["status"] in OPENAI_TERMINAL:
                return batch
            await anyio.sleep(0.01)


async def openai_download(client: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    """The lines of a stored file through the OpenAI dialect; [] for a null file id."""
    if file_id is None:
        return []
    answer = await client.get(f"{OPENAI}/files/{file_id}/content")
    assert answer.status_code == 200, answer.text
    return parse_jsonl(answer.content)


async def openai_run(client: httpx.AsyncClient, lines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Upload and create through the OpenAI dialect, then wait for the end; returns the Batch."""
    created = await openai_create(client, await openai_upload(client, to_jsonl(lines)), **extra)
    return await openai_wait(client, created["id"])


# -- the Gemini dialect ----------------------------------------------------------

GEMINI = "/gemini"
#: The SDK's header for the key (the emulator also takes `key=` and a bearer token).
GEMINI_KEY = {"x-goog-api-key": "test-key"}
GEMINI_TERMINAL = frozenset(
    {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"}
)


def gemini_request(text: str = "hello", *, trigger: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A GenerateContentRequest asking `text`, with an optional `batchd_emulator` trigger."""
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}
    if trigger is not None:
        request["batchd_emulator"] = trigger
    return request


def gemini_line(key: str, text: str = "hello", *, trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of a Gemini batch input file: `{"key", "request"}`."""
    return {"key": key, "request": gemini_request(text, trigger=trigger)}


async def gemini_upload(
    client: httpx.AsyncClient, data: bytes, *, version: str = "v1beta", display_name: str = "batch"
) -> dict[str, Any]:
    """Gemini's resumable upload in one piece (start, then `upload, finalize`); returns the File."""
    started = await client.post(
        f"{GEMINI}/upload/{version}/files",
        headers={
            **GEMINI_KEY,
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(len(data)),
            "X-Goog-Upload-Header-Content-Type": "application/jsonl",
        },
        json={"file": {"display_name": display_name}},
    )
    assert started.status_code == 200, started.text
    done = await client.post(
        started.headers["x-goog-upload-url"],
        headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"},
        content=data,
    )
    assert done.status_code == 200 and done.headers["x-goog-upload-status"] == "final", done.text
    file: dict[str, Any] = done.json()["file"]
    return file


async def gemini_create(
    client: httpx.AsyncClient, source: dict[str, Any], *, version: str = "v1beta", model: str = "gemini-2.5-flash"
) -> dict[str, Any]:
    """Create a Gemini batch from `inputConfig` `source`; returns the operation."""
    answer = await client.post(
        f"{GEMINI}/{version}/models/{model}:batchGenerateContent",
        headers=GEMINI_KEY,
        json={"batch": {"displayName": "test-batch", "inputConfig": source}},
    )
    assert answer.status_code == 200, answer.text
    operation: dict[str, Any] = answer.json()
    return operation


async def gemini_wait(
    client: httpx.AsyncClient,
    name: str,
    *,
    version: str = "v1beta",
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll a Gemini batch (`batches/…`) until it is done (or satisfies `until`)."""
    with anyio.fail_after(timeout):
        while True:
            operation: dict[str, Any] = (await client.get(f"{GEMINI}/{version}/{name}", headers=GEMINI_KEY)).json()
            if until(operation) if until is not None else operation["done"]:
                return operation
            await anyio.sleep(0.01)


async def gemini_download(client: httpx.AsyncClient, file_name: str, *, version: str = "v1") -> list[dict[str, Any]]:
    """The lines of a Gemini file (`files/…`), as the SDK downloads them."""
    answer = await client.get(f"{GEMINI}/{version}/{file_name}:download", params={"alt": "media"}, headers=GEMINI_KEY)
    assert answer.status_code == 200, answer.text
    return parse_jsonl(answer.content)
