"""Packing: the requests of several small files in one remote batch, and the answers split back.

A burst of small files would otherwise cost each its own remote batch: an upload and a create
apiece, a batch to poll and to download, and a place in the provider's count of batches in
flight. Files the inbox takes in one go and that agree on everything a batch is made of (the
provider, the endpoint, the model, the completion window) are packed: a pack job of batchd's own
carries their requests, and each file keeps its own job, its own outbox folder and its own
webhook events (DESIGN §2; docs/design.md, "Packing").

The pack's upload copy is its files' upload copies one after the other, each request's id
(`custom_id`; Gemini's `key`) replaced by `<the file's job id>-<its rank in the file>`: ids are
unique within a file, not across files, and hex digits and a dash meet every provider's rule on
ids (Anthropic's: 1-64 of `[A-Za-z0-9_-]`). When the pack's round ends, the answers of its
batches are split back into each file's own answer files with its own ids again, and each file's
job merges them as if its own batch had sent them (results.merge_results, unchanged).

Streaming file work; no network, no database. Memory: the ids of one pack's files (a pack is
small by construction: files of at most `[inbox] pack_max_requests` requests, within one
batch's limits).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

from batchd import jsonl
from batchd.durable_files import atomic_file, make_durable, open_temp, temp_name
from batchd.jsonl import strip_eol
from batchd.safe_fs import open_regular

log = structlog.get_logger("batchd.packs")

#: The pack's upload copy, in its own folder of job files (inbox.job_files_dir).
PACK_NAME = "pack.jsonl"
#: Answer files a split keeps open at once (answers come roughly in input order, so few reopen).
OPEN_AT_ONCE = 64


@dataclass(frozen=True)
class PackCopy:
    """A pack's upload copy as written."""

    path: Path
    sha256: str
    size_bytes: int
    request_count: int


def request_id(job_id: str, rank: int) -> str:
    """The id a file's request carries inside a pack: its job and its rank in the file (from 0)."""
    return f"{job_id}-{rank}"


def parse_request_id(value: object) -> tuple[str, int] | None:
    """(job id, rank) of an id `request_id` made; None for anything else."""
    if not isinstance(value, str):
        return None
    job_id, dash, rank = value.rpartition("-")
    if not dash or not job_id or not rank.isdigit() or not rank.isascii():
        return None
    return job_id, int(rank)


def write_pack(files: Sequence[tuple[str, Path]], dest: Path, *, key: str, durable: bool = True) -> PackCopy:
    """Write the upload copies of `files` (job id, upload copy) one after the other into `dest`,
    each request's `key` replaced by its pack id (atomically: a crash leaves no half pack;
    without `durable`, the caller makes it durable: durable_files.make_durable)."""
    digest = hashlib.sha256()
    size = count = 0
    with atomic_file(dest, durable=durable) as out:
        for job_id, copy in files:
            for rank, request in enumerate(_requests(copy)):
                request[key] = request_id(job_id, rank)
                line = jsonl.dumps_line(request) + b"\n"
                out.write(line)
                digest.update(line)
                size += len(line)
                count += 1
    return PackCopy(dest, digest.hexdigest(), size, count)


def split_answers(
    answers: Sequence[tuple[Path, Path]],
    copies: Mapping[str, Path],
    dest_dir: Mapping[str, Path],
    *,
    key: str,
) -> int:
    """Split each of the pack's answer files into the answer files of its files, ids restored.

    `answers`: (the downloaded answer file, the name each file's part gets in its `dest_dir`);
    `copies`: the upload copy of each file to split for (job id → path), whose ranks give back
    the ids; a line of a file not in `copies` (one settled before, by a run a crash cut short) is
    passed over. Every file gets every part, empty when nothing of it came back, written whole or
    not at all (temp names, renamed at the end). Returns the lines that named no file of the pack.
    """
    ids = _Ids(copies, key)
    stray = 0
    for src, name in answers:
        with _Parts(dest_dir, name) as parts, src.open("rb") as stream:
            for raw in stream:
                content = strip_eol(raw)
                if not content.strip():
                    continue
                answer = jsonl.loads(content)
                found = parse_request_id(answer.get(key)) if isinstance(answer, dict) else None
                if found is None:
                    stray += 1
                    continue
                original = ids.original(*found)
                if original is None:
                    # A file settled before (passed over), or a rank the file does not have.
                    stray += found[0] in copies
                    continue
                answer[key] = original
                parts.write(found[0], jsonl.dumps_line(answer) + b"\n")
    if stray:
        log.warning("pack.stray_answers", lines=stray)
    return stray


def _requests(copy: Path) -> Iterator[dict[str, object]]:
    """The request lines of an upload copy (one JSON object per line), parsed. Beside the inbox:
    opened without following a symlink (safe_fs.open_regular), as every read of batchd's files there."""
    with os.fdopen(open_regular(copy), "rb") as stream:
        for raw in stream:
            content = strip_eol(raw)
            if content.strip():
                request = jsonl.loads(content)
                assert isinstance(request, dict), "an upload copy holds validated request objects"
                yield request


class _Ids:
    """Each file's ids by rank, read from its upload copy when one of its answers comes first."""

    def __init__(self, copies: Mapping[str, Path], key: str) -> None:
        self._copies = copies
        self._key = key
        self._ids: dict[str, list[str]] = {}

    def original(self, job_id: str, rank: int) -> str | None:
        copy = self._copies.get(job_id)
        if copy is None:
            return None
        ids = self._ids.get(job_id)
        if ids is None:
            ids = self._ids[job_id] = [str(r[self._key]) for r in _requests(copy)]
        return ids[rank] if rank < len(ids) else None


class _Parts:
    """One answer file's part for each of the pack's files: written under temp names, at most
    OPEN_AT_ONCE open at a time, all renamed into place and made durable on a clean exit."""

    def __init__(self, dest_dir: Mapping[str, Path], name: Path) -> None:
        self._dest = {job_id: folder / name for job_id, folder in dest_dir.items()}
        self._open: OrderedDict[str, IO[bytes]] = OrderedDict()
        self._started: set[str] = set()

    def __enter__(self) -> _Parts:
        return self

    def write(self, job_id: str, line: bytes) -> None:
        out = self._open.get(job_id)
        if out is None:
            out = self._open[job_id] = self._reopen(job_id)
            if len(self._open) > OPEN_AT_ONCE:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(job_id)
        out.write(line)

    def _reopen(self, job_id: str) -> IO[bytes]:
        temp = temp_name(self._dest[job_id])
        if job_id in self._started:
            # Its own temp file, made by open_temp below: appended to, never through a symlink.
            return os.fdopen(os.open(temp, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW), "ab")
        self._started.add(job_id)
        return open_temp(temp)

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        for out in self._open.values():
            out.close()
        if exc is not None:
            for job_id in self._started:
                temp_name(self._dest[job_id]).unlink(missing_ok=True)
            return
        for job_id, dest in self._dest.items():
            if job_id not in self._started:
                open_temp(temp_name(dest)).close()
            os.replace(temp_name(dest), dest)
        # Before any file of the pack is settled (the caller goes on only once this returns); a
        # crash before it leaves the files waiting, and the split is done again.
        make_durable(list(self._dest.values()))
