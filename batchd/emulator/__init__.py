"""The embedded Batch API emulator (DESIGN §8): Together's dialect at `/v1/...`.

`batchd emulator` serves it for users; the daemon runs it in-process on a
loopback port as the "local" backend; batchd's tests talk to it over real
HTTP. The official `together` SDK works against it unchanged::

    from together import Together
    client = Together(api_key="anything", base_url="http://127.0.0.1:8787")

In Python::

    from batchd.emulator import create_app, serve_emulator
    async with serve_emulator(create_app(data_dir)) as base_url:
        ...

The OpenAI dialect (`/openai/v1/...`) is not served yet; the stored files
and batches (`state.py`) are dialect-neutral so it can be added over them.

Files and batches live under the data dir and survive a restart: a batch that
was VALIDATING or IN_PROGRESS is run again from the start (answers are
deterministic, so nothing changes but `fail_once`, see below). One emulator
process per data dir.

Engines
-------
`EchoEngine` (default) answers offline and deterministically: chat
completions say `"echo: <last user message>"`, completions `"echo: <prompt>"`,
embeddings are unit vectors derived from sha256 of each input; `usage` counts
words. `UpstreamEngine` forwards each request body to an OpenAI-compatible
server (`POST {upstream_url}/v1/chat/completions`, …) with bounded concurrency.

What a batch does
-----------------
VALIDATING: every non-blank line must be a JSON object with a `custom_id`
(1–64 characters, unique), `method` POST (if given), `url` equal to the
batch's endpoint and an object `body`; at most 50,000 requests and 100 MB.
Otherwise the batch ends FAILED with `error` naming the line. IN_PROGRESS:
requests go to the engine (bounded concurrency), `progress` goes 0→100.
Then the result files are stored (purpose `batch-api`) and the batch ends
COMPLETED with `output_file_id` (2xx answers:
`{"custom_id", "response": {"status_code", "body"}}`) and `error_file_id`
(error lines `{"custom_id", "error": {"message", "code"}}` and non-2xx
answers); either is null when it would be empty. Like Together, result lines
are NOT in input order (they are sorted by sha256 of `custom_id`): join on
`custom_id`. When the completion window (default 24h, from the injectable
clock) runs out, the batch ends EXPIRED with what it answered so far.
`POST /v1/batches/{id}/cancel` ends a VALIDATING or IN_PROGRESS batch
CANCELLED at once; the requests already answered stay in its result files.

Test triggers
-------------
A request line's `body` may hold an object under the key `"batchd_emulator"`.
It is removed before the engine sees the body. Unknown keys or bad values
fail the batch at validation (so a typo never passes silently). Keys:

`"error": "<code>"`
    The request gets an error line `{"custom_id", "error": {"message": "…",
    "code": "<code>"}}` (e.g. `"invalid_model"`), in the error file.
`"status": N` (400–599)
    A response line with `status_code` N and an OpenAI-style error body
    `{"error": {"message", "type", "param", "code"}}`, in the error file.
`"fail_once": N` (400–599)
    The first time the emulator ever processes this request it answers like
    `"status": N`; every later time normally. The request's identity is its
    `custom_id` plus the sha256 of its body without the trigger, so the same
    request in a follow-up batch succeeds. The memory is kept in the data dir.
`"expire_batch": true`
    The batch ends EXPIRED: requests on lines before this one are answered
    (and in the result files); this line and every later line get nothing.
`"fail_batch": true`
    The same, but the batch ends FAILED with `error` naming the line.

When several keys are given, `error` wins over `status`, which wins over
`fail_once`; `expire_batch` wins over `fail_batch`.

Control endpoints (no auth; for tests)
--------------------------------------
`POST /_emulator/pause`, `POST /_emulator/resume`
    While paused no batch advances: each stays VALIDATING or IN_PROGRESS and
    no answer is recorded, so a test can catch a job in flight without
    sleeping. Cancel still works while paused. Not persisted.
`POST /_emulator/faults` with JSON
    `{"method": "POST", "path": "/v1/batches", "status": 503, "times": 1,
    "retry_after": 2, "act": false}`: the next `times` (default 1) requests
    matching method and path (`*` matches exactly one path segment, e.g.
    `"/v1/files/*/content"`) are answered with `status` and an error body
    (Together's shape for the path), plus `Retry-After` if `retry_after` is
    given. `"act": true` carries the request out first and then answers the
    fault instead (a lost answer: the batch really exists, the client sees
    503). `"truncate_at": N` (no status needed) lets the real response start
    with its full `Content-Length` but sends only N body bytes, then closes
    the connection (a cut download; the server logs "ASGI callable returned
    without completing response", which is expected). Faults also apply to
    the presigned upload URL (`PUT /_emulator/upload/*`). Answers
    `{"faults": [...pending]}`. `GET` lists them; `DELETE` clears them.
`GET /_emulator/stats`
    `{"batch_creates": [{"id", "input_file_id", "created_at"}, ...],
    "requests": {"POST /v1/batches": n, ...}, "paused": bool}`.
    `batch_creates` lists every batch ever created, oldest first, from the
    data dir (it survives restarts); `requests` counts requests by method and
    concrete path since this process started (control endpoints excluded).

Together routes
---------------
Every `/v1/...` request needs `Authorization: Bearer <token>`: any non-empty
token, or exactly `api_key` when the app was created with one; else 401.

* `POST /v1/files` (multipart). The SDK's three-step flow: fields `purpose`,
  `file_name`, `file_type`, `checksum` (sha256 hex) and no file part →
  409 `{"file_id"}` if a processed file with that checksum exists, else 302
  with `Location` (a presigned-style URL on this server) and
  `X-Together-File-Id`. A `file` part with `purpose` instead is stored and
  processed at once: 200 FileResponse.
* `PUT /_emulator/upload/{file_id}?signature=…` (the "storage host"): the raw
  bytes, streamed to disk; 400 if the sha256 differs from the declared
  checksum, and 400 if the request carries an `Authorization` header (as a
  real presigned URL does: a client must not leak its API key there).
* `POST /v1/files/{id}/preprocess` → FileResponse with `Processed: true`.
* `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`
  (streamed, `Content-Length`, `Range: bytes=N-` → 206 with `Content-Range`).
* `POST /v1/batches` → 201 `{"job": BatchJob, "warning": null}`;
  `GET /v1/batches/{id}`; `GET /v1/batches` (a bare array, newest first);
  `POST /v1/batches/{id}/cancel`.
"""

from batchd.emulator.app import create_app
from batchd.emulator.engines import EchoEngine, Engine, UpstreamEngine
from batchd.emulator.faults import RandomFaults
from batchd.emulator.server import run_emulator, serve_emulator
from batchd.emulator.timeline import Timeline

__all__ = [
    "EchoEngine",
    "Engine",
    "RandomFaults",
    "Timeline",
    "UpstreamEngine",
    "create_app",
    "run_emulator",
    "serve_emulator",
]
