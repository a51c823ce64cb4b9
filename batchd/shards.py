"""Cutting a submission into shards within a provider's limits, and choosing what a
follow-up round resubmits. Streaming file work; no network, no database.

Both work on the upload copy (one request per line, `\\n`-terminated, in input
order), so a shard is a contiguous run of its lines and a follow-up file keeps
the input order too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchd import jsonl
from batchd.durable_files import atomic_file
from batchd.jsonl import strip_eol
from batchd.models import Limits

#: HTTP statuses in a result line that say "try again later".
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
#: Words in an error code or type that say the same without an HTTP status.
TRANSIENT_WORDS = (
    "rate_limit",
    "rate limit",
    "ratelimit",
    "too_many_requests",
    "overload",
    "timeout",
    "timed_out",
    "timed out",
    "server_error",
    "internal_error",
    "service_unavailable",
    "unavailable",
    "capacity",
    "try again",
)


@dataclass(frozen=True)
class Shard:
    """One contiguous run of input lines, uploaded as one remote batch."""

    index: int
    path: Path
    sha256: str
    size_bytes: int
    request_count: int


def split(src: Path, dest_dir: Path, limits: Limits, *, prefix: str) -> list[Shard]:
    """Cut `src` on line boundaries into files of at most `limits` each.

    A file that fits is its own single shard (no copy). Otherwise shards are
    written to `dest_dir/<prefix>-NNN.jsonl` atomically; running it again after
    a crash rewrites the same shards. Lines are never split; a single line over
    the byte limit is the validator's business (it rejects the file).
    """
    size = src.stat().st_size
    count = _count_lines(src)
    if size <= limits.max_bytes and count <= limits.max_requests:
        return [Shard(0, src, _sha256(src), size, count)]
    shards: list[Shard] = []
    with src.open("rb") as stream:
        pending: bytes | None = None
        while True:
            index = len(shards)
            path = dest_dir / f"{prefix}-{index:03d}.jsonl"
            digest = hashlib.sha256()
            written = lines = 0
            with atomic_file(path) as out:
                while True:
                    line = pending if pending is not None else stream.readline()
                    pending = None
                    if not line:
                        break
                    if lines and (lines + 1 > limits.max_requests or written + len(line) > limits.max_bytes):
                        pending = line
                        break
                    out.write(line)
                    digest.update(line)
                    written += len(line)
                    lines += 1
            if lines == 0:
                path.unlink()
                break
            shards.append(Shard(index, path, digest.hexdigest(), written, lines))
            if pending is None:
                break
    return shards


def _count_lines(path: Path) -> int:
    with path.open("rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_transient(answer: Mapping[str, Any]) -> bool:
    """Whether an error answer failed for a passing reason (resubmitting may succeed)."""
    result = answer.get("result")
    if isinstance(result, dict):
        # Anthropic's result line: an expired request never ran; an errored one says why in
        # its error's type (overloaded_error, rate_limit_error, api_error are passing).
        kind = result.get("type")
        if kind == "expired":
            return True
        if kind == "errored":
            return _anthropic_error_is_passing(result.get("error"))
        return False
    response = answer.get("response")
    if isinstance(response, dict):
        status = response.get("status_code")
        if isinstance(status, int) and not isinstance(status, bool):
            return status in TRANSIENT_STATUSES or 500 <= status <= 599
    error = answer.get("error")
    if isinstance(error, dict):
        if error.get("status") in GEMINI_PASSING_STATUSES:
            return True
        words = " ".join(str(error.get(k, "")) for k in ("code", "type", "message")).lower()
        return any(word in words for word in TRANSIENT_WORDS)
    return False


#: Gemini's error statuses (google.rpc codes by name) that pass.
GEMINI_PASSING_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"})

#: Anthropic's error types that pass (the request may succeed when sent again).
ANTHROPIC_PASSING_TYPES = frozenset({"overloaded_error", "rate_limit_error", "api_error", "timeout_error"})


def _anthropic_error_is_passing(error: Any) -> bool:
    """`{"type": "error", "error": {"type", "message"}}`, parsed defensively (flat shapes occur)."""
    if not isinstance(error, dict):
        return False
    inner = error.get("error")
    kind = inner.get("type") if isinstance(inner, dict) else error.get("type")
    return kind in ANTHROPIC_PASSING_TYPES


def _resubmittable(answer: Mapping[str, Any], unanswered_codes: frozenset[str]) -> bool:
    if answer.get("response") is None and isinstance(answer.get("error"), dict):
        # A line batchd synthesized for a request the provider never answered.
        code = answer["error"].get("code")
        if code in unanswered_codes:
            return True
    return is_transient(answer)


def _errors_in_order(errors: Path, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with errors.open("rb") as stream:
        for raw in stream:
            content = strip_eol(raw)
            if content.strip():
                answer = jsonl.loads(content)
                yield str(answer[key]), answer


def write_followups(
    upload: Path,
    errors: Path | None,
    dest: Path,
    *,
    unanswered_codes: frozenset[str] = frozenset({"batch_expired"}),
    everything: bool = False,
    key: str = "custom_id",
) -> int:
    """Write to `dest` the request lines of `upload` whose line in `errors` is a transient
    failure or an unanswered request with one of `unanswered_codes` (with `everything`:
    every request with a line in `errors`, as a manual retry wants); return how many.

    `errors` is the merged errors.jsonl, in input order like `upload`, so one pass
    over both in step (a merge join) finds them with constant memory. `key` names a request
    in both (request_rules.id_key: Gemini's `key`).
    """
    count = 0
    with atomic_file(dest) as out:
        if errors is not None and errors.exists():
            count = _join(upload, _errors_in_order(errors, key), out, unanswered_codes, everything, key)
    return count


def _join(
    upload: Path,
    failures: Iterator[tuple[str, dict[str, Any]]],
    out: IO[bytes],
    codes: frozenset[str],
    everything: bool,
    key: str,
) -> int:
    count = 0
    wanted = next(failures, None)
    with upload.open("rb") as stream:
        for raw in stream:
            if wanted is None:
                break
            request = jsonl.loads(strip_eol(raw))
            if str(request[key]) != wanted[0]:
                continue
            if everything or _resubmittable(wanted[1], codes):
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                count += 1
            wanted = next(failures, None)
    return count
