"""Peak memory and wall time of `batchd.results.merge_results` on large result files.

Not part of the test run (tests/benchmarks is outside pytest's testpaths).
Run from the repository root::

    python -m tests.benchmarks.bench_merge_rss [--size-mb 1024] [--variant large|small|both]

For each variant it writes, in a temporary folder that it removes afterwards:
an upload copy (the input order), a shuffled output file of about --size-mb
MB, a shuffled error file (1 % of requests) and a follow-up round that answers
half of those errors; 0.5 % of requests get no answer at all. Variant `large`
has lines of about 20 KB (≈50,000 lines per GB); variant `small` has
--small-lines lines (default 1,000,000) sharing the same total size.

merge_results then runs in a child process. The child reports its peak RSS
(VmHWM from /proc/self/status, else getrusage ru_maxrss); an idle child that
only imports batchd gives the baseline, and the difference is what the merge
costs. The merged files are checked (line counts and order) before cleanup.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LARGE_LINE_BYTES = 20_000
ERROR_SHARE = 0.01
UNANSWERED_SHARE = 0.005


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for row in status:
                if row.startswith("VmHWM:"):
                    return int(row.split()[1])
    except OSError:
        pass
    # Linux reports ru_maxrss in KiB (macOS in bytes; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass(frozen=True)
class Dataset:
    input_path: Path
    answers: list[Path]
    requests: int
    answer_bytes: int


def _custom_id(i: int) -> str:
    return f"request-{i:08d}"


def _ok_line(i: int, pad: str) -> bytes:
    body = {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": pad}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": len(pad) // 4, "total_tokens": 11 + len(pad) // 4},
    }
    line = {
        "id": f"batch_req_{i}",
        "custom_id": _custom_id(i),
        "response": {"status_code": 200, "request_id": f"req_{i}", "body": body},
        "error": None,
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def _error_line(i: int, code: str) -> bytes:
    line = {"custom_id": _custom_id(i), "error": {"message": "server error", "code": code}}
    return json.dumps(line).encode() + b"\n"


def generate(folder: Path, *, requests: int, line_bytes: int, seed: int = 1) -> Dataset:
    """Write an upload copy and shuffled answer files for `requests` requests."""
    rng = random.Random(seed)
    input_path = folder / "upload.jsonl"
    with input_path.open("wb") as f:
        for i in range(requests):
            req = {"custom_id": _custom_id(i), "method": "POST", "url": "/v1/chat/completions"}
            f.write(
                json.dumps({**req, "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}}).encode()
            )
            f.write(b"\n")

    # Vary the text so lines differ in length, as real answers do.
    alphabet = "abcdefghij klmnopqrstuvwxyz"
    pool = "".join(rng.choice(alphabet) for _ in range(line_bytes * 2))
    overhead = len(_ok_line(0, ""))
    order = list(range(requests))
    rng.shuffle(order)
    fate = [rng.random() for _ in range(requests)]
    output, errors, retry = folder / "r1-output.jsonl", folder / "r1-errors.jsonl", folder / "r2-output.jsonl"
    total = 0
    with output.open("wb") as out, errors.open("wb") as err, retry.open("wb") as again:
        for i in order:
            roll = fate[i]
            if roll < UNANSWERED_SHARE:
                continue
            if roll < UNANSWERED_SHARE + ERROR_SHARE:
                total += err.write(_error_line(i, "server_error"))
                if roll < UNANSWERED_SHARE + ERROR_SHARE / 2:
                    total += again.write(_ok_line(i, "retried"))
                continue
            size = max(1, line_bytes - overhead + rng.randint(-line_bytes // 10, line_bytes // 10))
            start = rng.randrange(0, len(pool) - size)
            total += out.write(_ok_line(i, pool[start : start + size]))
    return Dataset(input_path, [output, errors, retry], requests, total)


def run_child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_merge_rss", "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child_main(argv: list[str]) -> None:
    """Inside the measured child: import batchd, optionally merge, print peak RSS as JSON."""
    import structlog

    import batchd.results
    import batchd.validation

    # Keep the structlog default (stdout) from mixing with the JSON answer.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if argv[0] == "idle":
        print(json.dumps({"peak_rss_kib": peak_rss_kib()}))
        return
    _, input_path, folder, scratch, *answers = argv
    started = time.perf_counter()
    result = batchd.results.merge_results(
        input_path=Path(input_path),
        answers=[Path(a) for a in answers],
        folder=Path(folder),
        unanswered_code="not_returned",
        scratch_dir=Path(scratch),
    )
    wall = time.perf_counter() - started
    doc = {
        "peak_rss_kib": peak_rss_kib(),
        "wall_s": wall,
        "total": result.total,
        "completed": result.completed,
        "failed": result.failed,
        "duplicates": result.duplicates,
        "unknown": result.unknown,
    }
    print(json.dumps(doc))


def verify(folder: Path, dataset: Dataset, merged: dict[str, Any]) -> None:
    """Line counts add up and output.jsonl follows the input order."""
    assert merged["total"] == dataset.requests, merged
    assert merged["completed"] + merged["failed"] == merged["total"], merged
    previous = -1
    count = 0
    with (folder / "output.jsonl").open("rb") as f:
        for line in f:
            # custom_id sits near the start of each generated line; no need to parse 20 KB.
            index = int(line.split(b'"custom_id":"request-', 1)[1][:8])
            assert index > previous, "output.jsonl is out of input order"
            previous = index
            count += 1
    assert count == merged["completed"], (count, merged)
    with (folder / "errors.jsonl").open("rb") as f:
        assert sum(1 for _ in f) == merged["failed"]


def bench(variant: str, *, size_mb: int, small_lines: int, tmp_dir: str | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"batchd-bench-{variant}-", dir=tmp_dir))
    try:
        size = size_mb * 1024 * 1024
        if variant == "large":
            requests, line_bytes = max(1, size // LARGE_LINE_BYTES), LARGE_LINE_BYTES
        else:
            requests, line_bytes = small_lines, max(200, size // small_lines)
        t0 = time.perf_counter()
        dataset = generate(work, requests=requests, line_bytes=line_bytes)
        generated = time.perf_counter() - t0
        folder, scratch = work / "outbox" / "job", work / "scratch"
        folder.mkdir(parents=True)
        idle = run_child(["idle"])
        merged = run_child(["merge", str(dataset.input_path), str(folder), str(scratch), *map(str, dataset.answers)])
        verify(folder, dataset, merged)
        return {
            "variant": variant,
            "requests": requests,
            "answer_mb": round(dataset.answer_bytes / 1e6, 1),
            "generate_s": round(generated, 1),
            "idle_rss_mb": round(idle["peak_rss_kib"] / 1024, 1),
            "merge_peak_rss_mb": round(merged["peak_rss_kib"] / 1024, 1),
            "rss_above_idle_mb": round((merged["peak_rss_kib"] - idle["peak_rss_kib"]) / 1024, 1),
            "wall_s": round(merged["wall_s"], 1),
            "completed": merged["completed"],
            "failed": merged["failed"],
        }
    finally:
        # Only this benchmark's own temporary folder.
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the answer files (default 1024)")
    parser.add_argument("--variant", choices=["large", "small", "both"], default="both")
    parser.add_argument("--small-lines", type=int, default=1_000_000, help="requests in the `small` variant")
    parser.add_argument("--tmp-dir", default=None, help="where to write the temporary files")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    args = parser.parse_args(argv)
    variants = ["large", "small"] if args.variant == "both" else [args.variant]
    for variant in variants:
        row = bench(variant, size_mb=args.size_mb, small_lines=args.small_lines, tmp_dir=args.tmp_dir)
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{row['variant']:>5}: {row['requests']:,} requests, {row['answer_mb']:,} MB of answers; "
                f"merge {row['wall_s']} s, peak RSS {row['merge_peak_rss_mb']} MB "
                f"({row['rss_above_idle_mb']} MB above an idle child at {row['idle_rss_mb']} MB); "
                f"{row['completed']:,} completed, {row['failed']:,} failed",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
