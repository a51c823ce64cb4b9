"""packs.py: a pack's upload copy, and its answers split back with each file's own ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd import packs
from batchd.packs import parse_request_id, request_id, split_answers, write_pack
from batchd.safe_fs import NotRegularFile


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def chat(custom_id: str, text: str = "hi") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "x": text}}


def test_a_request_id_names_its_file_and_rank_within_every_providers_id_rule() -> None:
    job_id = "0123456789abcdef0123456789abcdef"
    made = request_id(job_id, 49_999)
    assert parse_request_id(made) == (job_id, 49_999)
    # Anthropic's rule, the narrowest: 1-64 of [A-Za-z0-9_-].
    assert len(made) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in made)
    for other in ("a", "a-", "-1", "a-b", "a-１", 7, None, "x-1.5"):
        assert parse_request_id(other) is None, other


def test_the_pack_holds_each_files_requests_in_order_with_pack_ids(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "one.jsonl", [chat("a", "é"), chat("b")])
    two = write_lines(tmp_path / "two.jsonl", [chat("a", "\ud800")])  # a lone surrogate, kept escaped
    copy = write_pack([("j1", one), ("j2", two)], tmp_path / "pack.jsonl", key="custom_id")
    lines = read_lines(copy.path)
    assert [x["custom_id"] for x in lines] == ["j1-0", "j1-1", "j2-0"]
    assert [x["body"]["x"] for x in lines] == ["é", "hi", "\ud800"]
    assert copy.request_count == 3 and copy.size_bytes == copy.path.stat().st_size
    # The user's copies keep their own ids.
    assert [x["custom_id"] for x in read_lines(one)] == ["a", "b"]


def test_a_copy_swapped_for_a_symlink_is_not_followed_and_no_pack_is_left(tmp_path: Path) -> None:
    elsewhere = write_lines(tmp_path / "elsewhere.jsonl", [chat("secret")])
    planted = tmp_path / "one.jsonl"
    planted.symlink_to(elsewhere)
    with pytest.raises(NotRegularFile, match="symlink"):
        write_pack([("j1", planted)], tmp_path / "pack.jsonl", key="custom_id")
    assert not (tmp_path / "pack.jsonl").exists()


def test_gemini_lines_are_packed_by_their_key(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "one.jsonl", [{"key": "k", "request": {"contents": []}}])
    copy = write_pack([("j1", one)], tmp_path / "pack.jsonl", key="key")
    assert read_lines(copy.path) == [{"key": "j1-0", "request": {"contents": []}}]


def test_answers_go_back_to_their_files_with_their_own_ids(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "one.jsonl", [chat("a"), chat("b")])
    two = write_lines(tmp_path / "two.jsonl", [chat("a")])
    answers = write_lines(
        tmp_path / "batch-1.output.jsonl",
        [
            {"id": "r1", "custom_id": "j2-0", "response": {"n": 3}},  # out of order, as providers may
            {"id": "r2", "custom_id": "j1-1", "response": {"n": 2}},
            {"id": "r3", "custom_id": "j1-0", "response": {"n": 1}},
            {"id": "r4", "custom_id": "not-a-pack-id", "response": {}},
        ],
    )
    dest = {"j1": tmp_path / "d1", "j2": tmp_path / "d2"}
    for folder in dest.values():
        folder.mkdir()
    stray = split_answers([(answers, Path("batch-1.output.jsonl"))], {"j1": one, "j2": two}, dest, key="custom_id")
    assert stray == 1
    assert read_lines(dest["j1"] / "batch-1.output.jsonl") == [
        {"id": "r2", "custom_id": "b", "response": {"n": 2}},
        {"id": "r3", "custom_id": "a", "response": {"n": 1}},
    ]
    assert read_lines(dest["j2"] / "batch-1.output.jsonl") == [{"id": "r1", "custom_id": "a", "response": {"n": 3}}]


def test_every_file_gets_every_part_even_empty_and_a_settled_files_lines_are_passed_over(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "one.jsonl", [chat("a")])
    errors = write_lines(tmp_path / "batch-1.errors.jsonl", [{"custom_id": "gone-0", "error": {"code": "x"}}])
    dest = {"j1": tmp_path / "d1"}
    dest["j1"].mkdir()
    # "gone" is a file of the pack that ended before (a crash cut the run short): not stray.
    assert split_answers([(errors, Path("batch-1.errors.jsonl"))], {"j1": one}, dest, key="custom_id") == 0
    assert (dest["j1"] / "batch-1.errors.jsonl").read_bytes() == b""


def test_a_split_of_more_files_than_it_keeps_open_writes_each_whole(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(packs, "OPEN_AT_ONCE", 2)
    copies = {f"j{i}": write_lines(tmp_path / f"c{i}.jsonl", [chat("a"), chat("b")]) for i in range(5)}
    # Interleaved: every file's handle is closed and reopened (appending) along the way.
    lines = [{"custom_id": f"j{i}-{r}", "n": f"{i}.{r}"} for r in range(2) for i in range(5)]
    answers = write_lines(tmp_path / "out.jsonl", lines)
    dest = {job: tmp_path / f"d-{job}" for job in copies}
    for folder in dest.values():
        folder.mkdir()
    split_answers([(answers, Path("out.jsonl"))], copies, dest, key="custom_id")
    for i in range(5):
        assert read_lines(dest[f"j{i}"] / "out.jsonl") == [
            {"custom_id": "a", "n": f"{i}.0"},
            {"custom_id": "b", "n": f"{i}.1"},
        ]
        assert not list(dest[f"j{i}"].glob(".*.tmp"))


def test_a_split_that_fails_leaves_no_part_behind(tmp_path: Path) -> None:
    one = write_lines(tmp_path / "one.jsonl", [chat("a")])
    answers = tmp_path / "out.jsonl"
    answers.write_bytes(b'{"custom_id": "j1-0"}\n{not json\n')
    dest = {"j1": tmp_path / "d1"}
    dest["j1"].mkdir()
    with pytest.raises(ValueError):
        split_answers([(answers, Path("out.jsonl"))], {"j1": one}, dest, key="custom_id")
    assert list(dest["j1"].iterdir()) == []
