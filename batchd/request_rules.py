"""The per-line rules of a batch file, one class per dialect of request lines (DESIGN §3).

Pure: a rules object takes one line's bytes and returns its problems, with no
file, no clock and no SQL. What it must remember across lines (the custom_ids
already used) is handed in as a `SeenIds`; `batchd.validation` streams a file
through it, counts the lines and holds the whole-file rules. The rule names are
published; batchd.validation's docstring lists them.

`OpenAIRules` checks the lines Together, OpenAI and the local backend take
(OpenAI's batch format); `AnthropicRules` Anthropic's own (`{"custom_id", "params"}`);
`GeminiRules` Gemini's (`{"key", "request"}`). `rules_for` picks the class of a provider
kind, and `id_key` names the field that identifies a request in its lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from batchd.jsonl import MAX_JSON_DEPTH, nesting_depth
from batchd.models import SUPPORTED_ENDPOINTS, BatchEndpoint
from batchd.tokens import output_tokens, prompt_tokens

__all__ = [
    "AnthropicRules",
    "GeminiRules",
    "LineRules",
    "OpenAIRules",
    "Problem",
    "SeenIds",
    "id_key",
    "rules_for",
    "show_value",
]

_MAX_CUSTOM_ID = 64
#: Anthropic's custom_id: 1 to 64 of these characters.
_ANTHROPIC_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Longest user value quoted in a message, so one bad line cannot bloat the report.
_SHOW_MAX = 80
# A \\uXXXX escape of a surrogate that is not half of a pair: a high one (D800-DBFF) no low
# one (DC00-DFFF) follows, or a low one no high one precedes. Searched in a line whose
# escaped backslashes are blanked first, so that `\\ud800` (text, not an escape) never matches.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD](?:[89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD])[c-fC-F][0-9a-fA-F]{2})"
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a batch file."""

    #: 1-based line number; None for a problem of the whole file
    line: int | None
    #: stable short name of the rule (see batchd.validation's docstring)
    rule: str
    #: what is wrong, for a person
    message: str

    def __str__(self) -> str:
        where = "file" if self.line is None else f"line {self.line}"
        return f"{where}: {self.rule}: {self.message}"


class SeenIds(Protocol):
    """The custom_ids of a file so far: the one memory the per-line rules need."""

    def add(self, custom_id: str, line: int) -> int | None:
        """Remember `custom_id` at `line`; return the earlier line if it was seen before."""
        ...


class LineRules(Protocol):
    """One dialect's per-line rules, with the little state they share across the lines of one file."""

    @property
    def endpoint(self) -> str | None:
        """The batch's endpoint: the first supported one the lines name (None before it)."""
        ...

    @property
    def model(self) -> str | None:
        """The one model every request names so far; "" once two differ (None before the first)."""
        ...

    @property
    def tokens(self) -> EnqueuedTokens:
        """The tokens the lines so far enqueue, estimated (batchd/tokens.py)."""
        ...

    def check(self, number: int, content: bytes) -> list[Problem]:
        """The problems of line `number` (its bytes without the line end); empty when it is fine."""
        ...


def show_value(value: Any) -> str:
    """A user's value quoted as JSON (control characters escaped), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 1] + "…"


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; providers do not.
    raise ValueError(f"{name} is not a JSON value")


def _parse(text: str) -> tuple[Any, str | None]:
    """Parse one line; return (value, None) or (None, the json problem's message)."""
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}: column {exc.colno})"
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        return None, f"not valid JSON ({exc})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def _request_object(number: int, content: bytes) -> dict[str, Any] | Problem:
    """The line as a JSON object, or its encoding, json, depth, surrogate or object problem
    (every dialect's first rules)."""
    try:
        # orjson takes only what the standard parser takes (and refuses NaN and lone
        # surrogates), three times faster; what it refuses goes the slow way, which names the problem.
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = content[exc.start]
            where = f"byte 0x{bad:02x} at byte {exc.start + 1} of the line"
            return Problem(number, "encoding", f"not valid UTF-8 ({where})")
        value, error = _parse(text)
        if error is not None:
            return Problem(number, "json", error)
    # Cheap guards first: this runs over every line of multi-GB files.
    if content.count(b"[") + content.count(b"{") > MAX_JSON_DEPTH or b"\\u" in content:
        unwritable = _unwritable(number, content)
        if unwritable is not None:
            return unwritable
    if not isinstance(value, dict):
        return Problem(number, "object", f"a request must be a JSON object, got {_kind(value)}")
    return value


def _unwritable(number: int, content: bytes) -> Problem | None:
    """A parsed line's nesting deeper than MAX_JSON_DEPTH, or a lone surrogate in one of its strings.

    Either passes json.loads, then fails the batch later: a deeper line in a backend's parser,
    a lone surrogate wherever its custom_id is written back as UTF-8 (the results, the outbox).
    Each look has a cheap guard: fewer opening brackets cannot nest deeper, and no `\\ud`
    escape, no surrogate.
    """
    if content.count(b"[") + content.count(b"{") > MAX_JSON_DEPTH:
        depth = nesting_depth(content)
        if depth > MAX_JSON_DEPTH:
            return Problem(number, "too_deep", f"arrays and objects nested {depth} deep; at most {MAX_JSON_DEPTH}")
    if b"\\ud" in content or b"\\uD" in content:
        # Blanked, not removed: `\ud800\\\udc00` holds two lone halves, not a pair.
        found = _LONE_SURROGATE.search(content.replace(b"\\\\", b"__"))
        if found is not None:
            escape = found.group().decode("ascii")
            message = (
                f"a lone surrogate {escape} at byte {found.start() + 1} of the line cannot be written back "
                "as UTF-8 JSON (a \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one)"
            )
            return Problem(number, "lone_surrogate", message)
    return None


def _remember(seen: SeenIds, number: int, custom_id: str, found: list[Problem], field: str = "custom_id") -> None:
    """The duplicate_custom_id rule (Gemini's: duplicate_key): each id once in a file."""
    earlier = seen.add(custom_id, number)
    if earlier is not None:
        message = f"{field} {show_value(custom_id)} is already used on line {earlier}"
        found.append(Problem(number, f"duplicate_{field}", message))


def _model(number: int, body: dict[str, Any], where: str, so_far: str | None, found: list[Problem]) -> str | None:
    """The model rule for `where`.model; returns the one model every request names so far ("" once
    two differ, None before the first)."""
    model = body.get("model")
    if "model" not in body:
        found.append(Problem(number, "model", f"{where}.model is missing"))
    elif not isinstance(model, str) or not model:
        found.append(Problem(number, "model", f"{where}.model must be a non-empty string, got {show_value(model)}"))
    elif so_far is None:
        return model
    elif so_far != model:
        return ""
    return so_far


class EnqueuedTokens:
    """What a file's requests enqueue at the provider: prompt and most output tokens, estimated."""

    def __init__(self) -> None:
        self.prompt = 0
        self.output = 0

    def add(self, body: Any) -> None:
        self.prompt += prompt_tokens(body)
        self.output += output_tokens(body)


class OpenAIRules:
    """OpenAI's batch lines, as Together, OpenAI and the local backend take them.

    `{"custom_id", "method": "POST", "url", "body"}`: custom_id 1–64 characters
    and unique, url a supported endpoint and the same on every line, body an
    object with `model` and what its endpoint needs, `stream` not true.
    """

    def __init__(self, seen: SeenIds) -> None:
        self.seen = seen
        self.endpoint: str | None = None
        self.endpoint_line = 0
        #: the one model every request names, "" once two differ (None before the first)
        self.model: str | None = None
        self.tokens = EnqueuedTokens()

    def check(self, number: int, content: bytes) -> list[Problem]:
        """The problems of line `number`; several rules can fail on one line."""
        value = _request_object(number, content)
        if isinstance(value, Problem):
            return [value]
        found: list[Problem] = []
        self._custom_id(number, value, found)
        self._method(number, value, found)
        url = self._url(number, value, found)
        self._body(number, value, url, found)
        return found

    def _custom_id(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "custom_id" not in request:
            found.append(Problem(number, "custom_id", "custom_id is missing"))
            return
        custom_id = request["custom_id"]
        if not isinstance(custom_id, str):
            found.append(Problem(number, "custom_id", f"custom_id must be a string, got {_kind(custom_id)}"))
            return
        if not 1 <= len(custom_id) <= _MAX_CUSTOM_ID:
            message = f"custom_id must be 1 to {_MAX_CUSTOM_ID} characters, got {len(custom_id)}"
            found.append(Problem(number, "custom_id", message))
            return
        _remember(self.seen, number, custom_id, found)

    def _method(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "method" not in request:
            found.append(Problem(number, "method", 'method is missing (it must be "POST")'))
        elif request["method"] != "POST":
            found.append(Problem(number, "method", f'method must be "POST", got {show_value(request["method"])}'))

    def _url(self, number: int, request: dict[str, Any], found: list[Problem]) -> str | None:
        """Check `url`; return it when it is a supported endpoint."""
        supported = ", ".join(SUPPORTED_ENDPOINTS)
        if "url" not in request:
            found.append(Problem(number, "url", f"url is missing (supported: {supported})"))
            return None
        url = request["url"]
        if not isinstance(url, str) or url not in SUPPORTED_ENDPOINTS:
            message = f"url {show_value(url)} is not a supported endpoint (supported: {supported})"
            found.append(Problem(number, "url", message))
            return None
        if self.endpoint is None:
            self.endpoint, self.endpoint_line = url, number
        elif url != self.endpoint:
            message = (
                f"url {show_value(url)} differs from {show_value(self.endpoint)} (line {self.endpoint_line}); "
                "every request of a batch must use the same endpoint"
            )
            found.append(Problem(number, "mixed_url", message))
        return url

    def _body(self, number: int, request: dict[str, Any], url: str | None, found: list[Problem]) -> None:
        if "body" not in request:
            found.append(Problem(number, "body", "body is missing"))
            return
        body = request["body"]
        if not isinstance(body, dict):
            found.append(Problem(number, "body", f"body must be a JSON object, got {_kind(body)}"))
            return
        self.model = _model(number, body, "body", self.model, found)
        self.tokens.add(body)
        if url == BatchEndpoint.CHAT_COMPLETIONS:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                got = "nothing" if "messages" not in body else show_value(messages)
                message = f"body.messages must be a non-empty list for {url}, got {got}"
                found.append(Problem(number, "messages", message))
        elif url == BatchEndpoint.COMPLETIONS and body.get("prompt") is None:
            found.append(Problem(number, "prompt", f"body.prompt is required for {url}"))
        elif url == BatchEndpoint.EMBEDDINGS and body.get("input") is None:
            found.append(Problem(number, "input", f"body.input is required for {url}"))
        if body.get("stream") is True:
            found.append(Problem(number, "stream", "body.stream must not be true: batch requests cannot stream"))


class _OwnLines:
    """The rules of a dialect with lines of its own and one endpoint for every batch (Anthropic,
    Gemini): a line's id, then its request, each checked by the subclass."""

    #: the endpoint every batch of the dialect has
    ENDPOINT = ""

    def __init__(self, seen: SeenIds) -> None:
        self.seen = seen
        self.endpoint: str | None = None
        self.model: str | None = None
        self.tokens = EnqueuedTokens()

    def check(self, number: int, content: bytes) -> list[Problem]:
        value = _request_object(number, content)
        if isinstance(value, Problem):
            return [value]
        self.endpoint = self.ENDPOINT
        found: list[Problem] = []
        self._id(number, value, found)
        self._request(number, value, found)
        return found

    def _id(self, number: int, line: dict[str, Any], found: list[Problem]) -> None:
        raise NotImplementedError

    def _request(self, number: int, line: dict[str, Any], found: list[Problem]) -> None:
        raise NotImplementedError


class AnthropicRules(_OwnLines):
    """Anthropic's Message Batches lines: `{"custom_id", "params"}`.

    custom_id 1–64 characters of `[A-Za-z0-9_-]` and unique; params an object with a
    non-empty string `model`, an integer `max_tokens` of at least 1, a non-empty list of
    `messages`, and `stream` not true. The endpoint is always Messages.
    """

    ENDPOINT = BatchEndpoint.MESSAGES

    def _id(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "custom_id" not in request:
            found.append(Problem(number, "custom_id", "custom_id is missing"))
            return
        custom_id = request["custom_id"]
        if not isinstance(custom_id, str) or not _ANTHROPIC_CUSTOM_ID.fullmatch(custom_id):
            message = (
                f"custom_id must be 1 to 64 of the characters A-Z a-z 0-9 _ - (Anthropic's rule), "
                f"got {show_value(custom_id)}"
            )
            found.append(Problem(number, "custom_id", message))
            return
        _remember(self.seen, number, custom_id, found)

    def _request(self, number: int, request: dict[str, Any], found: list[Problem]) -> None:
        if "params" not in request:
            hint = ' (this line looks like OpenAI\'s format: Anthropic takes {"custom_id", "params"})'
            found.append(Problem(number, "params", "params is missing" + (hint if "body" in request else "")))
            return
        params = request["params"]
        if not isinstance(params, dict):
            found.append(Problem(number, "params", f"params must be a JSON object, got {_kind(params)}"))
            return
        self.model = _model(number, params, "params", self.model, found)
        self.tokens.add(params)
        tokens = params.get("max_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            got = "nothing" if "max_tokens" not in params else show_value(tokens)
            message = f"params.max_tokens must be an integer of at least 1, got {got}"
            found.append(Problem(number, "max_tokens", message))
        messages = params.get("messages")
        if not isinstance(messages, list) or not messages:
            got = "nothing" if "messages" not in params else show_value(messages)
            found.append(Problem(number, "messages", f"params.messages must be a non-empty list, got {got}"))
        if params.get("stream") is True:
            found.append(Problem(number, "stream", "params.stream must not be true: batch requests cannot stream"))


class GeminiRules(_OwnLines):
    """Gemini's batch lines: `{"key", "request"}`.

    key a non-empty string, unique (in the role of custom_id: Gemini documents no length or
    alphabet for it); request an object (a GenerateContentRequest) with a non-empty list of
    `contents`. The lines name no model: the create call does (the spec's `model`, else the
    provider's `model`), so `model` stays None here.
    """

    ENDPOINT = BatchEndpoint.GENERATE_CONTENT

    def _id(self, number: int, line: dict[str, Any], found: list[Problem]) -> None:
        if "key" not in line:
            hint = ' (this line looks like OpenAI\'s format: Gemini takes {"key", "request"})'
            found.append(Problem(number, "key", "key is missing" + (hint if "custom_id" in line else "")))
            return
        key = line["key"]
        if not isinstance(key, str) or not key:
            found.append(Problem(number, "key", f"key must be a non-empty string, got {show_value(key)}"))
            return
        _remember(self.seen, number, key, found, field="key")

    def _request(self, number: int, line: dict[str, Any], found: list[Problem]) -> None:
        if "request" not in line:
            found.append(Problem(number, "request", "request is missing (a GenerateContentRequest object)"))
            return
        request = line["request"]
        if not isinstance(request, dict):
            found.append(Problem(number, "request", f"request must be a JSON object, got {_kind(request)}"))
            return
        self.tokens.add(request)
        contents = request.get("contents")
        if not isinstance(contents, list) or not contents:
            got = "nothing" if "contents" not in request else show_value(contents)
            found.append(Problem(number, "contents", f"request.contents must be a non-empty list, got {got}"))


#: The field that identifies a request in a dialect's lines (and in its answers), where it is
#: not `custom_id`.
_ID_KEYS = {"gemini": "key"}


def id_key(kind: str) -> str:
    """The field naming a request in the lines of a provider kind: Gemini's `key`, else `custom_id`."""
    return _ID_KEYS.get(kind, "custom_id")


def rules_for(kind: str, seen: SeenIds) -> LineRules:
    """The line rules of a provider kind: Anthropic's or Gemini's own lines, or OpenAI's batch format."""
    if kind == "anthropic":
        return AnthropicRules(seen)
    if kind == "gemini":
        return GeminiRules(seen)
    return OpenAIRules(seen)
