"""The embedded Batch API emulator (DESIGN §8): Together's dialect at `/v1/...`, OpenAI's at `/openai/v1/...`,
Anthropic's at `/anthropic/v1/messages/batches...`, Gemini's at `/gemini/{v1,v1beta}/...`.

`batchd emulator` serves it for users; the daemon runs it in-process on a
loopback port as the "local" backend; batchd's tests talk to it over real
HTTP. The official SDKs work against it unchanged::

    from together import Together
    client = Together(api_key="anything", base_url="http://127.0.0.1:8787")

    from openai import OpenAI
    client = OpenAI(api_key="anything", base_url="http://127.0.0.1:8787/openai/v1")

    from anthropic import Anthropic
    client = Anthropic(api_key="anything", base_url="http://127.0.0.1:8787/anthropic")

    from google import genai
    from google.genai import types
    client = genai.Client(api_key="anything",
                          http_options=types.HttpOptions(base_url="http://127.0.0.1:8787/gemini"))

In Python::

    from batchd.emulator import create_app, serve_emulator
    async with serve_emulator(create_app(data_dir)) as base_url:
        ...

The dialects share one store: a file uploaded through Together's can feed a
batch created through OpenAI's and the other way round, and each of those two
lists every batch, rendered in its own shape; Anthropic's and Gemini's show
their own batches (and Gemini's, its own files). A batch keeps the rules of
the dialect that created it (its limits, its result lines). Files and batches live under the data dir and survive a
restart. Every answer is fsynced into the batch's spool as it arrives
(appends that arrive during one fsync share the next), so a batch that was
running when the process stopped (even `kill -9`) resumes after a restart and
only the requests without a recorded answer are asked again: a kill re-sends
at most the requests in flight at that moment. One emulator process per
data dir.

`create_app(data_dir, *, engine, api_key, clock, concurrency, timeline,
random_faults, latency_s, max_body_bytes, provider_webhooks)`; `batchd emulator
--help` lists the same settings as flags (`--api-key`, `--max-body-bytes`,
`--upstream-url`, `--upstream-api-key`, `--concurrency`, `--validating-s`,
`--in-progress-s`, `--finalizing-s`, `--cancelling-s`, `--latency`,
`--fault-rate`, `--fault-statuses`, `--fault-retry-after`, `--fault-seed`,
`--provider-webhook`, `--provider-webhook-secret`); `--port 0` picks a free
port, and the `emulator.serving` log line names the URL. `--host` other
than a loopback address (127.0.0.0/8, ::1, localhost) needs `--api-key` (or
`BATCHD_EMULATOR_API_KEY`): without one the command exits 2. Inside the
daemon (`provider.kind = "local"`, see `batchd.local_backend`) the app gets a
random key made at each start and a body cap from `[local] max_body_bytes`.

Engines
-------
`EchoEngine` (default) answers offline and deterministically: chat
completions say `"echo: <last user message>"`, completions `"echo: <prompt>"`,
embeddings are unit vectors derived from sha256 of each input; `usage` counts
words. `UpstreamEngine(http, upstream_url, concurrency, api_key=None)`
forwards each request body to an OpenAI-compatible server (`POST
{upstream_url}/v1/chat/completions`, …; a trailing `/v1` in the URL is
accepted), at most `concurrency` at once (16 by default from the command
line). 408, 429, 5xx and transport errors are retried up to 5 attempts with
full-jitter backoff (0.5 s doubling, at most 30 s) raised to the server's
`Retry-After` (at most 300 s); no slot is held during a backoff. What still
fails lands in the error file: the upstream's own answer, or a 502 with code
`upstream_unavailable` / `upstream_bad_response`.

What a batch does
-----------------
VALIDATING: every non-blank line must be a JSON object (nested at most
`batchd.jsonl.MAX_JSON_DEPTH`, 64, levels deep) with a `custom_id`
(1–64 characters, unique), `method` POST (if given), `url` equal to the
batch's endpoint and an object `body`; at most 50,000 requests; at most
100 MB for a batch created through Together, 200 MB through OpenAI.
Otherwise the batch FAILS: Together's `error` names the line; OpenAI's
`errors.data` holds `{"code", "line", "message", "param"}` with codes
`invalid_json_line`, `invalid_custom_id`, `invalid_method`,
`mismatched_endpoint`, `invalid_body`, `invalid_trigger`,
`duplicate_custom_id`, `empty_file`, `too_many_requests_in_batch`,
`file_too_large` (the emulator's own names). IN_PROGRESS: requests go to the
engine (bounded concurrency); Together's `progress` goes 0→100, OpenAI's
`request_counts {total, completed, failed}` count up (and `usage` sums the
answers' tokens). FINALIZING (OpenAI; Together shows IN_PROGRESS at 100 %):
the result files are written. Then the batch ends COMPLETED with
`output_file_id` (2xx answers) and `error_file_id` (everything else); either
is null when it would be empty, so a completed batch may have only an error
file. Result lines, Together: `{"custom_id", "response": {"status_code",
"body"}}`, errors without an HTTP answer `{"custom_id", "error": {"message",
"code"}}`. OpenAI: `{"id": "batch_req_…", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}` and `{"id",
"custom_id", "response": null, "error": {"code", "message"}}`. Like the real
services, result lines are NOT in input order (they are sorted by sha256 of
`custom_id`): join on `custom_id`. When the completion window (24 h; Together
also takes other windows such as `1h`; measured on the injectable clock)
runs out, the batch ends EXPIRED with what it answered so far; OpenAI's
error file then also holds a `batch_expired` line for every request never
run. Cancel keeps the requests already answered in the result files:
Together's cancel answers CANCELLED at once; OpenAI's answers `cancelling`,
and the batch becomes `cancelled` at the worker's next step (never while
paused, and not before `Timeline.cancelling_s`). A FINALIZING or finished
batch cannot be cancelled (Together: 400 with a string error; OpenAI: 400).

Timeline
--------
`Timeline(validating_s, in_progress_min_s, finalizing_s, cancelling_s)`,
seconds of real time, all 0 by default (as fast as the engine answers): a
batch stays VALIDATING at least `validating_s`; IN_PROGRESS at least
`in_progress_min_s`, with its requests spread evenly over that time so
progress climbs steadily; FINALIZING `finalizing_s`; an OpenAI cancel keeps
the batch `cancelling` for `cancelling_s` (with `cancelling_s > 0` Together's
cancel answers CANCELING too, then CANCELLED). Deadlines and timestamps come
from the `clock`; the timeline's waits do not.

Test triggers
-------------
A request line's `body` may hold an object under the key `"batchd_emulator"`.
It is removed before the engine sees the body. Unknown keys or bad values
fail the batch at validation (so a typo never passes silently). Keys:

`"error": "<code>"`
    The request gets an error line without an HTTP answer carrying `<code>`
    (e.g. `"invalid_model"`), in the error file.
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
    (and in the result files); this line and every later line get nothing
    (OpenAI: a `batch_expired` error line each; Gemini shows no results at all).
`"expire_once": true`
    Like `expire_batch`, but only the first time the emulator ever plans this
    very line (its bytes): the same request resubmitted in a follow-up batch
    runs normally. For testing follow-up rounds after an expiry.
`"fail_batch": true`
    The same as `expire_batch`, but the batch ends FAILED with `error` (OpenAI: `errors`, code
    `batch_failed`) naming the line.
`"pending_once": true`
    The first time the emulator ever plans this very line (its bytes, as `expire_once`), its
    batch never starts running: it stays in its state before running (Together's and OpenAI's
    VALIDATING, Anthropic's `in_progress` with every request `processing`, Gemini's
    `BATCH_STATE_PENDING`) until it is cancelled, with nothing answered (Anthropic: a `canceled`
    result for each request). A restart keeps it waiting; the window does not end it. The same
    request in a later batch runs normally. For testing what a client does with a batch stuck
    before it runs (batchd's `stuck_after_s`).

When several keys are given, `error` wins over `status`, which wins over
`fail_once`; `expire_batch` wins over `fail_batch`.

In an Anthropic batch the object goes in a request's `params`; in a Gemini
batch, in its `request` (a file line `{"key", "request": {"contents": [...],
"batchd_emulator": {"status": 429}}}`; the SDK's inline requests cannot carry
it). A Gemini error line is Google's `{"key", "error": {"code", "message",
"status"}}`: `status: N` gives code N with the status Google pairs with it (429
RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 500 INTERNAL, 504 DEADLINE_EXCEEDED, 400
INVALID_ARGUMENT, …); `error: "<code>"` takes a Google status name as itself
(`"RESOURCE_EXHAUSTED"` → 429) and reads other codes by their words
(`rate_limit…` → 429, `…timeout…` → 504, `…internal…` → 500, else 400).

Provider webhooks
-----------------
Like OpenAI and Gemini, the emulator can announce that a batch ended: one
Standard-Webhooks-signed POST per batch that ends (completed, failed, expired
or cancelled), to the target of the dialect that created it. Together's and
Anthropic's batches announce nothing (neither provider does). A target is a
dialect (`openai` or `gemini`), a URL and a secret (`whsec_<base64>`), given
three ways:

* `create_app(..., provider_webhooks=[HookTarget("openai", url, secret)])`
  (`batchd.emulator.HookTarget`);
* `batchd emulator --provider-webhook openai=URL --provider-webhook gemini=URL2
  --provider-webhook-secret whsec_…` (one secret signs both;
  `BATCHD_EMULATOR_PROVIDER_WEBHOOK_SECRET` may hold it);
* `POST /_emulator/provider-webhooks` `{"dialect", "url", "secret"}` (below),
  for a receiver that starts after the emulator.

Headers: `webhook-id` (the event's `id`, the same on every attempt),
`webhook-timestamp` (unix seconds, per attempt), `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` under the secret's
decoded bytes). Bodies: OpenAI's documented shape, `{"id": "evt_…", "object":
"event", "created_at", "type": "batch.completed" | "batch.failed" |
"batch.expired" | "batch.cancelled", "data": {"id": "batch_…"}}`; for Gemini
(whose documentation names the events but not where the batch sits in `data`)
`{"id": "evt_…", "type": "batch.succeeded" | "batch.failed" | "batch.expired"
| "batch.cancelled", "version": "v1", "timestamp": "<RFC 3339>", "data": {"id":
"<id>", "name": "batches/<id>", "state": "BATCH_STATE_…"}}`. Sent in the
background, best effort: the worker never waits for it; an attempt without
an answer, or answered 429 or 5xx, is tried twice more (after 0.5 s and
2 s), any other answer ends it. Events are not kept across a restart.

Control endpoints (for tests and for users rehearsing failures)
----------------------------------------------------------------
Open to anyone when the app has no `api_key`; with one, they need it like
every other route (see Auth).

`POST /_emulator/pause`, `POST /_emulator/resume`
    While paused no batch advances: each stays where it is and no answer is
    recorded, so a test can catch a job in flight without sleeping.
    Together's cancel still works while paused; an OpenAI cancel stays
    `cancelling` until resumed. Not persisted.
`POST /_emulator/faults` with a JSON object, one of three kinds:

    A targeted fault: `{"method": "POST", "path": "/v1/batches", "status":
    503, "times": 1, "retry_after": 2, "act": false}`: the next `times`
    (default 1) requests matching method and path (`*` matches exactly one
    path segment, e.g. `"/v1/files/*/content"` or `"/openai/v1/batches/*"`)
    get, instead of their answer, one of:

    * `"status": N`: that status and an error body in the path's dialect
      (Together's batch endpoints: a bare string), plus `Retry-After` if
      `retry_after` is given;
    * `"drop": true`: the connection is closed without any response (the
      client sees "server disconnected"; in-process, through
      `httpx.ASGITransport`, the client gets the same
      `httpx.RemoteProtocolError` raised);
    * `"truncate_at": N`: the real response starts with its full
      `Content-Length` but only N body bytes are sent, then the connection
      closes (a cut download; the server logs "ASGI callable returned
      without completing response", which is expected).

    `"act": true` (with `status` or `drop`) carries the request out first
    and then loses its answer (the batch really exists, the client sees the
    fault). `"delay_s": S` waits S seconds first: alone it makes a slow but
    correct answer; with another fault, a slow failure.

    The random mode: `{"rate": 0.2, "statuses": [429, 500, 503],
    "retry_after": 1, "seed": 7}`: from now on every API request (both
    dialects and the upload URL; never the control endpoints) fails with
    probability `rate`, with a status drawn from `statuses` (`"drop"` among
    them drops the connection), `Retry-After` when `retry_after` is given.
    With a `seed`, the same sequence of requests gets the same faults.
    `rate: 0` turns it off; posting again replaces it. Targeted faults are
    served first.

    Latency: `{"latency_s": 0.05}` adds that delay to every API request.

    Faults apply to the presigned-style upload URL (`PUT
    /_emulator/upload/*`) too. Answers `{"faults": [...pending]}` plus
    `"random"` and `"latency_s"` when set. `GET` lists them; `DELETE` clears
    all three kinds.
`POST /_emulator/queue` with `{"max_enqueued_tokens": N}` (`null`: none)
    The account's queue of enqueued tokens, as providers keep one: a
    create that would take what is enqueued (the batches not ended yet)
    past N is refused in its dialect's words (Together 429 "Queued token
    limit exceeded"; OpenAI, as it does, creates the batch (its answer says
    `validating`) and fails it before running any of it, with `errors` code
    `token_limit_exceeded`; Anthropic 429
    `rate_limit_error`, "batch processing queue is full"; Gemini 429
    `RESOURCE_EXHAUSTED`). A batch's tokens are estimated as batchd does
    (`batchd.tokens`: prompt text at 4 characters a token, plus each
    request's max_tokens). Answers (and `GET` shows) `{"max_enqueued_tokens",
    "enqueued_tokens", "refused"}`: `refused` counts the creates refused so
    far. Off by default; not persisted.
`POST /_emulator/expire_results` with `{"batch_id": "<id>"}`
    Makes a finished batch's results expire, as the services' retention
    does (Anthropic 29 days, Gemini's 48-hour files, OpenAI's `expires_at`):
    its output and error files are deleted, the batch stays and still names
    them, so fetching them answers 404 in its dialect (Anthropic's
    `results_url` too; a Gemini inline batch then shows no responses). A
    Gemini batch may be named `batches/<id>`. Answers `{"batch_id",
    "expired": [file ids]}`; 404 for an unknown batch, 409 for one that has
    not ended.
`GET /_emulator/stats`
    `{"batch_creates": [{"id", "input_file_id", "created_at"}, ...],
    "requests": {"POST /v1/batches": n, ...}, "faults_served": {"total": n,
    "429": n, "drop": n, "truncate": n, "delay": n, ...}, "paused": bool}`.
    `batch_creates` lists every batch ever created (either dialect), oldest
    first, from the data dir (it survives restarts); `requests` counts
    requests by method and concrete path since this process started
    (control endpoints excluded); `faults_served` counts the faults served
    since then, by kind (a status, `drop`, `truncate`, or `delay` alone);
    `provider_webhooks` `{"events": n, "answers": {"200": n, "401": n,
    "error": n, ...}}` counts the provider webhook events sent since then
    and each attempt's answer (`error`: none came).
`POST /_emulator/provider-webhooks` with `{"dialect": "openai" | "gemini",
"url", "secret": "whsec_…"}`
    Send that dialect's batch events to `url` from now on (replacing its
    earlier target); 400 for anything else. `GET` lists the targets (never
    their secrets) and the counts; `DELETE` removes every target. Not persisted.

Auth
----
Without an `api_key`, every request under `/v1/`, `/openai/`, `/anthropic/`
and `/gemini/` needs `Authorization: Bearer <token>` with any non-empty token
(Anthropic's paths also take `x-api-key`; Gemini's, `x-goog-api-key` or a
`key=` query parameter), and the control endpoints are open. With one, every
request on every path (the API, file content, the control endpoints, unknown
paths) needs exactly that token (compared in constant time). Else 401 in the
path's dialect (`{"error": {"message", "type", "param", "code"}}` outside
Anthropic's and Gemini's) and nothing more; a 401 to a request with a body
closes the connection (the body is never read). The upload URLs are the
exception: the presigned-style one refuses an `Authorization` header (as S3
does), and a Gemini upload session's takes the bytes without a key (its SDK
sends none there); both are guarded by their signature, handed out only to a
client that had the token.

Request bodies
--------------
Every request body is capped at `max_body_bytes` (default: the largest batch
input any dialect accepts, Gemini's 2 GB file, plus 1 MiB for a form around
it; the Gemini SDK uploads in 8 MB pieces, each a request of its own). Over
it: 413 in the path's dialect (`EntityTooLarge` XML on the upload URL) with
`Connection: close`. A body that declares its `Content-Length` is
refused before any of it is read; a chunked one as soon as what was read
passes the cap, nothing of it kept (an upload cut off leaves no file). A
client that reads its answer only after sending everything may see the
connection reset instead (curl and httpx's synchronous client read the 413;
httpx's async client cannot once its write failed). JSON bodies (batch
creates, `/_emulator/faults`) are read up to 1 MiB (413 beyond) and parsed
with nesting at most `batchd.jsonl.MAX_JSON_DEPTH` (64): invalid JSON, a
non-object or deeper nesting is a 400 in the dialect's error shape, never a
500. A Gemini batch create is read up to 20 MB (Gemini's limit for inline
requests).

Together routes (SDK base URL `http://host:port`)
-------------------------------------------------
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
* `DELETE /v1/files/{id}` → `{"id", "object": "file", "deleted": true}` (404 for
  a file it does not have); the file leaves `GET /v1/files` and its content
  answers 404. The input file of a batch that has not ended is refused (400:
  the worker still reads it), through either dialect.
* `POST /v1/batches` → 201 `{"job": BatchJob, "warning": null}`;
  `GET /v1/batches/{id}`; `GET /v1/batches` (a bare array, newest first);
  `POST /v1/batches/{id}/cancel`. Upper-case statuses; FINALIZING shows as
  IN_PROGRESS, cancelling as CANCELING; ISO-8601 times; `completed_at` is
  set for every terminal status.

OpenAI routes (SDK base URL `http://host:port/openai/v1`)
---------------------------------------------------------
* `POST /openai/v1/files` (multipart `file`, `purpose`; `batch` needs a
  `.jsonl` name; optional `expires_after[anchor]=created_at` and
  `expires_after[seconds]`, default 30 days) → FileObject `{"id", "object":
  "file", "bytes", "created_at", "expires_at", "filename", "purpose",
  "status": "processed", "status_details"}`. Result files have purpose
  `batch_output`; files uploaded through Together show purpose `batch`.
* `GET /openai/v1/files` (`purpose`, `limit` 1–10,000, `after`, `order`),
  `GET /openai/v1/files/{id}`, `GET /openai/v1/files/{id}/content`
  (streamed, `Range` as above), `DELETE /openai/v1/files/{id}` → FileDeleted
  `{"id", "object": "file", "deleted": true}` (404 `No such File object`).
* `POST /openai/v1/batches` `{"input_file_id", "endpoint",
  "completion_window": "24h", "metadata"?, "output_expires_after"?}` → the
  Batch itself; `metadata` (at most 16 string pairs, keys ≤ 64 and values
  ≤ 512 characters) is stored and returned; any other key, another window,
  an unknown endpoint or a file that is not a batch input → 400 (404 for an
  unknown file) naming the `param`.
* `GET /openai/v1/batches/{id}`; `GET /openai/v1/batches?after=ID&limit=N`
  (1–100, default 20) → `{"object": "list", "data": [...], "first_id",
  "last_id", "has_more"}`, newest first; `POST /openai/v1/batches/{id}/cancel`.
  Batch: lower-case `status` (`validating in_progress finalizing completed
  failed expired cancelling cancelled`), unix-second `created_at
  in_progress_at expires_at finalizing_at completed_at failed_at expired_at
  cancelling_at cancelled_at`, `request_counts`, `errors` (null unless it
  failed), `output_file_id` / `error_file_id` (null when absent), `metadata`,
  `usage`.

Anthropic routes (SDK base URL `http://host:port/anthropic`)
-------------------------------------------------------------
See `batchd.emulator.anthropic`.

Gemini routes (SDK base URL `http://host:port/gemini`)
-------------------------------------------------------
Every route at `/gemini/v1/...` and `/gemini/v1beta/...`; every error is
Google's `{"error": {"code", "message", "status"}}` (unknown routes, the 413,
the 401 and injected faults included). The wire shapes are documented in
`batchd.emulator.gemini` (batches) and `batchd.emulator.gemini_files` (files).

* `POST /gemini/upload/{v}/files` (resumable: `X-Goog-Upload-Command: start`)
  → `X-Goog-Upload-URL`, a self-authorising session URL taking `upload`,
  `upload, finalize`, `query` and `cancel` with `X-Goog-Upload-Offset`; the
  finalize answers `{"file": File}`. `GET /gemini/{v}/files`,
  `GET`/`DELETE /gemini/{v}/files/{id}`, and the content at
  `GET /gemini/{v}/files/{id}:download?alt=media` and
  `GET /gemini/download/{v}/files/{id}:download?alt=media` (`Range` as above).
* `POST /gemini/{v}/models/{model}:batchGenerateContent` (`inputConfig`
  `fileName` or inline `requests`) → the batch, an operation
  `{"name": "batches/…", "metadata": {"state": "BATCH_STATE_…", "batchStats"
  (strings), "output"…}, "done", "response"}`; `GET /gemini/{v}/batches/{id}`;
  `GET /gemini/{v}/batches?pageSize&pageToken` → `{"operations",
  "nextPageToken"}`; `POST /gemini/{v}/batches/{id}:cancel` → `{}`;
  `DELETE /gemini/{v}/batches/{id}` → `{}`.
* A line that is not a valid request (no key, a key used before, no
  `contents`, not JSON) is an error line in the results, not a refused
  batch. Results: one responses file (`{"key", "response"}` and `{"key",
  "error"}` lines, sorted by the sha256 of the key, like the other dialects'),
  or, inline, `inlinedResponses` in the order of the requests. A SUCCEEDED
  batch may hold error lines; an EXPIRED one (48 h after its creation, on the
  injectable clock, or by `expire_batch`) shows no results.
"""

from batchd.emulator.app import create_app
from batchd.emulator.engines import EchoEngine, Engine, UpstreamEngine
from batchd.emulator.faults import RandomFaults
from batchd.emulator.provider_hooks import HookTarget
from batchd.emulator.server import run_emulator, serve_emulator
from batchd.emulator.timeline import Timeline

__all__ = [
    "EchoEngine",
    "Engine",
    "HookTarget",
    "RandomFaults",
    "Timeline",
    "UpstreamEngine",
    "create_app",
    "run_emulator",
    "serve_emulator",
]
