"""The work of one merge (DESIGN §4), which this process and a helper process share.

A merge is a hash join on disk, in three phases. Each phase is a list of items that
either process claims (an O_EXCL file per item), so two cores share the work whatever
its shape, and one process alone does it all when there is no helper:

1. scan: the input (one item: a custom_id's rank is its line number) and the answer
   files (an item per `merge_plan.CHUNK_BYTES` of them). A custom_id goes to a
   partition by its hash: (custom_id, rank) to the `request` spill, an answer's
   (custom_id, position, length, success) to the `answer` spill of the process that
   read it. A position orders answers: the files in the order given, then bytes.
2. join: per partition, each request's answer is chosen (the first success, else the
   latest error) and goes to the bucket of its rank; what is dropped is counted, and
   each bucket's bytes in output.jsonl and errors.jsonl are summed.
3. write: per bucket of consecutive ranks, the chosen lines are read and written in
   rank order where that bucket's bytes start in each file (the sums, added up).

Memory holds one partition or one bucket's bookkeeping, whatever the file sizes. Nothing
here logs: a helper's stdout is its channel (merge_helper.py).
"""

from __future__ import annotations

import heapq
import marshal
import math
import os
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, cast
from zlib import crc32

from batchd import jsonl
from batchd.merge_counts import USAGE_BATCH, Joined, Scanned
from batchd.merge_plan import Plan, unanswered_line
from batchd.spill import Spill
from batchd.upload_copy import iter_custom_ids

__all__ = ["Worker", "read_exactly", "starts"]

# Bytes of lines gathered before one write into an output file.
_WRITE_BYTES = 1 << 20

# Where the OS has it, posix_fadvise (Linux: DONTNEED on dirty pages starts their writeback).
_START_WRITEBACK = getattr(os, "posix_fadvise", None)

# The columns of the spills: `request` (custom_id, rank); `answer` (custom_id, position,
# length, success); `chosen` (rank, position, length, success). A length is the line's
# without its end.
_REQUEST = "sq"
_ANSWER = "sqqb"
_CHOSEN = "qqqb"
# The processes that may share a merge, by the name their spills carry.
_WORKERS = ("main", "helper")


def read_exactly(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of a file; OSError if the file ends before."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(f"answer file shrank while merging (wanted {length} bytes at {offset})")
        data += more
    return data


def starts(sizes: Sequence[int]) -> list[int]:
    """Where each bucket's bytes start, and where the last one ends."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


class Worker:
    """One process's share of a merge's phases; `name` is "main" or "helper".

    `pread(fd, offset, length)` reads answer lines (results.py's: every answer line is read
    through it).
    """

    def __init__(self, plan: Plan, name: str, pread: Callable[[int, int, int], bytes]) -> None:
        self.plan = plan
        self._name = name
        self._folder = Path(plan.folder)
        self._pread = pread
        self._fds: list[int] = []

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _answer_fds(self) -> list[int]:
        if not self._fds:
            self._fds = [os.open(path, os.O_RDONLY) for path in self.plan.answers]
        return self._fds

    def _claim(self, phase: str, item: int) -> bool:
        """Whether this process takes `item` of `phase` (the other process did not take it first)."""
        try:
            fd = os.open(self._folder / f"claim-{phase}-{item}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _ids_path(self, bucket: int) -> Path:
        return self._folder / f"ids-{bucket}"

    # Phase 1.

    def scan(self) -> Scanned:
        """Claim and read scan items until none is left."""
        scanned = Scanned()
        answers = Spill(self._folder, f"answer-{self._name}", self.plan.parts, _ANSWER)
        for item in range(1 + len(self.plan.chunks)):
            if not self._claim("scan", item):
                continue
            if item == 0:
                scanned.total = self._scan_input()
            else:
                self._scan_chunk(*self.plan.chunks[item - 1], answers, scanned)
        answers.flush()
        return scanned

    def _scan_input(self) -> int:
        """Spread the input's (custom_id, rank) over the partitions, and write its custom_ids in
        rank order, one file a bucket (for the requests never answered); return their number."""
        parts = self.plan.parts
        size = self.plan.bucket
        requests = Spill(self._folder, "request", parts, _REQUEST)
        waiting = requests.waiting
        room = requests.room()
        bucket: list[str] = []
        rank = -1
        for rank, custom_id in enumerate(iter_custom_ids(Path(self.plan.input_path), self.plan.key)):
            ids, ranks = waiting[_partition(custom_id, parts) if parts > 1 else 0]
            ids.append(custom_id)
            ranks.append(rank)
            room -= 1
            if not room:
                requests.flush()
                room = requests.room()
            bucket.append(custom_id)
            if len(bucket) == size:
                self._ids_path(rank // size).write_bytes(marshal.dumps(bucket))
                bucket = []
        if bucket:
            self._ids_path(rank // size).write_bytes(marshal.dumps(bucket))
        requests.flush()
        return rank + 1

    def _scan_chunk(self, file: int, start: int, end: int, answers: Spill, scanned: Scanned) -> None:
        """Every answer line that starts in bytes [start, end) of an answer file.

        The hot loop of a merge (gigabytes): it parses each raw line once and does
        little else in Python.
        """
        loads = jsonl.loads
        parts = self.plan.parts
        key = self.plan.key
        # Gemini's answers: a `response` is the success itself, an `error` the failure.
        gemini = key == "key"
        # A cancelled batch: its `canceled` results are no answers (Plan.unrun_files).
        unrun = file in self.plan.unrun_files
        position = self.plan.bases[file] + start
        end += self.plan.bases[file]
        waiting = answers.waiting
        room = answers.room()
        usages: list[dict[str, Any]] = []
        with open(self.plan.answers[file], "rb", buffering=1 << 20) as stream:
            if start:
                # The line that begins before `start` belongs to the item before.
                stream.seek(start - 1)
                position += len(stream.readline()) - 1
            for raw in stream:
                if position >= end:
                    break
                at = position
                position += len(raw)
                try:
                    answer = loads(raw)
                except (ValueError, RecursionError):
                    if not raw.strip():
                        continue  # a blank line
                    answer = None
                custom_id = answer.get(key) if type(answer) is dict else None
                if type(custom_id) is not str:
                    scanned.unreadable += 1
                    if len(scanned.unreadable_at) < self.plan.cap:
                        scanned.unreadable_at.append(at)
                    continue
                response = answer.get("response")
                ok = False
                body = None
                if gemini:
                    if type(response) is dict and answer.get("error") is None:
                        ok = True
                        body = response
                elif type(response) is dict:
                    status = response.get("status_code")
                    # Exactly int: JSON true is no status.
                    if type(status) is int and 200 <= status < 300:
                        ok = True
                        body = response.get("body")
                elif type(result := answer.get("result")) is dict:
                    kind = result.get("type")
                    if kind == "succeeded":
                        # Anthropic's result line: the message is the success's body.
                        ok = True
                        body = result.get("message")
                    elif kind == "expired" or (unrun and kind == "canceled"):
                        # Never run: no answer (the request gets the round's unanswered line).
                        continue
                if ok:
                    usage = body.get("usageMetadata" if gemini else "usage") if type(body) is dict else None
                    if type(usage) is dict:
                        usages.append(usage)
                        if len(usages) == USAGE_BATCH:
                            scanned.usage.add(usages)
                            usages = []
                # The line without its end (strip_eol's rule): "\n", then a "\r" before it.
                length = len(raw)
                if raw[-1] == 10:
                    length -= 1
                if length and raw[length - 1] == 13:
                    length -= 1
                ids, positions, lengths, oks = waiting[_partition(custom_id, parts) if parts > 1 else 0]
                ids.append(custom_id)
                positions.append(at)
                lengths.append(length)
                oks.append(ok)
                room -= 1
                if not room:
                    answers.flush()
                    room = answers.room()
        scanned.usage.add(usages)

    # Phase 2.

    def join(self, total: int) -> Joined:
        """Claim and join partitions until none is left."""
        plan = self.plan
        buckets = math.ceil(total / plan.bucket)
        joined = Joined(output_bytes=[0] * buckets, error_bytes=[0] * buckets)
        requests = Spill(self._folder, "request", plan.parts, _REQUEST)
        answer_spills = [Spill(self._folder, f"answer-{name}", plan.parts, _ANSWER) for name in _WORKERS]
        chosen = Spill(self._folder, f"chosen-{self._name}", buckets, _CHOSEN)
        # The `cap` earliest unknown answers: a max-heap on the position, negated.
        unknown_at: list[tuple[int, str]] = []
        for part in range(plan.parts):
            if not self._claim("join", part):
                continue
            ranks: dict[str, int] = {}
            for ids, numbers in requests.read(part):
                ranks.update(zip(ids, numbers, strict=True))
            first_ok, last_error = _Answers(), _Answers()
            extra: dict[str, int] = {}
            dropped: list[tuple[int, int]] = []
            for spill in answer_spills:
                for ids, positions, lengths, oks in spill.read(part):
                    found = list(map(ranks.get, ids))
                    # The usual chunk, in bulk: known ids, each once, all successes (or all
                    # errors) for requests with none yet.
                    for other, best in ((0, first_ok), (1, last_error)):
                        if (
                            not oks.count(other)
                            and None not in found
                            and best.position.keys().isdisjoint(found)
                            and len(set(found)) == len(found)
                        ):
                            known = cast(list[int], found)
                            best.position.update(zip(known, positions, strict=True))
                            best.length.update(zip(known, lengths, strict=True))
                            break
                    else:
                        rows = zip(ids, found, positions, lengths, oks, strict=True)
                        self._join_rows(rows, first_ok, last_error, extra, dropped, unknown_at, joined)
            if dropped:
                # Rare: read back, to take back their usage.
                usages = [self._dropped_usage(position, length) for position, length in dropped]
                joined.dropped_usage.add([usage for usage in usages if usage is not None], sign=-1)
            if extra:
                joined.duplicates += sum(extra.values())
                joined.duplicate_ids = heapq.nsmallest(plan.cap, joined.duplicate_ids + list(extra.items()))
            self._choose(ranks, first_ok, last_error, chosen, joined)
            chosen.flush_if_full()
        chosen.flush()
        joined.unknown_at = sorted((-negated, custom_id) for negated, custom_id in unknown_at)
        return joined

    def _join_rows(
        self,
        rows: Iterable[tuple[str, int | None, int, int, int]],
        first_ok: _Answers,
        last_error: _Answers,
        extra: dict[str, int],
        dropped: list[tuple[int, int]],
        unknown_at: list[tuple[int, str]],
        joined: Joined,
    ) -> None:
        """Answers one at a time: unknown ids, duplicates, a success after an error."""
        for custom_id, rank, position, length, ok in rows:
            if rank is None:
                joined.unknown += 1
                heapq.heappush(unknown_at, (-position, custom_id))
                if len(unknown_at) > self.plan.cap:
                    heapq.heappop(unknown_at)
                if ok:
                    dropped.append((position, length))
            elif ok:
                best = first_ok.position.get(rank)
                if best is None:
                    first_ok.set(rank, position, length)
                    continue
                extra[custom_id] = extra.get(custom_id, 0) + 1
                # The earlier success wins (the two processes' spills are not in position order).
                if position < best:
                    dropped.append((best, first_ok.length[rank]))
                    first_ok.set(rank, position, length)
                else:
                    dropped.append((position, length))
            else:
                best = last_error.position.get(rank)
                if best is None or position > best:
                    last_error.set(rank, position, length)

    def _dropped_usage(self, position: int, length: int) -> dict[str, Any] | None:
        bases = self.plan.bases
        file = bisect_right(bases, position) - 1
        answer = jsonl.loads(self._pread(self._answer_fds()[file], position - bases[file], length))
        # A success: OpenAI's format, Anthropic's result, or Gemini's response (see the scan).
        response = answer.get("response")
        if self.plan.key == "key":
            usage = response.get("usageMetadata")
        else:
            body = response.get("body") if type(response) is dict else answer["result"].get("message")
            usage = body.get("usage") if type(body) is dict else None
        return usage if type(usage) is dict else None

    def _choose(
        self, ranks: dict[str, int], first_ok: _Answers, last_error: _Answers, chosen: Spill, joined: Joined
    ) -> None:
        """Send a partition's chosen answers to the buckets of their ranks, and count the bytes."""
        size = self.plan.bucket
        successes = first_ok.position
        errors = last_error.position
        if successes.keys().isdisjoint(errors):
            error_ranks = sorted(errors)
        else:
            error_ranks = sorted(rank for rank in errors if rank not in successes)
        for ok, answers, ranks_of, sizes in (
            (1, first_ok, sorted(successes), joined.output_bytes),
            (0, last_error, error_ranks, joined.error_bytes),
        ):
            positions = list(map(answers.position.__getitem__, ranks_of))
            lengths = list(map(answers.length.__getitem__, ranks_of))
            # In rank order, a bucket's rows are a slice.
            start = 0
            while start < len(ranks_of):
                bucket = ranks_of[start] // size
                end = bisect_left(ranks_of, (bucket + 1) * size, start)
                columns = chosen.waiting[bucket]
                columns[0].extend(ranks_of[start:end])
                columns[1].extend(positions[start:end])
                columns[2].extend(lengths[start:end])
                columns[3].extend(repeat(ok, end - start))
                # Each line and its "\n".
                sizes[bucket] += sum(lengths[start:end]) + end - start
                start = end
        joined.completed += len(successes)
        joined.failed += len(error_ranks)
        if len(successes) + len(error_ranks) < len(ranks):
            code = self.plan.unanswered_code
            for custom_id, rank in ranks.items():
                if rank not in successes and rank not in errors:
                    joined.error_bytes[rank // size] += len(unanswered_line(custom_id, code, self.plan.key)) + 1
                    joined.unanswered += 1
                    joined.failed += 1

    # Phase 3.

    def write(self, total: int, output: tuple[int, Sequence[int]], errors: tuple[int, Sequence[int]]) -> None:
        """Claim and write buckets until none is left. `output` and `errors` are each a file
        descriptor and where each bucket's bytes start in it (`starts`)."""
        buckets = math.ceil(total / self.plan.bucket)
        spills = [Spill(self._folder, f"chosen-{name}", buckets, _CHOSEN) for name in _WORKERS]
        for bucket in range(buckets):
            if self._claim("write", bucket):
                self._write_bucket(bucket, total, spills, output, errors)

    def _write_bucket(
        self,
        bucket: int,
        total: int,
        spills: list[Spill],
        output: tuple[int, Sequence[int]],
        errors: tuple[int, Sequence[int]],
    ) -> None:
        plan = self.plan
        first = bucket * plan.bucket
        # A slot per rank (placed in a loop: cheaper than sorting the bucket's rows).
        slots: list[tuple[int, int, int] | None] = [None] * min(plan.bucket, total - first)
        for spill in spills:
            for ranks, positions, lengths, oks in spill.read(bucket):
                for rank, position, length, ok in zip(ranks, positions, lengths, oks, strict=True):
                    slots[rank - first] = (position, length, ok)
        pread = self._pread
        fds = self._answer_fds()
        bases = plan.bases
        many = len(bases) > 1
        out = _Lines(output[0], output[1][bucket])
        err = _Lines(errors[0], errors[1][bucket])
        custom_ids: list[str] | None = None
        for index, slot in enumerate(slots):
            if slot is None:
                if custom_ids is None:
                    custom_ids = marshal.loads(self._ids_path(bucket).read_bytes())
                    assert custom_ids is not None
                err.add(unanswered_line(custom_ids[index], plan.unanswered_code, plan.key))
                continue
            position, length, ok = slot
            if many:
                file = bisect_right(bases, position) - 1
                line = pread(fds[file], position - bases[file], length)
            else:
                line = pread(fds[0], position, length)
            lines = out if ok else err
            lines.pieces.append(line)
            lines.held += length
            if lines.held >= _WRITE_BYTES:
                lines.flush()
        out.close(output[1][bucket + 1])
        err.close(errors[1][bucket + 1])


class _Answers:
    """rank -> where one answer line sits: a partition's first successes, or its latest errors.

    Two dicts of ints, not one of (position, length) tuples: they fill and sort in C.
    """

    def __init__(self) -> None:
        self.position: dict[int, int] = {}
        self.length: dict[int, int] = {}

    def set(self, rank: int, position: int, length: int) -> None:
        self.position[rank] = position
        self.length[rank] = length


class _Lines:
    """Lines written from `offset` of a file, each ended by "\\n", in writes of about _WRITE_BYTES.

    Add a line by appending it to `pieces` and its length to `held`, then `flush` past _WRITE_BYTES.
    """

    def __init__(self, fd: int, offset: int) -> None:
        self._fd = fd
        self._offset = offset
        self.pieces: list[bytes] = []
        self.held = 0

    def add(self, line: bytes) -> None:
        self.pieces.append(line)
        self.held += len(line)
        if self.held >= _WRITE_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pieces:
            return
        self.pieces.append(b"")  # for the last line's end
        data = b"\n".join(self.pieces)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], self._offset + written)
        if _START_WRITEBACK is not None:
            # Linux starts writing these pages to disk now (they are dirty, so they stay cached):
            # the disk works while the merge goes on, and the fsync at its end has little left.
            _START_WRITEBACK(self._fd, self._offset, len(data), os.POSIX_FADV_DONTNEED)
        self._offset += len(data)
        self.pieces = []
        self.held = 0

    def close(self, end: int) -> None:
        """Write what is held; the bytes written must end at `end` (the join's count of them)."""
        self.flush()
        if self._offset != end:
            raise RuntimeError(f"a merge wrote up to byte {self._offset} where the join counted {end}")


def _partition(custom_id: str, parts: int) -> int:
    # crc32: the same in both processes (`hash` is salted per process).
    try:
        data = custom_id.encode()
    except UnicodeEncodeError:  # a lone surrogate, possible in an answer's custom_id
        data = custom_id.encode("utf-8", "surrogatepass")
    return crc32(data) % parts
