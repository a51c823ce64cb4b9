"""Google's error shape for the Gemini dialect: `{"error": {"code", "message", "status"}}`.

`code` is the HTTP status, `status` the canonical name Google pairs with it (its
`google.rpc.Code`). Every answer under `/gemini` uses this shape: the routes' own errors, Starlette's
(unknown route, wrong method), the body cap's 413, the auth middleware's 401 and injected faults;
so do the error lines of a Gemini batch's results.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

#: HTTP status → Google's canonical status name (google.rpc.Code, as its HTTP mapping pairs them).
GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    416: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
#: Each status name's HTTP status (for an `error` trigger that names one) and gRPC code (what an
#: operation's `error.code` holds: a FAILED batch).
_CODES = {
    "CANCELLED": (499, 1),
    "UNKNOWN": (500, 2),
    "INVALID_ARGUMENT": (400, 3),
    "DEADLINE_EXCEEDED": (504, 4),
    "NOT_FOUND": (404, 5),
    "ALREADY_EXISTS": (409, 6),
    "PERMISSION_DENIED": (403, 7),
    "RESOURCE_EXHAUSTED": (429, 8),
    "FAILED_PRECONDITION": (400, 9),
    "ABORTED": (409, 10),
    "OUT_OF_RANGE": (400, 11),
    "UNIMPLEMENTED": (501, 12),
    "INTERNAL": (500, 13),
    "UNAVAILABLE": (503, 14),
    "DATA_LOSS": (500, 15),
    "UNAUTHENTICATED": (401, 16),
}
#: Words in an `error` trigger's code (`"error": "rate_limit_exceeded"`) → the status it stands for.
_CODE_WORDS = (
    (("rate_limit", "exhausted", "quota"), "RESOURCE_EXHAUSTED"),
    (("overload", "unavailable"), "UNAVAILABLE"),
    (("timeout", "timed_out", "deadline"), "DEADLINE_EXCEEDED"),
    (("server_error", "internal"), "INTERNAL"),
    (("not_found",), "NOT_FOUND"),
    (("permission", "forbidden"), "PERMISSION_DENIED"),
)


def google_status(code: int) -> str:
    """The status name Google pairs with an HTTP status (an unlisted 5xx is INTERNAL, 4xx INVALID_ARGUMENT)."""
    return GOOGLE_STATUSES.get(code, "INTERNAL" if code >= 500 else "INVALID_ARGUMENT")


def google_error_body(code: int, message: str, status: str | None = None) -> dict[str, Any]:
    """`{"error": {"code", "message", "status"}}`; `status` defaults to the one paired with `code`."""
    return {"error": {"code": code, "message": message, "status": status or google_status(code)}}


def google_error(code: int, message: str, status: str | None = None) -> Response:
    """An error answer in Google's shape."""
    return JSONResponse(google_error_body(code, message, status), status_code=code)


def status_of_error_code(error_code: str) -> tuple[int, str]:
    """(HTTP status, status name) of an `error` trigger's code, for a Gemini result line.

    A Google status name (`"RESOURCE_EXHAUSTED"`, any case) stands for itself; other codes are
    read by their words (`rate_limit…` → RESOURCE_EXHAUSTED, `…timeout…` → DEADLINE_EXCEEDED, …);
    anything else is a request the service refused: INVALID_ARGUMENT.
    """
    name = error_code.strip().upper()
    if name in _CODES:
        return _CODES[name][0], name
    lowered = error_code.lower()
    for words, status in _CODE_WORDS:
        if any(word in lowered for word in words):
            return _CODES[status][0], status
    return 400, "INVALID_ARGUMENT"


def grpc_code(status: str) -> int:
    """The gRPC code of a status name (2, UNKNOWN, for a name Google does not have)."""
    return _CODES.get(status, (500, 2))[1]


def error_message(body: dict[str, Any] | None) -> str | None:
    """The message of an error body in any dialect's shape (`{"error": {"message"}}`), if it has one."""
    inner = body.get("error") if body is not None else None
    message = inner.get("message") if isinstance(inner, dict) else None
    return message if isinstance(message, str) else None
