"""Rows spread over partition files on disk, in bounded memory: the storage of a merge's join.

Rows are kept by column: a list for a column of str, an `array` for a column of ints.
Each partition is one append-only file of chunks, a chunk being its length and the
`marshal` form of its columns (the arrays as bytes). marshal is the fastest way Python
has to write such lists and read them back, and safe here: only batchd's own
processes, running one interpreter, write and read these files, in a private folder
made for one merge.
"""

from __future__ import annotations

import marshal
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["HELD_ROWS", "Spill"]

#: Rows held in memory across all partitions before they are appended to their files.
HELD_ROWS = 1 << 16

# Each chunk starts with its length in bytes.
_HEAD = 8


class Spill:
    """`parts` files named `name-<part>` in `folder`, of rows with the columns `kinds`.

    `kinds` has a letter per column: "s" for str, else an `array` typecode. A row is added by
    appending to each column of `waiting[part]`; at most `room()` rows may be added before
    `flush` appends every partition's waiting rows to its file. (The hot loops that add rows
    count them themselves: a method call per row would cost more than the row.)
    """

    def __init__(self, folder: Path, name: str, parts: int, kinds: str, *, held: int | None = None) -> None:
        self._paths = [folder / f"{name}-{part}" for part in range(parts)]
        self._kinds = kinds
        self._limit = HELD_ROWS if held is None else held
        #: per partition, the columns of the rows not yet in its file
        self.waiting = [self._empty() for _ in range(parts)]

    @property
    def parts(self) -> int:
        return len(self._paths)

    def _empty(self) -> list[Any]:
        return [[] if kind == "s" else array(kind) for kind in self._kinds]

    def _held(self) -> int:
        return sum(len(columns[0]) for columns in self.waiting)

    def room(self) -> int:
        """How many rows may be added before `flush` is due (at least one)."""
        return max(1, self._limit - self._held())

    def flush_if_full(self) -> None:
        """`flush`, if the rows waiting fill the room (after rows were added in bulk)."""
        if self._held() >= self._limit:
            self.flush()

    def flush(self) -> None:
        """Append every partition's waiting rows to its file."""
        for part, (path, columns) in enumerate(zip(self._paths, self.waiting, strict=True)):
            if len(columns[0]):
                chunk = marshal.dumps([c if isinstance(c, list) else c.tobytes() for c in columns])
                with path.open("ab") as out:
                    out.write(len(chunk).to_bytes(_HEAD, "little"))
                    out.write(chunk)
                # In place: a hot loop holds `waiting`.
                self.waiting[part] = self._empty()

    def read(self, part: int) -> Iterator[list[Any]]:
        """The chunks of one partition's file, as columns, in the order they were added
        (rows not flushed yet are not in the file)."""
        try:
            stream = self._paths[part].open("rb")
        except FileNotFoundError:
            return  # no row ever went to this partition
        with stream:
            while head := stream.read(_HEAD):
                stored = marshal.loads(stream.read(int.from_bytes(head, "little")))
                yield [c if kind == "s" else array(kind, c) for kind, c in zip(self._kinds, stored, strict=True)]
