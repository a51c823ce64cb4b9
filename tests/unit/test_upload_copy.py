"""Unit tests of batchd.upload_copy's reading of custom_ids back: the quick read of a line that
begins with its custom_id, and the full parse it falls back to whenever it is not sure."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from batchd import jsonl
from batchd.upload_copy import iter_custom_ids, leading_custom_id

BODY = b'"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}'

# Lines the quick read answers: custom_id first, spelt as json.dumps or orjson write it.
QUICK = [
    b'{"custom_id": "req-1", ' + BODY + b"}",
    b'{"custom_id":"req-1","method":"POST","url":"/v1/chat/completions","body":{}}',
    '{"custom_id": "café 日本", "body": {}}'.encode(),
    b'{"custom_id": "a:b/c d", "body": {"text": "custom_id is a word here"}}',
]

# Lines it must leave to the parser, each with the custom_id a parser reads.
UNSURE = [
    (b'{"custom_id": "a\\"b", ' + BODY + b"}", 'a"b'),  # an escaped quote in the value
    (b'{"custom_id": "caf\\u00e9", "body": {}}', "café"),  # a unicode escape in the value
    (b'{"custom_id": "a\\\\", "body": {}}', "a\\"),  # an escaped backslash ending the value
    (b'{"method": "POST", "custom_id": "x", "body": {}}', "x"),  # not the first key
    (b'{ "custom_id": "x", "body": {}}', "x"),  # spaced otherwise
    (b'{"custom_id" : "x", "body": {}}', "x"),
    (b'{"custom_id": "a", "body": {"custom_id": "b"}}', "a"),  # a nested key of that name
    (b'{"body": {"custom_id": "b"}, "custom_id": "a"}', "a"),
    (b'{"custom_id": "a", "custom_id": "b"}', "b"),  # a duplicate key: a parser takes the last
    (b'{"custom_id": "a", "custom\\u005fid": "b"}', "b"),  # the duplicate spelt with an escape
    (b'{"custom\\u005fid": "a", "body": {}}', "a"),  # the first key spelt with an escape
    (b'{"custom_id": "a", "body": {"content": "two\\nlines"}}', "a"),  # any backslash after the key
    (b'{"custom_id": "a", "body": {"content": "say \\"custom_id\\""}}', "a"),
]


@pytest.mark.parametrize("line", QUICK)
def test_quick_read_agrees_with_a_parser(line: bytes) -> None:
    assert leading_custom_id(line) == orjson.loads(line)["custom_id"]
    assert leading_custom_id(line + b"\n") == orjson.loads(line)["custom_id"]


@pytest.mark.parametrize(("line", "custom_id"), UNSURE)
def test_quick_read_is_unsure_and_the_parse_decides(tmp_path: Path, line: bytes, custom_id: str) -> None:
    assert orjson.loads(line)["custom_id"] == custom_id
    assert leading_custom_id(line) is None
    path = tmp_path / "upload.jsonl"
    path.write_bytes(line + b"\n")
    assert list(iter_custom_ids(path)) == [custom_id]


def test_quick_read_of_lines_that_are_not_what_it_expects() -> None:
    assert leading_custom_id(b'{"custom_id": 5}') is None  # not a string: the parser raises
    assert leading_custom_id(b'{"custom_id": "no end') is None
    assert leading_custom_id(b'{"custom_id": "\xff\xfe", "body": {}}') is None  # not UTF-8
    assert leading_custom_id(b"[1, 2]") is None


def test_iter_custom_ids_mixes_quick_reads_and_parses_in_order(tmp_path: Path) -> None:
    lines = [*QUICK, *(line for line, _ in UNSURE)]
    path = tmp_path / "upload.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    assert list(iter_custom_ids(path)) == [orjson.loads(line)["custom_id"] for line in lines]


def test_iter_custom_ids_does_not_parse_lines_that_begin_with_their_custom_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parse(data: bytes | str) -> object:
        raise AssertionError("parsed")

    monkeypatch.setattr(jsonl, "loads", no_parse)
    path = tmp_path / "upload.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in QUICK))
    assert list(iter_custom_ids(path)) == [orjson.loads(line)["custom_id"] for line in QUICK]


def test_iter_custom_ids_refuses_a_line_without_a_string_custom_id(tmp_path: Path) -> None:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n{"custom_id": 5}\n')
    with pytest.raises(ValueError, match="line 2 has no string custom_id"):
        list(iter_custom_ids(path))
