"""Splitting within limits and choosing what a follow-up round resubmits (real files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from batchd.models import Limits
from batchd.shards import is_transient, split, write_followups


def request(i: int) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
    line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode() + b"\n"


def upload_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(b"".join(request(i) for i in range(n)))
    return path


def test_a_file_within_limits_is_its_own_shard(tmp_path: Path) -> None:
    src = upload_file(tmp_path, 5)
    (shard,) = split(src, tmp_path, Limits(max_bytes=10**6, max_requests=10), prefix="round-0")
    assert shard.path == src and shard.request_count == 5
    assert shard.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize(("limits", "sizes"), [(Limits(10**6, 4), [4, 4, 2]), (Limits(250, 100), None)])
def test_split_on_line_boundaries_within_both_limits(tmp_path: Path, limits: Limits, sizes: list[int] | None) -> None:
    src = upload_file(tmp_path, 10)
    (tmp_path / "out").mkdir()
    shards = split(src, tmp_path / "out", limits, prefix="round-0")
    joined = b"".join(s.path.read_bytes() for s in shards)
    assert joined == src.read_bytes()
    assert all(s.request_count <= limits.max_requests and s.size_bytes <= limits.max_bytes for s in shards)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert all(s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest() for s in shards)
    if sizes is not None:
        assert [s.request_count for s in shards] == sizes
    else:
        assert len(shards) >= 3


def test_splitting_again_after_a_crash_gives_the_same_shards(tmp_path: Path) -> None:
    src = upload_file(tmp_path, 9)
    first = split(src, tmp_path, Limits(10**6, 4), prefix="round-0")
    second = split(src, tmp_path, Limits(10**6, 4), prefix="round-0")
    assert [s.sha256 for s in first] == [s.sha256 for s in second]


def anthropic_error(kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": "m"}}


def answer(custom_id: str, **kw: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, **kw}


@pytest.mark.parametrize(
    ("line", "transient"),
    [
        (answer("a", response={"status_code": 503, "body": {}}), True),
        (answer("a", response={"status_code": 429, "body": {}}), True),
        (answer("a", response={"status_code": 408, "body": {}}), True),
        (answer("a", response={"status_code": 400, "body": {}}), False),
        (answer("a", error={"code": "invalid_model", "message": "no such model"}), False),
        (answer("a", error={"code": "rate_limit_exceeded", "message": "slow down"}), True),
        (answer("a", error={"code": 500, "message": "Internal server error"}), False),
        (answer("a", error={"code": "x", "message": "The server is overloaded"}), True),
        # Anthropic's result lines: expired and the passing error types go to a follow-up round.
        (answer("a", result={"type": "expired"}), True),
        (answer("a", result={"type": "canceled"}), False),
        (answer("a", result={"type": "succeeded", "message": {}}), False),
        (answer("a", result={"type": "errored", "error": anthropic_error("overloaded_error")}), True),
        (answer("a", result={"type": "errored", "error": anthropic_error("rate_limit_error")}), True),
        (answer("a", result={"type": "errored", "error": anthropic_error("api_error")}), True),
        (answer("a", result={"type": "errored", "error": anthropic_error("invalid_request_error")}), False),
        (answer("a", result={"type": "errored", "error": {"type": "overloaded_error"}}), True),  # a flat shape
        (answer("a", result={"type": "errored", "error": "overloaded"}), False),
    ],
)
def test_transient_or_permanent(line: dict[str, Any], transient: bool) -> None:
    assert is_transient(line) is transient


def test_followups_keep_input_order_and_only_what_may_succeed(tmp_path: Path) -> None:
    src = upload_file(tmp_path, 6)
    errors = tmp_path / "errors.jsonl"
    lines = [
        answer("r1", response={"status_code": 503, "body": {}}),
        answer("r2", error={"code": "invalid_model", "message": "bad"}),
        answer("r4", response=None, error={"code": "batch_expired", "message": "expired"}),
        answer("r5", response=None, error={"code": "batch_cancelled", "message": "cancelled"}),
    ]
    errors.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    dest = tmp_path / "round-1.jsonl"
    assert write_followups(src, errors, dest) == 2
    assert dest.read_bytes() == request(1) + request(4)


def test_no_errors_no_followups(tmp_path: Path) -> None:
    dest = tmp_path / "round-1.jsonl"
    assert write_followups(upload_file(tmp_path, 3), None, dest) == 0
    assert dest.read_bytes() == b""
