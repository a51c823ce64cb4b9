"""What the emulator parses as JSON (depth bounded, never a crash); which hosts `batchd emulator` calls loopback."""

from __future__ import annotations

import pytest

from batchd.config.settings import is_loopback
from batchd.emulator.bodies import BadJson, parse_json
from batchd.jsonl import MAX_JSON_DEPTH


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def nested_objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


@pytest.mark.parametrize(
    "document",
    [
        nested(MAX_JSON_DEPTH),
        nested_objects(MAX_JSON_DEPTH),
        b'{"a": [' + b"[1]," * 5000 + b"[2]]}",  # many brackets, shallow
        b'"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["',  # brackets in a string
        b"NaN",  # orjson refuses it, the standard library takes it
        b"1" * 30,  # past 64 bits: the standard library again
    ],
)
def test_documents_within_the_depth_parse(document: bytes) -> None:
    parse_json(document)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (nested(MAX_JSON_DEPTH + 1), "nested deeper than 64 levels"),
        (nested_objects(MAX_JSON_DEPTH + 1), "nested deeper than 64 levels"),
        (b'{"x": ' + nested(MAX_JSON_DEPTH) + b"}", "nested deeper than 64 levels"),
        # Deeper than orjson goes (1024), and than the standard library's recursion limit.
        (nested(5_000), "nested deeper than 64 levels"),
        (nested(200_000), "nested deeper than 64 levels"),
        (b"[" * 200_000, "nested deeper than 64 levels"),  # unfinished too, but the depth shows first
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"{'a': 1}", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"1" * 5_000, "not valid JSON"),  # more digits than int() converts
    ],
)
def test_bad_or_too_deep_documents_raise_bad_json(document: bytes, reason: str) -> None:
    with pytest.raises(BadJson) as info:
        parse_json(document)
    assert str(info.value) == reason
    # A ValueError: code that caught bad JSON before still does.
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
