"""What both processes of a merge know (merge_work.py): its plan, and the lines it makes up.

The plan names the files, and sizes the work: partitions by the input's size, scan items
by the answer files' sizes, buckets by a number of ranks. It reaches a helper process as
a plain tuple.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUCKET", "CHUNK_BYTES", "PART_BYTES", "UNANSWERED_CODES", "Plan", "plan_merge", "unanswered_line"]

#: Why a request got no answer; the `error.code` of its synthesized line in errors.jsonl.
UNANSWERED_CODES: Mapping[str, str] = {
    "batch_expired": "the batch's completion window ended before this request was answered",
    "batch_cancelled": "the batch was cancelled before this request was answered",
    "batch_failed": "the provider failed the batch before this request was answered",
    "not_submitted": "this request was never submitted to the provider",
    "not_returned": "the provider's batch ended without returning a result for this request",
    "results_expired": "the provider no longer kept the batch's results when batchd came to download them",
}

#: Input bytes per partition. A request line takes at least ~60 bytes, so a partition holds at
#: most ~140,000 custom_ids (the dict a join holds), and far fewer for real requests.
PART_BYTES = 8 << 20
#: Consecutive ranks per bucket: the slots the write phase holds at once (not its answer
#: lines: those are written on a megabyte at a time).
BUCKET = 1 << 14
#: Bytes of answer files per scan item: small enough that the two processes end together.
CHUNK_BYTES = 8 << 20


def unanswered_line(custom_id: str, code: str, key: str = "custom_id") -> bytes:
    """The line errors.jsonl gets for a request never answered (without its line end); `key`
    names the request as the dialect's lines do (Gemini: `key`)."""
    line = {
        key: custom_id,
        "response": None,
        "error": {"code": code, "message": UNANSWERED_CODES[code]},
    }
    return json.dumps(line, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Plan:
    """What both processes know of one merge (handed to a helper as a tuple)."""

    #: the merge's private scratch folder
    folder: str
    input_path: str
    answers: tuple[str, ...]
    #: the position each answer file starts at: the sizes of the files before it, summed
    bases: tuple[int, ...]
    parts: int
    #: the answer files' scan items: (file, first byte, end byte)
    chunks: tuple[tuple[int, int, int], ...]
    #: consecutive ranks per bucket
    bucket: int
    unanswered_code: str
    #: how many dropped answers of each kind are named (in logs)
    cap: int
    #: the field naming a request in the input and the answers (request_rules.id_key); with
    #: "key", the answers are Gemini's (`response` is the success's body, `error` a failure)
    key: str = "custom_id"
    #: the answer files (by index) of cancelled batches (the user's cancel, or batchd's of a stuck
    #: batch): an Anthropic `canceled` result there says the request never ran, and it gets the
    #: unanswered line instead
    unrun_files: tuple[int, ...] = ()

    def as_tuple(self) -> tuple[Any, ...]:
        return astuple(self)


def plan_merge(
    folder: Path,
    input_path: Path,
    answers: Sequence[Path],
    unanswered_code: str,
    *,
    cap: int,
    key: str = "custom_id",
    unrun: Collection[Path] = (),
) -> Plan:
    """The plan of a merge: partitions sized by the input, scan items by the answer files
    (`unrun`: those of cancelled batches, see Plan.unrun_files)."""
    bases: list[int] = []
    chunks: list[tuple[int, int, int]] = []
    position = 0
    for file, path in enumerate(answers):
        size = path.stat().st_size
        bases.append(position)
        position += size
        chunks.extend((file, start, min(start + CHUNK_BYTES, size)) for start in range(0, size, CHUNK_BYTES))
    return Plan(
        folder=str(folder),
        input_path=str(input_path),
        answers=tuple(map(str, answers)),
        bases=tuple(bases),
        parts=max(1, math.ceil(input_path.stat().st_size / PART_BYTES)),
        chunks=tuple(chunks),
        bucket=BUCKET,
        unanswered_code=unanswered_code,
        cap=cap,
        key=key,
        unrun_files=tuple(i for i, path in enumerate(answers) if path in unrun),
    )
