"""Unit tests of batchd.results over real files in tmp_path."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from batchd import results
from batchd.outbox import outbox_candidates, outbox_name, write_job_json
from batchd.results import UNANSWERED_CODES, MergeResult, merge_results


def write_input(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "upload.jsonl"
    with path.open("wb") as f:
        for custom_id in ids:
            req = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {}}
            f.write(json.dumps(req).encode() + b"\n")
    return path


def ok_line(custom_id: str, text: str = "hi", usage: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"choices": [{"message": {"content": text}}]}
    if usage is not None:
        body["usage"] = usage
    # Unusual spacing on purpose: output must keep the provider's bytes.
    return json.dumps(
        {"custom_id": custom_id, "response": {"status_code": 200, "body": body}},
        indent=None,
        separators=(" ,", " : "),
        ensure_ascii=False,
    ).encode()


def status_line(custom_id: str, status: int) -> bytes:
    return json.dumps({"custom_id": custom_id, "response": {"status_code": status, "body": {"error": "x"}}}).encode()


def error_line(custom_id: str, code: str = "invalid_model") -> bytes:
    return json.dumps({"custom_id": custom_id, "error": {"message": "bad", "code": code}}).encode()


def write_answers(tmp_path: Path, name: str, lines: list[bytes], end: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def merge(tmp_path: Path, input_path: Path, answers: list[Path], code: str = "not_returned") -> MergeResult:
    folder = tmp_path / "outbox" / "job"
    folder.mkdir(parents=True, exist_ok=True)
    return merge_results(
        input_path=input_path,
        answers=answers,
        folder=folder,
        unanswered_code=code,
        scratch_dir=tmp_path / "scratch",
    )


def out_lines(tmp_path: Path, name: str) -> list[bytes]:
    return (tmp_path / "outbox" / "job" / name).read_bytes().splitlines()


def test_order_restored_and_bytes_verbatim(tmp_path: Path) -> None:
    ids = [f"req-{i}" for i in range(200)]
    lines = {i: ok_line(i, text=f"answer é {i}") for i in ids}
    shuffled = list(ids)
    random.Random(7).shuffle(shuffled)
    answers = write_answers(tmp_path, "out.jsonl", [lines[i] for i in shuffled])

    result = merge(tmp_path, write_input(tmp_path, ids), [answers])

    assert out_lines(tmp_path, "output.jsonl") == [lines[i] for i in ids]
    assert not (tmp_path / "outbox" / "job" / "errors.jsonl").exists()
    assert result == MergeResult(total=200, completed=200, failed=0, usage={}, duplicates=0, unknown=0, unanswered=0)


def test_success_vs_non_2xx_vs_error_lines(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d", "e"]
    output = write_answers(tmp_path, "out.jsonl", [ok_line("a"), status_line("b", 429), status_line("e", 201)])
    errors = write_answers(tmp_path, "err.jsonl", [error_line("c"), status_line("d", 500)])

    result = merge(tmp_path, write_input(tmp_path, ids), [output, errors])

    assert out_lines(tmp_path, "output.jsonl") == [ok_line("a"), status_line("e", 201)]
    assert out_lines(tmp_path, "errors.jsonl") == [status_line("b", 429), error_line("c"), status_line("d", 500)]
    assert (result.total, result.completed, result.failed, result.unanswered) == (5, 2, 3, 0)


@pytest.mark.parametrize("code", sorted(UNANSWERED_CODES))
def test_unanswered_lines_have_the_exact_shape(tmp_path: Path, code: str) -> None:
    output = write_answers(tmp_path, "out.jsonl", [ok_line("b")])

    result = merge(tmp_path, write_input(tmp_path, ["a", "b", 'c"é']), [output], code=code)

    errors = out_lines(tmp_path, "errors.jsonl")
    assert len(errors) == 2
    for line, custom_id in zip(errors, ["a", 'c"é'], strict=True):
        doc = json.loads(line)
        assert list(doc) == ["custom_id", "response", "error"]
        assert doc["custom_id"] == custom_id and doc["response"] is None
        assert list(doc["error"]) == ["code", "message"] and doc["error"]["code"] == code
        assert doc["error"]["message"]
    message = json.dumps(UNANSWERED_CODES[code])
    assert (
        errors[0]
        == f'{{"custom_id": "a", "response": null, "error": {{"code": "{code}", "message": {message}}}}}'.encode()
    )
    assert (result.completed, result.failed, result.unanswered) == (1, 2, 2)


def test_unknown_unanswered_code_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unanswered_code"):
        merge(tmp_path, write_input(tmp_path, ["a"]), [], code="timeout")


def test_follow_up_round_replaces_an_earlier_error(tmp_path: Path) -> None:
    round1_out = write_answers(tmp_path, "r1-out.jsonl", [ok_line("a")])
    round1_err = write_answers(tmp_path, "r1-err.jsonl", [error_line("b", "server_error"), error_line("c", "x1")])
    round2_out = write_answers(tmp_path, "r2-out.jsonl", [ok_line("b", text="second try")])
    round2_err = write_answers(tmp_path, "r2-err.jsonl", [error_line("c", "x2")])

    result = merge(tmp_path, write_input(tmp_path, ["a", "b", "c"]), [round1_out, round1_err, round2_out, round2_err])

    assert out_lines(tmp_path, "output.jsonl") == [ok_line("a"), ok_line("b", text="second try")]
    assert out_lines(tmp_path, "errors.jsonl") == [error_line("c", "x2")]  # between errors, the later one
    assert (result.completed, result.failed, result.duplicates) == (2, 1, 0)


def test_a_success_beats_a_later_error(tmp_path: Path) -> None:
    first = write_answers(tmp_path, "1.jsonl", [ok_line("a")])
    later = write_answers(tmp_path, "2.jsonl", [error_line("a")])
    result = merge(tmp_path, write_input(tmp_path, ["a"]), [first, later])
    assert out_lines(tmp_path, "output.jsonl") == [ok_line("a")]
    assert (result.completed, result.failed, result.duplicates) == (1, 0, 0)


def test_duplicate_success_dropped_and_logged(tmp_path: Path) -> None:
    first = write_answers(tmp_path, "1.jsonl", [ok_line("a", text="first"), ok_line("b")])
    again = write_answers(tmp_path, "2.jsonl", [ok_line("a", text="second")])

    with capture_logs() as logs:
        result = merge(tmp_path, write_input(tmp_path, ["a", "b"]), [first, again])

    assert out_lines(tmp_path, "output.jsonl") == [ok_line("a", text="first"), ok_line("b")]
    assert result.duplicates == 1 and result.total == 2 and result.completed == 2
    events = [e for e in logs if e["event"] == "results.duplicate_answer"]
    assert events == [{"event": "results.duplicate_answer", "custom_id": "a", "dropped": 1, "log_level": "warning"}]


def test_unknown_and_unreadable_answers_dropped(tmp_path: Path) -> None:
    answers = write_answers(tmp_path, "out.jsonl", [ok_line("zzz"), ok_line("a"), b"not json", b'{"no": "id"}'])

    with capture_logs() as logs:
        result = merge(tmp_path, write_input(tmp_path, ["a"]), [answers])

    assert out_lines(tmp_path, "output.jsonl") == [ok_line("a")]
    assert result.unknown == 3
    assert [e["custom_id"] for e in logs if e["event"] == "results.unknown_answer"] == ["zzz"]
    assert [e["line"] for e in logs if e["event"] == "results.unreadable_answer"] == [3, 4]


def test_output_lines_get_a_line_end_and_crlf_is_dropped(tmp_path: Path) -> None:
    crlf = write_answers(tmp_path, "1.jsonl", [ok_line("a")], end=b"\r\n")
    last = tmp_path / "2.jsonl"
    last.write_bytes(b"\n" + ok_line("b"))  # blank line, then no final line end

    merge(tmp_path, write_input(tmp_path, ["a", "b"]), [crlf, last])

    assert (tmp_path / "outbox" / "job" / "output.jsonl").read_bytes() == ok_line("a") + b"\n" + ok_line("b") + b"\n"


def test_usage_sums_successes_only(tmp_path: Path) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "details": {"x": 1}, "flag": True}
    answers = write_answers(
        tmp_path,
        "out.jsonl",
        [
            ok_line("a", usage=usage),
            ok_line("b", usage={"prompt_tokens": 10, "total_tokens": 10}),
            ok_line("b", usage={"prompt_tokens": 1000}),  # a duplicate: not counted
            status_line("c", 400),
        ],
    )
    result = merge(tmp_path, write_input(tmp_path, ["a", "b", "c"]), [answers])
    assert result.usage == {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17}


def anthropic_line(custom_id: str, result: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": custom_id, "result": result}).encode()


def test_anthropic_results_split_into_output_and_errors_in_input_order_with_usage(tmp_path: Path) -> None:
    usage = {"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11}
    message = {"type": "message", "content": [{"type": "text", "text": "x"}], "usage": usage}
    lines = {
        "c": anthropic_line("c", {"type": "succeeded", "message": message}),
        "a": anthropic_line("a", {"type": "errored", "error": {"type": "error", "error": {"type": "api_error"}}}),
        "d": anthropic_line("d", {"type": "expired"}),
        "b": anthropic_line("b", {"type": "succeeded", "message": message}),
        "e": anthropic_line("e", {"type": "canceled"}),
    }
    # The results come in no particular order, in one file.
    answers = write_answers(tmp_path, "results.jsonl", list(lines.values()))
    result = merge(tmp_path, write_input(tmp_path, ["a", "b", "c", "d", "e", "f"]), [answers])
    assert (result.completed, result.failed, result.total) == (2, 4, 6)
    assert out_lines(tmp_path, "output.jsonl") == [lines["b"], lines["c"]]  # verbatim, in input order
    errors = out_lines(tmp_path, "errors.jsonl")
    assert [errors[0], errors[2]] == [lines["a"], lines["e"]]
    # Expired unrun, and never returned: no answers, synthesized as for any dialect.
    assert [json.loads(errors[i])["custom_id"] for i in (1, 3)] == ["d", "f"]
    assert all(json.loads(errors[i])["response"] is None for i in (1, 3)) and result.unanswered == 2
    assert result.usage == {key: 2 * value for key, value in usage.items()}


def test_empty_output_file_still_written(tmp_path: Path) -> None:
    result = merge(tmp_path, write_input(tmp_path, ["a"]), [], code="batch_failed")
    folder = tmp_path / "outbox" / "job"
    assert (folder / "output.jsonl").read_bytes() == b""
    assert json.loads((folder / "errors.jsonl").read_bytes())["error"]["code"] == "batch_failed"
    assert (result.completed, result.failed) == (0, 1)


def test_no_temp_or_scratch_files_left(tmp_path: Path) -> None:
    answers = write_answers(tmp_path, "out.jsonl", [ok_line("a"), error_line("b")])
    merge(tmp_path, write_input(tmp_path, ["a", "b"]), [answers])
    assert sorted(p.name for p in (tmp_path / "outbox" / "job").iterdir()) == ["errors.jsonl", "output.jsonl"]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_failed_merge_leaves_no_final_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = write_answers(tmp_path, "out.jsonl", [ok_line("a"), error_line("b"), ok_line("c")])
    real_pread = results._pread
    calls: list[int] = []

    def failing_pread(fd: int, offset: int, length: int) -> bytes:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real_pread(fd, offset, length)

    monkeypatch.setattr(results, "_pread", failing_pread)
    with pytest.raises(OSError, match="disk gone"):
        merge(tmp_path, write_input(tmp_path, ["a", "b", "c"]), [answers])
    assert list((tmp_path / "outbox" / "job").iterdir()) == []
    assert list((tmp_path / "scratch").iterdir()) == []


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("batch.jsonl", "batch"),
        ("my batch é.jsonl", "my batch é"),
        ("a.b.json", "a.b"),
        ("tab\there\x7f\x1b.jsonl", "tab_here__"),
        ("line\nbreak\u0085.jsonl", "line_break_"),
        ("noext", "noext"),
        ("..jsonl", "_"),
    ],
)
def test_outbox_name(source: str, name: str) -> None:
    assert outbox_name(source) == name


def test_outbox_candidates_in_order_of_preference(tmp_path: Path) -> None:
    job = "0123456789abcdef"
    assert outbox_candidates(tmp_path, "batch", job) == [
        tmp_path / "batch",
        tmp_path / "batch.01234567",
        tmp_path / "batch.0123456789abcdef",
    ]


def test_write_job_json(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    doc = {"id": "j1", "name": "café", "request_counts": {"total": 1}}
    path = write_job_json(folder, doc)
    assert path == folder / "job.json"
    text = path.read_text(encoding="utf-8")
    assert "café" in text and text.startswith("{\n  ")
    assert json.loads(text) == doc
    assert [p.name for p in folder.iterdir()] == ["job.json"]


def test_job_json_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    write_job_json(folder, {"status": "old"})

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        write_job_json(folder, {"status": "new"})
    assert json.loads((folder / "job.json").read_text()) == {"status": "old"}
    assert [p.name for p in folder.iterdir()] == ["job.json"]


def test_job_json_written_last(tmp_path: Path) -> None:
    answers = write_answers(tmp_path, "out.jsonl", [ok_line("a")])
    result = merge(tmp_path, write_input(tmp_path, ["a", "b"]), [answers])
    folder = tmp_path / "outbox" / "job"
    job = write_job_json(folder, {"request_counts": {"total": result.total}})
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert stamps["job.json"] >= max(stamps["output.jsonl"], stamps["errors.jsonl"])
    assert json.loads(job.read_text())["request_counts"]["total"] == 2


def test_a_merge_without_errors_removes_the_errors_file_of_an_earlier_round(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "errors.jsonl").write_text('{"custom_id": "a"}\n', encoding="utf-8")
    upload = tmp_path / "upload.jsonl"
    upload.write_text(json.dumps({"custom_id": "a"}) + "\n", encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"custom_id": "a", "response": {"status_code": 200, "body": {}}}) + "\n")
    result = merge_results(
        input_path=upload, answers=[answers], folder=folder, unanswered_code="not_returned", scratch_dir=tmp_path
    )
    assert (result.completed, result.failed) == (1, 0)
    assert not (folder / "errors.jsonl").exists()
