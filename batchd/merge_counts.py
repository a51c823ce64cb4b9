"""The figures of a merge's phases, as each process finds them and as they add up (merge_work.py).

A helper process hands its figures over as plain tuples (`as_tuple`, `from_tuple`), which
marshal carries.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

__all__ = ["USAGE_BATCH", "Joined", "Scanned", "Usage"]

#: Usage objects held before they are summed, a key at a time over all of them.
USAGE_BATCH = 4096


class Usage:
    """Sums of the integer fields of successes' `response.body.usage`: key -> [sum, holders].

    A key stays only while some success counted holds it, so taking back a dropped answer
    leaves exactly what the successes written would have summed.
    """

    def __init__(self, sums: dict[str, list[int]] | None = None) -> None:
        self.sums: dict[str, list[int]] = {} if sums is None else sums

    def add(self, usages: list[dict[str, Any]], sign: int = 1) -> None:
        """Count the `usage` objects of successes (`sign` -1: take them back).

        A key at a time over the whole list: map, filter and sum run in C, where a loop over
        each object's fields would run in Python for every line of the merge.
        """
        sums = self.sums
        for key in set().union(*usages):
            values = list(map(dict.get, usages, repeat(key)))
            # Parsed JSON: an int is exactly int, never bool; a key absent is None.
            if set(map(type, values)) <= {int, type(None)}:
                holders = len(values) - values.count(None)
                total = sum(filter(None, values))
            else:
                ints = [value for value in values if type(value) is int]
                holders, total = len(ints), sum(ints)
            if holders:
                entry = sums.setdefault(key, [0, 0])
                entry[0] += sign * total
                entry[1] += sign * holders

    def merge(self, other: Usage) -> None:
        for key, (total, holders) in other.sums.items():
            entry = self.sums.setdefault(key, [0, 0])
            entry[0] += total
            entry[1] += holders

    def totals(self) -> dict[str, int]:
        return {key: total for key, (total, holders) in self.sums.items() if holders}


@dataclass
class Scanned:
    """What one process's scan found."""

    #: requests in the input, from the process that read it
    total: int | None = None
    usage: Usage = field(default_factory=Usage)
    #: answer lines with no readable custom_id: dropped
    unreadable: int = 0
    #: the positions of the first `cap` of them
    unreadable_at: list[int] = field(default_factory=list)

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.total, self.usage.sums, self.unreadable, self.unreadable_at)

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Scanned:
        total, sums, unreadable, unreadable_at = values
        return cls(total, Usage(sums), unreadable, unreadable_at)

    def merge(self, other: Scanned, cap: int) -> None:
        if other.total is not None:
            self.total = other.total
        self.usage.merge(other.usage)
        self.unreadable += other.unreadable
        self.unreadable_at = sorted(self.unreadable_at + other.unreadable_at)[:cap]


@dataclass
class Joined:
    """What one process's join chose and dropped, and how many bytes each bucket writes."""

    #: successes for a custom_id after its first: dropped
    duplicates: int = 0
    #: answers whose custom_id is not in the input: dropped
    unknown: int = 0
    #: (custom_id, extra successes) of the first `cap` custom_ids in sorted order
    duplicate_ids: list[tuple[str, int]] = field(default_factory=list)
    #: (position, custom_id) of the first `cap` unknown answers
    unknown_at: list[tuple[int, str]] = field(default_factory=list)
    #: the usage of the successes dropped, to take back
    dropped_usage: Usage = field(default_factory=Usage)
    #: lines for output.jsonl
    completed: int = 0
    #: lines for errors.jsonl
    failed: int = 0
    #: of those, synthesized for requests never answered
    unanswered: int = 0
    #: per bucket, the bytes it writes to output.jsonl
    output_bytes: list[int] = field(default_factory=list)
    #: per bucket, the bytes it writes to errors.jsonl
    error_bytes: list[int] = field(default_factory=list)

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            self.duplicates,
            self.unknown,
            self.duplicate_ids,
            self.unknown_at,
            self.dropped_usage.sums,
            self.completed,
            self.failed,
            self.unanswered,
            self.output_bytes,
            self.error_bytes,
        )

    @classmethod
    def from_tuple(cls, values: tuple[Any, ...]) -> Joined:
        duplicates, unknown, duplicate_ids, unknown_at, sums, *counts = values
        return cls(duplicates, unknown, duplicate_ids, unknown_at, Usage(sums), *counts)

    def merge(self, other: Joined, cap: int) -> None:
        self.duplicates += other.duplicates
        self.unknown += other.unknown
        self.duplicate_ids = heapq.nsmallest(cap, self.duplicate_ids + other.duplicate_ids)
        self.unknown_at = sorted(self.unknown_at + other.unknown_at)[:cap]
        self.dropped_usage.merge(other.dropped_usage)
        self.completed += other.completed
        self.failed += other.failed
        self.unanswered += other.unanswered
        self.output_bytes = [a + b for a, b in zip(self.output_bytes, other.output_bytes, strict=True)]
        self.error_bytes = [a + b for a, b in zip(self.error_bytes, other.error_bytes, strict=True)]
