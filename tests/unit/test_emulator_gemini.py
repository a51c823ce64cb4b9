"""The pure parts of the emulator's Gemini dialect: request translation, Google's statuses, page
tokens, and the conversion of a batch's input into the emulator's lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.emulator.gemini_content import from_chat, generate_content_problem, to_chat
from batchd.emulator.gemini_input import INVALID_ID_PREFIX, CreateProblem, convert_file, convert_inline
from batchd.emulator.gemini_pages import PageProblem, page, page_size
from batchd.emulator.google_errors import google_status, status_of_error_code
from batchd.emulator.spool import recover_spool

MODEL = "models/gemini-2.5-flash"


def request(text: str = "hi") -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def test_a_request_translates_to_a_chat_completion_and_back() -> None:
    chat = to_chat(
        {
            "model": MODEL,
            "systemInstruction": {"parts": [{"text": "be "}, {"text": "brief"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "hello"}]},
                {"role": "model", "parts": [{"text": "hi"}, {"inlineData": {"data": "…"}}]},
                {"parts": [{"text": "again"}]},
            ],
            "generation_config": {"max_output_tokens": 9, "temperature": 0.5, "stopSequences": ["x"]},
        }
    )
    assert chat == {
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 9,
        "temperature": 0.5,
        "stop": ["x"],
    }
    reply = {
        "id": "r1",
        "choices": [{"message": {"content": "done"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1},
    }
    answer = from_chat(reply, "gemini-2.5-flash")
    assert answer["candidates"] == [
        {"content": {"role": "model", "parts": [{"text": "done"}]}, "finishReason": "MAX_TOKENS", "index": 0}
    ]
    assert answer["usageMetadata"] == {"promptTokenCount": 4, "candidatesTokenCount": 1, "totalTokenCount": 5}
    assert answer["modelVersion"] == "gemini-2.5-flash" and answer["responseId"] == "r1"


@pytest.mark.parametrize("bad", [None, [], {}, {"contents": []}, {"contents": "text"}, {"contents": ["text"]}])
def test_a_request_needs_a_list_of_contents(bad: Any) -> None:
    assert generate_content_problem(bad) is not None


def test_an_error_trigger_s_code_reads_as_a_google_status() -> None:
    assert status_of_error_code("RESOURCE_EXHAUSTED") == (429, "RESOURCE_EXHAUSTED")
    assert status_of_error_code("unavailable") == (503, "UNAVAILABLE")
    assert status_of_error_code("rate_limit_exceeded") == (429, "RESOURCE_EXHAUSTED")
    assert status_of_error_code("request_timeout") == (504, "DEADLINE_EXCEEDED")
    assert status_of_error_code("server_error") == (500, "INTERNAL")
    assert status_of_error_code("invalid_model") == (400, "INVALID_ARGUMENT")
    assert [google_status(code) for code in (400, 404, 429, 500, 503, 504, 418, 599)] == [
        "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED",
        "INVALID_ARGUMENT", "INTERNAL",
    ]  # fmt: skip


def test_pages_go_on_after_the_token_s_place_whatever_changed() -> None:
    items = [(5, 5), (4, 4), (3, 3), (2, 2), (1, 1)]  # newest first: (created, seq)
    first, token = page(items, lambda item: item, None, 2)
    assert first == [(5, 5), (4, 4)] and token is not None
    # Newer items, and the loss of the last one shown, move nothing.
    changed = [(7, 7), (6, 6), (5, 5), (3, 3), (2, 2), (1, 1)]
    second, token = page(changed, lambda item: item, token, 2)
    assert second == [(3, 3), (2, 2)] and token is not None
    last, token = page(changed, lambda item: item, token, 2)
    assert last == [(1, 1)] and token is None
    with pytest.raises(PageProblem):
        page(items, lambda item: item, "not-a-token", 2)
    assert [page_size(raw, 10, 100) for raw in (None, "", "0", "7", "1000")] == [10, 10, 10, 7, 100]
    with pytest.raises(PageProblem):
        page_size("-1", 10, 100)


def convert(tmp_path: Path, raw: bytes, max_requests: int = 10) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the emulator's lines, the error lines written for the invalid ones by custom_id hash)."""
    source, lines, spool = tmp_path / "in.jsonl", tmp_path / "lines.jsonl", tmp_path / "spool.jsonl"
    source.write_bytes(raw)
    converted = convert_file(source, lines, spool, MODEL, max_requests)
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    assert converted.total == len(written)
    answered = recover_spool(spool)
    assert converted.invalid == answered.failed == len(answered.answered)
    errors = {line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2]) for line in spool.read_text().splitlines()}
    return written, errors


def test_a_file_s_lines_become_the_emulator_s_lines_and_the_invalid_ones_error_lines(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbf" + b"\r\n".join(
        [
            json.dumps({"key": "a", "request": request("one")}).encode(),
            json.dumps({"key": "b", "request": {**request(), "model": "models/other"}}).encode(),
            b"",
            json.dumps({"key": "a", "request": request("dup")}).encode(),
            json.dumps({"key": "c", "request": {"contents": []}}).encode(),
            json.dumps({"request": request()}).encode(),
            b"[1, 2]",
        ]
    )
    written, errors = convert(tmp_path, raw)
    assert written[0] == {
        "custom_id": "a",
        "method": "POST",
        "url": "generateContent",
        "body": {**request("one"), "model": MODEL},
    }
    # A request that names its model keeps it.
    assert written[1]["body"]["model"] == "models/other"
    ids = [line["custom_id"] for line in written]
    assert ids[:2] == ["a", "b"] and ids[3] == "c"
    assert ids[2].startswith(INVALID_ID_PREFIX) and ids[4].startswith(INVALID_ID_PREFIX)
    assert all(line["body"] == {} for line in written[2:])
    messages = sorted((line.get("key", ""), line["error"]["message"]) for line in errors.values())
    assert messages == [
        ("", "line 6: key must be a non-empty string"),
        ("", "line 7: not a JSON object"),
        ("a", "line 4: key 'a' was used by an earlier line"),
        ("c", "line 5: request.contents must be a non-empty list"),
    ]
    assert all(line["error"]["status"] == "INVALID_ARGUMENT" for line in errors.values())


def test_an_input_without_requests_or_with_too_many_makes_no_batch(tmp_path: Path) -> None:
    with pytest.raises(CreateProblem):
        convert(tmp_path, b"\n  \n")
    many = b"".join(json.dumps({"key": f"k{i}", "request": request()}).encode() + b"\n" for i in range(4))
    with pytest.raises(CreateProblem):
        convert(tmp_path, many, max_requests=3)


def test_inline_requests_are_numbered_and_keep_their_metadata(tmp_path: Path) -> None:
    lines, spool = tmp_path / "lines.jsonl", tmp_path / "spool.jsonl"
    items = [{"request": request(), "metadata": {"key": "x"}}, "nonsense", {"request": {"contents": []}}]
    converted = convert_inline(items, lines, spool, MODEL, 10)
    assert (converted.total, converted.invalid) == (3, 2)
    written = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [line["custom_id"] for line in written] == ["0", "1", "2"]
    assert written[0]["metadata"] == {"key": "x"} and "metadata" not in written[1]
