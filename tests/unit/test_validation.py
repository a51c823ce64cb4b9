"""Unit tests of batchd.validation: one per rule, plus the report and the upload copy."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from batchd.jsonl import MAX_JSON_DEPTH, nesting_depth
from batchd.models import PROVIDER_LIMITS, Limits
from batchd.request_rules import OpenAIRules
from batchd.upload_copy import iter_custom_ids, write_upload_copy
from batchd.validation import RULES, Problem, Report, format_report, validate_file

LIMITS = PROVIDER_LIMITS["together"]
CHAT = "/v1/chat/completions"


def request(custom_id: str = "r1", **overrides: Any) -> dict[str, Any]:
    """A valid chat request; keyword arguments replace top-level keys."""
    req: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    req.update(overrides)
    return req


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def write(tmp_path: Path, data: bytes, name: str = "batch.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check(tmp_path: Path, data: bytes, limits: Limits = LIMITS, max_reported: int = 100) -> Report:
    return validate_file(write(tmp_path, data), source="batch.jsonl", limits=limits, max_reported=max_reported)


def only(report: Report) -> Problem:
    assert report.problem_count == 1, report.problems
    return report.problems[0]


def test_valid_file(tmp_path: Path) -> None:
    report = check(tmp_path, line(request("a")) + line(request("b")))
    assert report.ok
    assert report.problems == ()
    assert report.request_count == 2
    assert report.endpoint == CHAT
    assert report.size_bytes == (tmp_path / "batch.jsonl").stat().st_size


def test_bom_crlf_and_blank_lines_accepted(tmp_path: Path) -> None:
    data = (
        b"\xef\xbb\xbf"
        + json.dumps(request("a")).encode()
        + b"\r\n"
        + b"   \r\n\n\t\n"
        + json.dumps(request("b")).encode()
        + b"\r\n\r\n"
        + json.dumps(request("c")).encode()  # no final line end
    )
    report = check(tmp_path, data)
    assert report.ok, report.problems
    assert report.request_count == 3


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    report = check(tmp_path, line(request("a")) + b"\n\n" + b"{oops\n")
    problem = only(report)
    assert (problem.line, problem.rule) == (4, "json")


def test_encoding(tmp_path: Path) -> None:
    bad = json.dumps(request("b")).replace("hi", "h\udcffi", 1).encode("utf-8", "surrogateescape")
    problem = only(check(tmp_path, line(request("a")) + bad + b"\n"))
    assert (problem.line, problem.rule) == (2, "encoding")
    assert "0xff" in problem.message


def test_json(tmp_path: Path) -> None:
    problem = only(check(tmp_path, line(request("a")) + b'{"custom_id": "b" "method": "POST"}\n'))
    assert (problem.line, problem.rule) == (2, "json")
    assert str(problem) == "line 2: json: not valid JSON (Expecting ',' delimiter: column 19)"


@pytest.mark.parametrize("text", [b"NaN", b'{"custom_id": "a", "x": Infinity}', b"[" * 100_000])
def test_json_rejects_what_providers_reject(tmp_path: Path, text: bytes) -> None:
    problem = only(check(tmp_path, text + b"\n"))
    assert (problem.line, problem.rule) == (1, "json")


@pytest.mark.parametrize("value", [[1], "text", 3, None])
def test_object(tmp_path: Path, value: Any) -> None:
    problem = only(check(tmp_path, line(request("a")) + line(value)))
    assert (problem.line, problem.rule) == (2, "object")


@pytest.mark.parametrize(
    ("custom_id", "words"),
    [(None, "missing"), (7, "string"), ("", "got 0"), ("x" * 65, "got 65")],
)
def test_custom_id(tmp_path: Path, custom_id: Any, words: str) -> None:
    req = request()
    if custom_id is None:
        del req["custom_id"]
    else:
        req["custom_id"] = custom_id
    problem = only(check(tmp_path, line(request("a")) + line(req)))
    assert (problem.line, problem.rule) == (2, "custom_id")
    assert words in problem.message


def test_custom_id_counts_characters_not_bytes(tmp_path: Path) -> None:
    assert check(tmp_path, line(request("é" * 64))).ok


def test_duplicate_custom_id_names_earlier_line(tmp_path: Path) -> None:
    data = line(request("a")) + line(request("b")) + line(request("a"))
    problem = only(check(tmp_path, data))
    assert (problem.line, problem.rule) == (3, "duplicate_custom_id")
    assert "line 1" in problem.message


@pytest.mark.parametrize("method", ["GET", "post", None])
def test_method(tmp_path: Path, method: str | None) -> None:
    req = request("b", method=method)
    if method is None:
        del req["method"]
    problem = only(check(tmp_path, line(request("a")) + line(req)))
    assert (problem.line, problem.rule) == (2, "method")


@pytest.mark.parametrize("url", ["/v1/images", "v1/chat/completions", 5, None])
def test_url(tmp_path: Path, url: Any) -> None:
    req = request("b", url=url)
    if url is None:
        del req["url"]
    problem = only(check(tmp_path, line(request("a")) + line(req)))
    assert (problem.line, problem.rule) == (2, "url")


def test_mixed_url_names_the_first_url(tmp_path: Path) -> None:
    embed = request("b", url="/v1/embeddings", body={"model": "m", "input": "x"})
    report = check(tmp_path, line(request("a")) + line(embed))
    problem = only(report)
    assert (problem.line, problem.rule) == (2, "mixed_url")
    assert CHAT in problem.message and "line 1" in problem.message
    assert report.endpoint == CHAT


def test_endpoint_is_first_supported_url(tmp_path: Path) -> None:
    report = check(tmp_path, line(request("a", url="/v1/nope")) + line(request("b")))
    assert [(p.line, p.rule) for p in report.problems] == [(1, "url")]
    assert report.endpoint == CHAT


@pytest.mark.parametrize("body", [None, "text", []])
def test_body(tmp_path: Path, body: Any) -> None:
    req = request("b", body=body)
    if body is None:
        del req["body"]
    problem = only(check(tmp_path, line(request("a")) + line(req)))
    assert (problem.line, problem.rule) == (2, "body")


@pytest.mark.parametrize("model", ["<missing>", "", None, 3])
def test_model(tmp_path: Path, model: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model != "<missing>":
        body["model"] = model
    problem = only(check(tmp_path, line(request("a")) + line(request("b", body=body))))
    assert (problem.line, problem.rule) == (2, "model")


@pytest.mark.parametrize("messages", ["<missing>", [], "hi", None])
def test_messages(tmp_path: Path, messages: Any) -> None:
    body: dict[str, Any] = {"model": "m"}
    if messages != "<missing>":
        body["messages"] = messages
    problem = only(check(tmp_path, line(request("a")) + line(request("b", body=body))))
    assert (problem.line, problem.rule) == (2, "messages")


def test_prompt(tmp_path: Path) -> None:
    ok = request("a", url="/v1/completions", body={"model": "m", "prompt": "x"})
    bad = request("b", url="/v1/completions", body={"model": "m"})
    problem = only(check(tmp_path, line(ok) + line(bad)))
    assert (problem.line, problem.rule) == (2, "prompt")


def test_input(tmp_path: Path) -> None:
    ok = request("a", url="/v1/embeddings", body={"model": "m", "input": ["x"]})
    bad = request("b", url="/v1/embeddings", body={"model": "m"})
    problem = only(check(tmp_path, line(ok) + line(bad)))
    assert (problem.line, problem.rule) == (2, "input")


def test_stream(tmp_path: Path) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    falsy = {**body, "stream": False}
    problem = only(check(tmp_path, line(request("a", body=falsy)) + line(request("b", body=body))))
    assert (problem.line, problem.rule) == (2, "stream")


@pytest.mark.parametrize("data", [b"", b"\n  \r\n\t\n", b"\xef\xbb\xbf\r\n"])
def test_empty(tmp_path: Path, data: bytes) -> None:
    report = check(tmp_path, data)
    problem = only(report)
    assert (problem.line, problem.rule) == (None, "empty")
    assert report.request_count == 0
    assert str(problem).startswith("file: empty: ")


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    req = {"custom_id": "", "method": "GET", "url": CHAT, "body": {"stream": True}}
    report = check(tmp_path, line(req))
    assert [p.rule for p in report.problems] == ["custom_id", "method", "model", "messages", "stream"]
    assert {p.line for p in report.problems} == {1}


def test_a_file_over_the_batch_limits_is_valid_it_will_be_split(tmp_path: Path) -> None:
    limits = Limits(max_bytes=300, max_requests=2)
    report = check(tmp_path, b"".join(line(request(f"r{i}")) for i in range(5)), limits=limits)
    assert report.ok and report.request_count == 5


def test_duplicates_are_found_past_the_in_memory_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the window the ids spill to a scratch index; a duplicate is found either way.
    monkeypatch.setattr("batchd.validation._SEEN_IN_MEMORY", 2)
    data = b"".join(line(request(c)) for c in ("a", "b", "c", "d", "b", "d"))
    report = check(tmp_path, data)
    assert [(p.line, p.rule) for p in report.problems] == [(5, "duplicate_custom_id"), (6, "duplicate_custom_id")]
    assert "already used on line 2" in report.problems[0].message
    assert "already used on line 4" in report.problems[1].message


def test_overlong_line_is_not_read_whole(tmp_path: Path) -> None:
    long_line = line(request("b", padding="x" * 5000))
    report = check(tmp_path, line(request("a")) + long_line + line(request("c")), limits=Limits(1000, 10))
    assert [(p.line, p.rule) for p in report.problems] == [(2, "too_large")]
    assert report.request_count == 3


def test_a_line_over_the_per_request_limit_is_too_large(tmp_path: Path) -> None:
    limits = Limits(max_bytes=10**6, max_requests=10, max_request_bytes=1000)
    long_line = line(request("b", padding="x" * 5000))
    report = check(tmp_path, line(request("a")) + long_line + line(request("c")), limits=limits)
    assert [(p.line, p.rule) for p in report.problems] == [(2, "too_large")]
    assert "limit per request (1,000 bytes)" in report.problems[0].message
    assert report.request_count == 3


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b""])
def test_a_line_of_exactly_the_per_request_limit_is_taken(tmp_path: Path, end: bytes) -> None:
    content = json.dumps(request("a", padding="")).encode()
    content = content[:-1] + b', "pad": "' + b"x" * (900 - len(content) - 10) + b'"}'
    limits = Limits(max_bytes=10**6, max_requests=10, max_request_bytes=len(content))
    assert check(tmp_path, content + end, limits=limits).ok
    over = Limits(max_bytes=10**6, max_requests=10, max_request_bytes=len(content) - 1)
    assert [p.rule for p in check(tmp_path, content + end, limits=over).problems] == ["too_large"]


def test_the_per_request_limit_is_32_mb_for_every_provider() -> None:
    assert {limits.max_request_bytes for limits in PROVIDER_LIMITS.values()} == {32_000_000}


def test_a_lone_surrogate_anywhere_is_a_problem_with_its_line(tmp_path: Path) -> None:
    good_pair = json.dumps(request("b", body={"model": "m", "messages": [{"role": "user", "content": "\U0001f600"}]}))
    assert "\\ud83d\\ude00" in good_pair  # json.dumps escapes it as a pair: fine
    lines = [
        json.dumps(request("a")),
        good_pair,
        json.dumps(request("c\ud800")),  # the custom_id
        json.dumps(request("d", body={"model": "m", "messages": [{"role": "user", "content": "x\udfff"}]})),
        json.dumps(request("e", extra={"k\udbffey": 1})),  # a key
        json.dumps(request("f", extra="\udc00\ud83d\ude00")),  # a low half first, then a pair
        json.dumps(request("g", extra="\\ud800")),  # an escaped backslash: text, not an escape
        json.dumps(request("h", extra="\\\ud800")),  # a backslash, then an escape
        json.dumps(request("i", extra="\ud800")).replace("\\ud800", "\\uD800"),  # upper case
        json.dumps(request("j", extra="\ud800\\\udc00")),  # two halves a backslash apart: both lone
        json.dumps(request("k", extra="\\\ud83d\ude00\\")),  # a pair between backslashes: fine
    ]
    report = check(tmp_path, "\n".join(lines).encode() + b"\n")
    assert [(p.line, p.rule) for p in report.problems] == [(n, "lone_surrogate") for n in (3, 4, 5, 6, 8, 9, 10)]
    assert "\\ud800 at byte" in report.problems[0].message
    # The report itself is plain UTF-8 (a lone surrogate quoted in it could not be written).
    format_report(report).encode("utf-8")


def test_a_lone_surrogate_does_not_reach_the_custom_id_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the in-memory window the ids go to SQLite, which cannot store a lone surrogate.
    monkeypatch.setattr("batchd.validation._SEEN_IN_MEMORY", 0)
    report = check(tmp_path, line(request("a\ud800")) + line(request("a\ud800")))
    assert [(p.line, p.rule) for p in report.problems] == [(1, "lone_surrogate"), (2, "lone_surrogate")]


def nested(depth: int) -> bytes:
    """A valid request whose deepest array sits at `depth` (the request object is 1)."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return json.dumps(request("a")).encode()[:-1] + b', "deep": ' + inner.encode() + b"}"


def test_nesting_deeper_than_the_limit_is_too_deep(tmp_path: Path) -> None:
    assert nesting_depth(nested(MAX_JSON_DEPTH)) == MAX_JSON_DEPTH
    report = check(tmp_path, nested(MAX_JSON_DEPTH) + b"\n" + nested(MAX_JSON_DEPTH + 1) + b"\n" + nested(900) + b"\n")
    assert [(p.line, p.rule) for p in report.problems] == [(2, "too_deep"), (3, "too_deep")]
    assert report.problems[0].message == f"arrays and objects nested 65 deep; at most {MAX_JSON_DEPTH}"


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    text = '[{"\\"[' + "[" * 200 + '": "{' + "{" * 200 + '\\\\"}'
    req = request("a", extra=text, more=[[[{"k": text}]]])
    data = json.dumps(req).encode()
    assert nesting_depth(data) == 5
    assert check(tmp_path, data + b"\n").ok


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'"[["', 0),
        (b"{}", 1),
        (b"[[], {}]", 2),
        (b'{"a": [{"b": "]]]"}]}', 3),
        (b'[["\\\\", ["\\"[["], "\\\\\\"]"]]', 3),  # escaped backslashes and quotes
    ],
)
def test_nesting_depth(text: bytes, depth: int) -> None:
    assert nesting_depth(text) == depth


class _NoIds:
    def add(self, custom_id: str, line: int) -> int | None:
        return None


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(map(_has_lone_surrogate, value))
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def test_the_raw_byte_looks_agree_with_the_parsed_value() -> None:
    # Random JSON rich in backslashes, quotes, brackets and surrogate halves: what the looks at
    # a line's bytes say (its depth, a lone surrogate) is what walking json.loads' value says.
    rng = random.Random(13)
    alphabet = ["a", "u", "d", "8", "é", "\n", "\\", '"', "[", "]", "{", "}", "\ud800", "\udc00", "\ud83d", "\ude00"]

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 6 or roll < 0.3:
            return rng.choice([1, None, "".join(rng.choices(alphabet, k=rng.randint(0, 8)))])
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {"".join(rng.choices(alphabet, k=rng.randint(0, 6))): value(depth + 1) for _ in range(3)}

    rules = OpenAIRules(_NoIds())
    for _ in range(3000):
        data = json.dumps(value(0)).encode()
        parsed = json.loads(data)
        assert nesting_depth(data) == _depth(parsed), data
        found = {p.rule for p in rules.check(1, data)}
        assert ("lone_surrogate" in found) == _has_lone_surrogate(parsed), data


def test_the_one_model_of_a_file_is_reported(tmp_path: Path) -> None:
    assert check(tmp_path, line(request("a")) + line(request("b"))).model == "m"


def test_problem_cap_keeps_total(tmp_path: Path) -> None:
    report = check(tmp_path, b"{\n" * 250, max_reported=100)
    assert len(report.problems) == 100
    assert report.problem_count == 250
    assert report.problems[-1].line == 100
    text = format_report(report)
    assert "… and 150 more problems (250 in all)" in text


def test_problem_cap_keeps_file_problems_first(tmp_path: Path) -> None:
    report = check(tmp_path, b"\n" * 3, max_reported=5)
    assert [p.rule for p in report.problems] == ["empty"]


def test_format_report_names_file_line_and_rule(tmp_path: Path) -> None:
    data = line(request("a")) + b"[1]\n" + line(request("a"))
    report = validate_file(write(tmp_path, data), source="my batch é.jsonl", limits=LIMITS)
    text = format_report(report)
    assert '"my batch é.jsonl"' in text.splitlines()[0]
    assert "line 2: object: " in text
    assert "line 3: duplicate_custom_id: " in text
    assert "more problems" not in text


def test_format_report_of_a_good_file(tmp_path: Path) -> None:
    text = format_report(check(tmp_path, line(request("a"))))
    assert "no problems" in text and "1 request for" in text  # singular: "1 requests" read as a typo


def test_rule_names_are_the_documented_ones(tmp_path: Path) -> None:
    import batchd.validation as module

    assert module.__doc__ is not None
    for rule in RULES:
        assert f"\n{rule} " in module.__doc__


def test_as_dict_is_json(tmp_path: Path) -> None:
    report = check(tmp_path, b"{\n")
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["ok"] is False
    assert doc["problems"][0] == {"line": 1, "rule": "json", "message": report.problems[0].message}


def test_write_upload_copy_normalises_and_keeps_src(tmp_path: Path) -> None:
    first = b'{"custom_id":"a",  "method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[1]}}'
    second = json.dumps(request("b"), ensure_ascii=False).replace("hi", "héllo").encode()
    src_bytes = b"\xef\xbb\xbf" + first + b"\r\n\r\n  \n" + second
    src = write(tmp_path, src_bytes)
    dest = tmp_path / "out" / "upload.jsonl"
    dest.parent.mkdir()

    copy = write_upload_copy(src, dest)

    assert src.read_bytes() == src_bytes
    assert dest.read_bytes() == first + b"\n" + second + b"\n"
    assert copy.sha256 == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert copy.size_bytes == dest.stat().st_size
    assert copy.request_count == 2
    assert list(iter_custom_ids(dest)) == ["a", "b"]
    assert [p.name for p in dest.parent.iterdir()] == ["upload.jsonl"]  # no temp file left


def test_write_upload_copy_rewrites_model_only_in_copy(tmp_path: Path) -> None:
    keep = json.dumps(request("a", body={"model": "new", "messages": [1]})).encode()
    change = json.dumps(request("b"), ensure_ascii=False).replace("hi", "日本").encode()
    src_bytes = keep + b"\n" + change + b"\n"
    src = write(tmp_path, src_bytes)
    dest = tmp_path / "upload.jsonl"

    copy = write_upload_copy(src, dest, model="new")

    assert src.read_bytes() == src_bytes
    lines = dest.read_bytes().splitlines()
    assert lines[0] == keep  # already the right model: copied byte for byte
    rewritten = json.loads(lines[1])
    assert rewritten["body"]["model"] == "new"
    assert rewritten["body"]["messages"][0]["content"] == "日本"
    assert b", " not in lines[1] and "日本".encode() in lines[1]  # compact, non-ASCII kept
    assert copy.sha256 == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert validate_file(dest, source="upload.jsonl", limits=LIMITS).ok


def test_write_upload_copy_replaces_leftover_temp(tmp_path: Path) -> None:
    src = write(tmp_path, line(request("a")))
    (tmp_path / ".upload.jsonl.tmp").write_bytes(b"half a file from a crash")
    write_upload_copy(src, tmp_path / "upload.jsonl")
    assert (tmp_path / "upload.jsonl").read_bytes() == line(request("a"))
    assert not (tmp_path / ".upload.jsonl.tmp").exists()
