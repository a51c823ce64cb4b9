"""Splitting a big submission into shards, and merging its shuffled results back, beside
one plain `json.loads` pass over the same file (issue 7's figure). Not part of the test command.

    python -m tests.benchmarks.bench_split_merge [--requests 2000000] [--size-mb 1024]

It writes an upload copy of `--requests` lines totalling about `--size-mb` MB, and a
result file answering every request in a shuffled order. Each measured operation runs
in a child process that reports its wall time and peak RSS (VmHWM); an idle child that
only imports batchd is the baseline. Operations: a json.loads pass over the input,
`validation.validate_file` over it (every rule, Together's limits), `shards.split` at the
provider's limit (50,000 requests), a json.loads pass over the results, and
`results.merge_results` over them. The temporary folder is removed.

Each figure is printed beside its goal (issue 14: the merge at 0.5x the json.loads pass
over the results or better, its memory flat, i.e. no higher at the default size than at
`--requests 200000 --size-mb 200`), with the load average before and after: the figures
are wall times, and other work on the machine slows them. The merge's helper process
(from 64 MB) is measured apart: its peak RSS is `merge.helper_peak_mb`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_merge_rss import peak_rss_kib

#: Issue 14's goal: the merge's wall time at most twice a json.loads pass over the results.
MERGE_GOAL = 0.5


def generate(folder: Path, requests: int, size_mb: int, seed: int = 1) -> tuple[Path, Path]:
    line_bytes = max(200, size_mb * 1_000_000 // requests)
    upload, results = folder / "upload.jsonl", folder / "results.jsonl"
    with upload.open("wb") as out:
        for i in range(requests):
            head = {"custom_id": f"req-{i:08d}", "method": "POST", "url": "/v1/chat/completions"}
            text = "x" * max(1, line_bytes - 170)
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            out.write(json.dumps({**head, "body": body}).encode() + b"\n")
    order = list(range(requests))
    random.Random(seed).shuffle(order)
    with results.open("wb") as out:
        for i in order:
            reply = {"choices": [{"message": {"content": "y" * max(1, line_bytes - 260)}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}  # fmt: skip
            line = {"custom_id": f"req-{i:08d}", "response": {"status_code": 200, "body": reply}}
            out.write(json.dumps(line).encode() + b"\n")
    return upload, results


def child(argv: list[str]) -> None:
    """Run one operation and print {"seconds", "peak_kib"} (and the operation's own figures)."""
    op, folder = argv[0], Path(argv[1])
    import batchd.results  # noqa: F401 - the idle baseline includes batchd's imports
    from batchd.models import PROVIDER_LIMITS
    from batchd.results import merge_results
    from batchd.shards import split
    from batchd.validation import validate_file

    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if op.startswith("json:"):
        with (folder / op[5:]).open("rb") as stream:
            extra["lines"] = sum(1 for line in stream if json.loads(line))
    elif op == "validate":
        report = validate_file(folder / "upload.jsonl", source="upload.jsonl", limits=PROVIDER_LIMITS["together"])
        extra["problems"] = report.problem_count
    elif op == "split":
        (folder / "shards").mkdir(exist_ok=True)
        shards = split(folder / "upload.jsonl", folder / "shards", PROVIDER_LIMITS["together"], prefix="r0")
        extra["shards"] = len(shards)
    elif op == "merge":
        (folder / "out").mkdir(exist_ok=True)
        merged = merge_results(
            input_path=folder / "upload.jsonl", answers=[folder / "results.jsonl"], folder=folder / "out",
            unanswered_code="not_returned", scratch_dir=folder,
        )  # fmt: skip
        extra["completed"] = merged.completed
        # The helper process, if the merge started one (Linux: KiB).
        extra["helper_peak_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_kib": peak_rss_kib(), **extra}))


def run(op: str, folder: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_split_merge", "--child", op, str(folder)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2_000_000)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--tmp-dir", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batchd-split-", dir=args.tmp_dir))
    try:
        upload, results = generate(folder, args.requests, args.size_mb)
        load_before = os.getloadavg()
        idle = run("idle", folder)
        ops = ("json:upload.jsonl", "validate", "split", "json:results.jsonl", "merge")
        figures = {op: run(op, folder) for op in ops}
        load_after = os.getloadavg()
        mb = {"upload": upload.stat().st_size / 1e6, "results": results.stat().st_size / 1e6}
        report = {
            "requests": args.requests,
            "upload_mb": round(mb["upload"]),
            "results_mb": round(mb["results"]),
            "idle_rss_mb": round(idle["peak_kib"] / 1024, 1),
        }
        for op, fig in figures.items():
            report[op] = {
                "seconds": round(fig["seconds"], 2),
                "rss_above_idle_mb": round((fig["peak_kib"] - idle["peak_kib"]) / 1024, 1),
                **{k: v for k, v in fig.items() if k not in ("seconds", "peak_kib")},
            }
        report["validate_vs_json_pass"] = round(
            figures["json:upload.jsonl"]["seconds"] / figures["validate"]["seconds"], 2
        )
        report["split_vs_json_pass"] = round(figures["json:upload.jsonl"]["seconds"] / figures["split"]["seconds"], 2)
        report["merge_vs_json_pass"] = round(figures["json:results.jsonl"]["seconds"] / figures["merge"]["seconds"], 2)
        helper_peak = report["merge"]["helper_peak_mb"]
        if helper_peak:
            report["merge"]["helper_rss_above_idle_mb"] = round(helper_peak - report["idle_rss_mb"], 1)
        report["load_average"] = {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        }
        print(json.dumps(report, indent=2))
        merge_ratio = report["merge_vs_json_pass"]
        lines = [
            f"validate_vs_json_pass {report['validate_vs_json_pass']}x (no goal set)",
            f"split_vs_json_pass    {report['split_vs_json_pass']}x (no goal set)",
            f"merge_vs_json_pass    {merge_ratio}x (goal: at least {MERGE_GOAL}x -> "
            f"{'met' if merge_ratio >= MERGE_GOAL else 'MISSED'})",
            f"merge rss_above_idle  {report['merge']['rss_above_idle_mb']} MB, its helper's "
            f"{report['merge'].get('helper_rss_above_idle_mb', '(none)')} MB "
            "(goal: flat, no higher than at a smaller size)",
            f"load average (1, 5, 15 min) before {report['load_average']['before']}, "
            f"after {report['load_average']['after']} on {os.cpu_count()} CPUs",
        ]
        print("\n".join(lines))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
