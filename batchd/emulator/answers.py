"""One request's answer, and the result line each dialect writes for it.

The worker produces a dialect-neutral `Answer`; the batch's dialect (the one
that created it) decides the line's shape in the result files:

* Together: `{"custom_id", "response": {"status_code", "body"}}`, or
  `{"custom_id", "error": {"message", "code"}}` for a failure without an HTTP answer.
* OpenAI: `{"id": "batch_req_…", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error": null}`, or `{"id", "custom_id", "response":
  null, "error": {"code", "message"}}`.
* Anthropic: `{"custom_id", "result": {"type": "succeeded", "message"}}`, or a result of type
  `errored` (with the error in Anthropic's shape), `canceled` or `expired`.
* Gemini: `{"key", "response": GenerateContentResponse}`, or `{"key", "error": {"code",
  "message", "status"}}` (Google's shape; an `error` trigger's code read as a Google status).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from batchd.emulator.google_errors import error_message, google_error_body, status_of_error_code
from batchd.emulator.triggers import openai_error_body

#: The error code OpenAI writes for every request an expired batch never ran.
EXPIRED_CODE = "batch_expired"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
#: The code of a request a cancelled batch never ran (Anthropic writes a `canceled` result for it).
CANCELED_CODE = "batch_canceled"
CANCELED_MESSAGE = "The batch was canceled before this request ran."
#: Anthropic's error types by HTTP status (529: overloaded).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """An Anthropic-style error body `{"type": "error", "error": {"type", "message"}}`."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _as_anthropic_error(status: int, body: dict[str, Any] | None) -> dict[str, Any]:
    """An answer's error body in Anthropic's shape (a trigger's answer comes in OpenAI's)."""
    if body is not None and body.get("type") == "error" and isinstance(body.get("error"), dict):
        return body
    inner = body.get("error") if body is not None else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return anthropic_error_body(status, message if isinstance(message, str) else f"HTTP {status}")


@dataclass(frozen=True)
class Answer:
    """What one request got: an HTTP answer (`status_code` + `body`) or an error without one."""

    custom_id: str
    #: None: the request failed without an HTTP answer (`error_code` says why)
    status_code: int | None = None
    body: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        """Whether it belongs in the output file (a 2xx answer) rather than the error file."""
        return self.status_code is not None and 200 <= self.status_code < 300

    def usage(self) -> tuple[int, int]:
        """(input, output) tokens of a 2xx body's `usage`; zeros when absent."""
        if not self.ok or self.body is None:
            return 0, 0
        return usage_of(self.body)


def usage_of(body: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of a reply body: chat/completions or responses-style `usage`."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    counts = [v if isinstance(v, int) and not isinstance(v, bool) else 0 for v in (prompt, completion)]
    return counts[0], counts[1]


def error_answer(custom_id: str, code: str, message: str | None = None) -> Answer:
    """A failure without an HTTP answer (the `error` trigger, an expired request)."""
    return Answer(custom_id, error_code=code, error_message=message or f"Emulated error: {code}")


def status_answer(custom_id: str, status: int) -> Answer:
    """An HTTP error answer with an OpenAI-style body (the `status` and `fail_once` triggers)."""
    body = openai_error_body(status, f"Emulated HTTP {status}", code=f"emulated_{status}")
    return Answer(custom_id, status_code=status, body=body)


def _ids(batch_id: str, custom_id: str) -> tuple[str, str]:
    # Derived, not random: a request answered again after a restart keeps its ids.
    digest = hashlib.sha256(f"{batch_id}\x00{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}", f"req_{digest[32:64]}"


def render_line(dialect: str, batch_id: str, answer: Answer) -> dict[str, Any]:
    """The result line of `answer` in the shape of `dialect`."""
    if dialect == "anthropic":
        return {"custom_id": answer.custom_id, "result": _anthropic_result(answer)}
    if dialect == "gemini":
        return gemini_line(answer.custom_id, answer)
    if dialect == "openai":
        line_id, request_id = _ids(batch_id, answer.custom_id)
        if answer.status_code is None:
            error = {"code": answer.error_code, "message": answer.error_message}
            return {"id": line_id, "custom_id": answer.custom_id, "response": None, "error": error}
        response = {"status_code": answer.status_code, "request_id": request_id, "body": answer.body}
        return {"id": line_id, "custom_id": answer.custom_id, "response": response, "error": None}
    if answer.status_code is None:
        return {"custom_id": answer.custom_id, "error": {"message": answer.error_message, "code": answer.error_code}}
    return {"custom_id": answer.custom_id, "response": {"status_code": answer.status_code, "body": answer.body}}


def gemini_line(key: str, answer: Answer) -> dict[str, Any]:
    """A Gemini result line: the response, or the error in Google's shape (whatever shape the
    engine or the trigger gave it)."""
    if answer.ok:
        return {"key": key, "response": answer.body}
    if answer.status_code is not None:
        status = answer.status_code
        message = error_message(answer.body) or f"HTTP {status}"
        inner = answer.body.get("error") if answer.body is not None else None
        # The engine's own Google error keeps its status name (a 400 may be FAILED_PRECONDITION).
        name = inner.get("status") if isinstance(inner, dict) and isinstance(inner.get("status"), str) else None
        return {"key": key, **google_error_body(status, message, name)}
    code, name = status_of_error_code(answer.error_code or "")
    return {"key": key, **google_error_body(code, answer.error_message or "internal error", name)}


def _anthropic_result(answer: Answer) -> dict[str, Any]:
    if answer.ok:
        return {"type": "succeeded", "message": answer.body}
    if answer.status_code is not None:
        return {"type": "errored", "error": _as_anthropic_error(answer.status_code, answer.body)}
    if answer.error_code == EXPIRED_CODE:
        return {"type": "expired"}
    if answer.error_code == CANCELED_CODE:
        return {"type": "canceled"}
    error = {"type": _anthropic_type(answer), "message": answer.error_message or "internal error"}
    return {"type": "errored", "error": {"type": "error", "error": error}}


def _anthropic_type(answer: Answer) -> str:
    """The Anthropic error type of an error without an HTTP answer (an `error` trigger's code)."""
    code = (answer.error_code or "").lower()
    for words, kind in (
        (("rate_limit",), "rate_limit_error"),
        (("overload",), "overloaded_error"),
        (("timeout", "timed_out"), "timeout_error"),
        (("server_error", "internal", "unavailable"), "api_error"),
    ):
        if any(word in code for word in words):
            return kind
    return "invalid_request_error"
