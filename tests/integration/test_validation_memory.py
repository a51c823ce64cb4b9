"""Memory while validating stays within about the per-request limit, whatever the line or the file.

Each file is validated in a child process that reports how far its peak RSS (VmHWM) rose above
its RSS just before: the per-batch cap that came before held a line up to 100 MB, twice over
while reading it (about 190 MB on these files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Three times the per-request limit (models.MAX_REQUEST_BYTES, 32 MB): generous, and far below
#: what holding a line up to the per-batch limit costs.
BOUND_KIB = 3 * 32_000_000 // 1024

PROBE = """
import json, sys
from pathlib import Path
from batchd.models import PROVIDER_LIMITS
from batchd.validation import validate_file

def kib(key):
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(row.split()[1]) for row in status if row.startswith(key))

before = kib("VmRSS:")
report = validate_file(Path(sys.argv[1]), source="big.jsonl", limits=PROVIDER_LIMITS["local"])
grown = kib("VmHWM:") - before
print(json.dumps({"grown_kib": grown, "requests": report.request_count,
                  "problems": [[p.line, p.rule] for p in report.problems]}))
"""

GOOD = json.dumps(
    {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
).encode() + b"\n"  # fmt: skip


def validate_in_child(path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_multi_gb_sparse_file_with_no_line_end(tmp_path: Path) -> None:
    path = tmp_path / "zeros.jsonl"
    subprocess.run(["truncate", "-s", "2G", str(path)], check=True)  # a hole: no disk used
    result = validate_in_child(path)
    assert result["problems"] == [[1, "too_large"]] and result["requests"] == 1
    assert result["grown_kib"] < BOUND_KIB, result


def test_one_huge_line_then_a_good_one(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as out:
        out.write(b'{"custom_id": "huge", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", ')
        out.write(b'"messages": [{"role": "user", "content": "')
        out.seek(300_000_000)  # the string's middle is a hole
        out.write(b'"}]}}\n' + GOOD)
    result = validate_in_child(path)
    assert result["problems"] == [[1, "too_large"]] and result["requests"] == 2
    assert result["grown_kib"] < BOUND_KIB, result
