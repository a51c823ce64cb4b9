"""Anthropic's request lines (`{"custom_id", "params"}`): one test per rule, through the same
`validate_file` the inbox and `batchd validate` use, with `dialect="anthropic"`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.models import PROVIDER_LIMITS, BatchEndpoint
from batchd.validation import RULES, Report, validate_file

LIMITS = PROVIDER_LIMITS["anthropic"]


def request(custom_id: str = "r1", **params: Any) -> dict[str, Any]:
    """A valid Anthropic request line; keyword arguments replace keys of `params` (None: remove)."""
    body: dict[str, Any] = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    for key, value in params.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {"custom_id": custom_id, "params": body}


def check(tmp_path: Path, *lines: Any) -> Report:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    return validate_file(path, source="batch.jsonl", limits=LIMITS, dialect="anthropic")


def rules_of(report: Report) -> list[tuple[int | None, str]]:
    return [(p.line, p.rule) for p in report.problems]


def test_good_lines_pass_with_the_messages_endpoint_and_their_model(tmp_path: Path) -> None:
    report = check(tmp_path, request("a-1"), request("B_2"), request("c" * 64))
    assert report.ok and report.request_count == 3
    assert report.endpoint == BatchEndpoint.MESSAGES and report.model == "claude-x"


@pytest.mark.parametrize("custom_id", ["has space", "dot.ted", "", "x" * 65, "ünï", 7, None])
def test_custom_id_must_be_1_to_64_of_letters_digits_underscore_and_dash(tmp_path: Path, custom_id: Any) -> None:
    report = check(tmp_path, request("ok"), {"custom_id": custom_id, "params": request()["params"]})
    assert rules_of(report) == [(2, "custom_id")]
    assert "A-Z a-z 0-9 _ -" in report.problems[0].message


def test_a_missing_custom_id_and_a_duplicate_are_named(tmp_path: Path) -> None:
    report = check(tmp_path, request("same"), {"params": request()["params"]}, request("same"))
    assert rules_of(report) == [(2, "custom_id"), (3, "duplicate_custom_id")]
    assert "line 1" in report.problems[1].message


def test_params_must_be_an_object_and_an_openai_line_says_which_format_is_wanted(tmp_path: Path) -> None:
    openai_line = {"custom_id": "o", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    report = check(tmp_path, {"custom_id": "a", "params": [1]}, openai_line)
    assert rules_of(report) == [(1, "params"), (2, "params")]
    assert '{"custom_id", "params"}' in report.problems[1].message


@pytest.mark.parametrize(
    ("params", "rule"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"stream": True}, "stream"),
    ],
)
def test_each_rule_of_params(tmp_path: Path, params: dict[str, Any], rule: str) -> None:
    report = check(tmp_path, request("a", **params))
    assert rules_of(report) == [(1, rule)]
    assert rule in RULES


def test_two_models_leave_the_batch_without_one(tmp_path: Path) -> None:
    report = check(tmp_path, request("a"), request("b", model="claude-y"))
    assert report.ok and report.model is None


def test_the_openai_format_rules_still_apply_to_the_other_kinds(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(json.dumps(request("a")).encode() + b"\n")
    report = validate_file(path, source="batch.jsonl", limits=PROVIDER_LIMITS["openai"], dialect="openai")
    assert ("method" in {p.rule for p in report.problems}) and not report.ok
