"""A merge, alone and shared with its helper process, against a plain in-memory model of DESIGN §4.

Small partitions, scan items, buckets and spill chunks make files of a few hundred lines go
through every path of the join on disk; the helper is a real second process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from batchd import merge_helper, merge_plan, spill
from batchd.merge_counts import Joined, Scanned, Usage
from batchd.merge_helper import Helper, HelperFailed
from batchd.merge_plan import plan_merge
from batchd.merge_work import Worker, read_exactly, starts
from batchd.results import UNANSWERED_CODES, MergeResult, merge_results


@dataclass
class Expected:
    output: bytes
    errors: bytes | None
    result: MergeResult


def lines_of(path: Path) -> Iterator[bytes]:
    """The lines of a file as the merge sees them: split on "\\n", the last one maybe without it."""
    pieces = path.read_bytes().split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    yield from pieces


def model(ids: list[str], answers: list[Path], code: str) -> Expected:
    """What DESIGN §4 says a merge writes, computed in memory the plain way."""
    found: list[tuple[str, bool, bytes, dict[str, Any] | None]] = []
    unreadable = 0
    for path in answers:
        for piece in lines_of(path):
            content = piece[:-1] if piece.endswith(b"\r") else piece
            try:
                answer = json.loads(piece)
            except ValueError:
                if piece.strip():
                    unreadable += 1
                continue
            custom_id = answer.get("custom_id") if isinstance(answer, dict) else None
            if not isinstance(custom_id, str):
                unreadable += 1
                continue
            response = answer.get("response")
            status = response.get("status_code") if isinstance(response, dict) else None
            ok = isinstance(status, int) and not isinstance(status, bool) and 200 <= status < 300
            body = response.get("body") if isinstance(response, dict) else None
            usage = body.get("usage") if isinstance(body, dict) else None
            found.append((custom_id, ok, content, usage if isinstance(usage, dict) else None))
    asked = set(ids)
    output, errors, usages = [], [], []
    duplicates = unanswered = 0
    for custom_id in ids:
        mine = [a for a in found if a[0] == custom_id]
        successes = [a for a in mine if a[1]]
        duplicates += max(0, len(successes) - 1)
        if successes:
            output.append(successes[0][2])
            if successes[0][3] is not None:
                usages.append(successes[0][3])
        elif mine:
            errors.append(mine[-1][2])
        else:
            line = {
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": UNANSWERED_CODES[code]},
            }
            errors.append(json.dumps(line, ensure_ascii=False).encode())
            unanswered += 1
    sums: dict[str, int] = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0) + value
    result = MergeResult(
        total=len(ids),
        completed=len(output),
        failed=len(errors),
        usage=sums,
        duplicates=duplicates,
        unknown=unreadable + sum(1 for a in found if a[0] not in asked),
        unanswered=unanswered,
    )
    return Expected(
        b"".join(line + b"\n" for line in output), b"".join(line + b"\n" for line in errors) or None, result
    )


def scenario(folder: Path, seed: int, requests: int = 300) -> tuple[list[str], Path, list[Path]]:
    """An upload copy and answer files over two rounds, with every oddity the merge must handle."""
    rng = random.Random(seed)
    ids = [f"r{i}" if i % 17 else f'q"{i}é' for i in range(requests)]
    upload = folder / "upload.jsonl"
    with upload.open("wb") as out:
        for i, custom_id in enumerate(ids):
            request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {"n": i}}
            if i % 5 == 0:
                request = {"method": "POST", **request}  # custom_id not first: parsed
            out.write(json.dumps(request, separators=(",", ":") if i % 2 else (", ", ": ")).encode() + b"\n")

    def ok(custom_id: str, text: str) -> bytes:
        usage: dict[str, Any] = {"prompt_tokens": rng.randrange(100), "total_tokens": rng.randrange(100)}
        if rng.random() < 0.2:
            usage["cached_tokens"] = 0
        if rng.random() < 0.1:
            usage["rare_key"] = rng.randrange(10)
        if rng.random() < 0.1:
            usage["details"] = {"x": 1}
        body = {"choices": [{"message": {"content": text}}], "usage": usage}
        return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body}}).encode()

    def status(custom_id: str, code: int) -> bytes:
        return json.dumps({"custom_id": custom_id, "response": {"status_code": code, "body": {}}}).encode()

    def error(custom_id: str) -> bytes:
        return json.dumps({"custom_id": custom_id, "error": {"code": "server_error", "message": "x"}}).encode()

    round1, errors1, round2 = [], [], []
    for custom_id in ids:
        fate = rng.random()
        if fate < 0.6:
            round1.append(ok(custom_id, "a" * rng.randrange(1, 400)))
        elif fate < 0.7:
            round1.append(status(custom_id, rng.choice([400, 429, 500, 201])))
        elif fate < 0.8:
            errors1.append(error(custom_id))
            if fate < 0.75:
                round2.append(ok(custom_id, "retried"))
        elif fate < 0.85:
            round1.append(ok(custom_id, "first"))
            round2.append(ok(custom_id, "duplicate"))  # dropped, its usage too
        elif fate < 0.9:
            errors1.append(error(custom_id))
            round2.append(status(custom_id, 503))  # the later error wins
        # else: never answered
    round1 += [ok("unknown-1", "x"), b"not json", b'{"no": "custom_id"}', b"  ", status("unknown-2", 500)]
    round1.append(json.dumps({"custom_id": "\ud800", "response": {"status_code": 200}}).encode())
    round2 += [ok(ids[0], "late success after an earlier one")] if round1 else []
    for lines in (round1, errors1, round2):
        rng.shuffle(lines)
    files = [folder / "r1-output.jsonl", folder / "r1-errors.jsonl", folder / "r2-output.jsonl", folder / "empty.jsonl"]
    files[0].write_bytes(b"".join(line + b"\r\n" for line in round1))
    files[1].write_bytes(b"\n".join(errors1))  # no end on the last line
    files[2].write_bytes(b"\n\n".join(round2) + b"\n")  # blank lines between
    files[3].write_bytes(b"")
    return ids, upload, files


def merge(folder: Path, upload: Path, answers: list[Path], code: str = "not_returned") -> MergeResult:
    out = folder / "outbox"
    out.mkdir(exist_ok=True)
    return merge_results(
        input_path=upload, answers=answers, folder=out, unanswered_code=code, scratch_dir=folder / "work"
    )


def small(monkeypatch: pytest.MonkeyPatch, *, helper: bool) -> None:
    """Partitions, scan items, buckets and spill chunks of a few rows, so small files take every path."""
    monkeypatch.setattr(merge_plan, "PART_BYTES", 2000)
    monkeypatch.setattr(merge_plan, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(merge_plan, "BUCKET", 16)
    monkeypatch.setattr(spill, "HELD_ROWS", 10)
    monkeypatch.setattr(merge_helper, "helper_wanted", lambda size: helper)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("mode", ["default", "small", "small-with-helper"])
def test_merge_writes_what_the_model_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, seed: int
) -> None:
    if mode != "default":
        small(monkeypatch, helper=mode == "small-with-helper")
    ids, upload, answers = scenario(tmp_path, seed)
    expected = model(ids, answers, "batch_expired")

    result = merge(tmp_path, upload, answers, code="batch_expired")

    assert result == expected.result
    assert (tmp_path / "outbox" / "output.jsonl").read_bytes() == expected.output
    errors = tmp_path / "outbox" / "errors.jsonl"
    assert (errors.read_bytes() if errors.exists() else None) == expected.errors
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["errors.jsonl", "output.jsonl"]
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("helper", [False, True])
def test_every_request_unanswered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: bool) -> None:
    small(monkeypatch, helper=helper)
    ids, upload, _ = scenario(tmp_path, 3, requests=50)
    result = merge(tmp_path, upload, [], code="batch_failed")
    assert (tmp_path / "outbox" / "output.jsonl").read_bytes() == b""
    assert (tmp_path / "outbox" / "errors.jsonl").read_bytes() == model(ids, [], "batch_failed").errors
    assert (result.total, result.completed, result.failed, result.unanswered) == (50, 0, 50, 50)


def test_an_empty_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small(monkeypatch, helper=True)
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(b"")
    answers = tmp_path / "a.jsonl"
    answers.write_bytes(b'{"custom_id": "x", "response": {"status_code": 200}}\n')
    result = merge(tmp_path, upload, [answers])
    assert result == MergeResult(total=0, completed=0, failed=0, usage={}, duplicates=0, unknown=1, unanswered=0)
    assert (tmp_path / "outbox" / "output.jsonl").read_bytes() == b""
    assert not (tmp_path / "outbox" / "errors.jsonl").exists()


@pytest.mark.parametrize("helper", [False, True])
def test_dropped_answers_are_named_in_order_up_to_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: bool
) -> None:
    small(monkeypatch, helper=helper)
    ids = [f"id-{i:03d}" for i in range(150)]
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(b"".join(json.dumps({"custom_id": c}).encode() + b"\n" for c in ids))
    success = {"response": {"status_code": 200, "body": {}}}
    lines = [json.dumps({"custom_id": c, **success}).encode() for c in reversed(ids)]
    lines += [json.dumps({"custom_id": c, **success}).encode() for c in reversed(ids[:120])]  # 120 duplicates
    lines += [json.dumps({"custom_id": f"zz-{i}", **success}).encode() for i in range(150)]  # 150 unknown
    lines[10:10] = [b"broken", b'{"custom_id": 7}']  # unreadable: lines 11 and 12
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b"\n".join(lines) + b"\n")

    with capture_logs() as logs:
        result = merge(tmp_path, upload, [answers])

    assert (result.duplicates, result.unknown, result.completed) == (120, 152, 150)
    duplicate = [(e["custom_id"], e["dropped"]) for e in logs if e["event"] == "results.duplicate_answer"]
    assert duplicate == [(c, 1) for c in ids[:100]]
    unknown = [e["custom_id"] for e in logs if e["event"] == "results.unknown_answer"]
    assert unknown == [f"zz-{i}" for i in range(100)]
    unreadable = [(e["file"], e["line"]) for e in logs if e["event"] == "results.unreadable_answer"]
    assert unreadable == [(str(answers), 11), (str(answers), 12)]


@pytest.mark.parametrize("helper", [False, True])
def test_an_input_line_without_a_custom_id_fails_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: bool
) -> None:
    small(monkeypatch, helper=helper)
    _, upload, answers = scenario(tmp_path, 4, requests=40)
    with upload.open("ab") as out:
        out.write(b'{"custom_id": 5}\n')
    with pytest.raises(ValueError, match="line 41 has no string custom_id"):
        merge(tmp_path, upload, answers)
    assert list((tmp_path / "outbox").iterdir()) == []
    assert list((tmp_path / "work").iterdir()) == []


def test_a_helper_that_fails_says_why(tmp_path: Path) -> None:
    _, upload, answers = scenario(tmp_path, 5, requests=20)
    work = tmp_path / "work"
    work.mkdir()
    plan = plan_merge(work, upload, answers, "not_returned", cap=100)
    answers[0].unlink()  # its scan items cannot be read
    helper = Helper(plan, [])
    try:
        with pytest.raises(HelperFailed, match=r"FileNotFoundError: .*r1-output\.jsonl"):
            helper.answer()
    finally:
        helper.close(done=False)


def test_a_helper_that_dies_is_reported(tmp_path: Path) -> None:
    _, upload, answers = scenario(tmp_path, 6, requests=20)
    work = tmp_path / "work"
    work.mkdir()
    helper = Helper(plan_merge(work, upload, answers, "not_returned", cap=100), [])
    try:
        helper._process.kill()
        with pytest.raises(HelperFailed, match="helper process ended"):
            helper.answer()
    finally:
        helper.close(done=False)


@pytest.mark.parametrize("when", ["start", "scan", "join", "write"])
def test_a_merge_whose_helper_fails_is_done_again_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    small(monkeypatch, helper=True)
    ids, upload, answers = scenario(tmp_path, 8)
    expected = model(ids, answers, "not_returned")
    real_init, real_send = Helper.__init__, Helper.send

    def no_start(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no more processes")

    def dies_at_once(self: Helper, *args: Any) -> None:
        real_init(self, *args)
        self._process.kill()

    def dies_when_told(self: Helper, *message: Any) -> None:
        if message[0] == when:
            self._process.kill()
        real_send(self, *message)

    if when == "start":
        monkeypatch.setattr(subprocess, "Popen", no_start)
    elif when == "scan":
        monkeypatch.setattr(Helper, "__init__", dies_at_once)
    else:
        monkeypatch.setattr(Helper, "send", dies_when_told)

    with capture_logs() as logs:
        result = merge(tmp_path, upload, answers)

    assert result == expected.result
    assert (tmp_path / "outbox" / "output.jsonl").read_bytes() == expected.output
    assert [e["event"] for e in logs].count("results.helper_failed") == 1
    # The dropped answers are named once, after the attempt that wrote the files.
    unknown = [e["custom_id"] for e in logs if e["event"] == "results.unknown_answer"]
    assert len(unknown) == len(set(unknown))
    assert list((tmp_path / "work").iterdir()) == []


def test_usage_of_a_dropped_duplicate_is_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small(monkeypatch, helper=True)
    upload = tmp_path / "upload.jsonl"
    upload.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n')

    def ok(custom_id: str, usage: dict[str, Any]) -> bytes:
        return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": {"usage": usage}}}).encode()

    first = tmp_path / "1.jsonl"
    first.write_bytes(ok("a", {"prompt_tokens": 1}) + b"\n" + ok("b", {"prompt_tokens": 2, "cached": 0}) + b"\n")
    second = tmp_path / "2.jsonl"
    second.write_bytes(ok("a", {"prompt_tokens": 100, "only_here": 5}) + b"\n" + ok("zz", {"other": 1}) + b"\n")
    result = merge(tmp_path, upload, [first, second])
    assert result.usage == {"prompt_tokens": 3, "cached": 0}
    assert (result.duplicates, result.unknown) == (1, 1)


def test_usage_sums_round_trip_between_processes() -> None:
    usage = Usage()
    usage.add([{"a": 1, "b": True}])
    assert Usage(dict(usage.sums)).totals() == {"a": 1}


def test_a_helper_can_do_every_phase_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper's spills and writes are the merge's: here it claims every item of every phase."""
    small(monkeypatch, helper=True)
    ids, upload, answers = scenario(tmp_path, 7)
    expected = model(ids, answers, "not_returned")
    work = tmp_path / "work"
    work.mkdir()
    plan = plan_merge(work, upload, answers, "not_returned", cap=100)
    output, errors = tmp_path / "output", tmp_path / "errors"
    fds = [os.open(path, os.O_RDWR | os.O_CREAT) for path in (output, errors)]
    worker = Worker(plan, "main", read_exactly)
    helper = Helper(plan, fds)
    try:
        scanned = Scanned.from_tuple(helper.answer())
        mine = worker.scan()
        assert mine.total is None and not mine.usage.sums  # nothing left to claim
        scanned.merge(mine, plan.cap)
        assert scanned.total == len(ids)
        helper.send("join", scanned.total)
        joined = Joined.from_tuple(helper.answer())
        joined.merge(worker.join(scanned.total), plan.cap)
        sections = (fds[0], starts(joined.output_bytes)), (fds[1], starts(joined.error_bytes))
        helper.send("write", scanned.total, *sections)
        assert helper.answer() is None
        worker.write(scanned.total, *sections)
    finally:
        helper.close(done=True)
        worker.close()
        for fd in fds:
            os.close(fd)
    assert output.read_bytes() == expected.output
    assert errors.read_bytes() == expected.errors
    scanned.usage.merge(joined.dropped_usage)
    assert scanned.usage.totals() == expected.result.usage
    assert (joined.completed, joined.failed, joined.duplicates) == (
        expected.result.completed,
        expected.result.failed,
        expected.result.duplicates,
    )


def test_a_helper_ends_itself_when_its_merge_is_killed(tmp_path: Path) -> None:
    _, upload, answers = scenario(tmp_path, 9, requests=20)
    work = tmp_path / "work"
    work.mkdir()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from batchd.merge_helper import Helper; "
            "from batchd.merge_plan import plan_merge; "
            "plan = plan_merge(Path(sys.argv[1]), Path(sys.argv[2]), [Path(sys.argv[3])], 'not_returned', cap=1); "
            "helper = Helper(plan, []); print(helper._process.pid, flush=True); time.sleep(60)",
            str(work),
            str(upload),
            str(answers[0]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    with parent.stdout:
        pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and helper_alive(pid):
        time.sleep(0.1)
    assert not helper_alive(pid)


def helper_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended; its new parent may not reap it at once
