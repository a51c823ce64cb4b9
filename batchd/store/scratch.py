"""Throwaway SQLite indexes on disk: work over files of any size in flat memory.

Not batchd's state (that is the Store's database): each index lives in a private file for
one merge or one validation, with durability switched off, and is deleted when that work
ends; a re-run rebuilds it from the files. They sit in this package because it is the one
place in batchd that speaks SQL.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

#: One answer line of a merge: custom_id, file index, byte offset, length, ok (0/1), usage JSON.
AnswerRow = tuple[str, int, int, int, int, str | None]

# Per request in input order, its best answer: the first success, else the latest error.
_ORDERED = """
SELECT r.custom_id, a.file, a.off, a.len, a.ok, a.usage
FROM request r LEFT JOIN answer a INDEXED BY answer_by_id ON a.custom_id = r.custom_id AND a.ord = coalesce(
    (SELECT min(ord) FROM answer WHERE custom_id = r.custom_id AND ok = 1),
    (SELECT max(ord) FROM answer WHERE custom_id = r.custom_id AND ok = 0))
ORDER BY r.seq
"""


@dataclass(frozen=True)
class Dropped:
    """Answers a merge leaves out: second successes for one custom_id, and answers for ids not asked."""

    duplicates: int
    unknown: int
    #: (custom_id, extra successes), at most the cap asked for
    duplicate_ids: Sequence[tuple[str, int]] = field(default_factory=list)
    #: at most the cap asked for
    unknown_ids: Sequence[str] = field(default_factory=list)


class MergeIndex:
    """custom_id → input position, and where each answer line sits (file, byte offset, length)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            "temp_store = FILE",
            "cache_size = -16384",  # KiB: bounded, whatever the row count
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(
            """
            CREATE TABLE request (seq INTEGER PRIMARY KEY, custom_id TEXT NOT NULL);
            CREATE TABLE answer (
                ord INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, file INTEGER NOT NULL,
                off INTEGER NOT NULL, len INTEGER NOT NULL, ok INTEGER NOT NULL, usage TEXT
            );
            """
        )

    def __enter__(self) -> MergeIndex:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def fill(self, custom_ids: Iterable[str], answers: Iterable[AnswerRow]) -> int:
        """Index the requests in input order and every answer line; return the number of requests."""
        db = self._db
        db.execute("BEGIN")
        # No unique index on the requests' ids: the upload copy passed validation (each id once),
        # and keeping an index up to date through millions of inserts is the slowest part here.
        db.executemany("INSERT INTO request (custom_id) VALUES (?)", ((c,) for c in custom_ids))
        db.executemany("INSERT INTO answer (custom_id, file, off, len, ok, usage) VALUES (?, ?, ?, ?, ?, ?)", answers)
        # Built after the bulk insert (faster); serves the best-answer lookup and the duplicate count,
        # and covers every column the ordered pass reads, so that pass never touches the table.
        db.execute("CREATE INDEX answer_by_id ON answer (custom_id, ok, ord, file, off, len, usage)")
        db.execute("COMMIT")
        (total,) = db.execute("SELECT count(*) FROM request").fetchone()
        return int(total)

    def dropped(self, *, cap: int) -> Dropped:
        """Count the answers the merge leaves out, and name up to `cap` of each kind."""
        db = self._db
        # One pass over the answer index, grouped by custom_id (a sequential scan), joined to the
        # requests in that same order; the itemised queries below run only when there is something to name.
        (answers,) = db.execute("SELECT count(*) FROM answer").fetchone()
        matched, duplicates = db.execute(
            "SELECT coalesce(sum(n), 0), coalesce(sum(CASE WHEN k > 1 THEN k - 1 ELSE 0 END), 0) FROM ("
            "SELECT count(a.ord) AS n, sum(a.ok) AS k FROM request r "
            "LEFT JOIN answer a INDEXED BY answer_by_id ON a.custom_id = r.custom_id GROUP BY r.seq)"
        ).fetchone()
        unknown = int(answers - matched)
        if not duplicates and not unknown:
            return Dropped(0, 0)
        # Only now is an index on the requests' ids worth building: to name the dropped answers.
        db.execute("CREATE INDEX IF NOT EXISTS request_by_id ON request (custom_id)")
        duplicate_ids = []
        if duplicates:
            duplicate_ids = db.execute(
                "SELECT a.custom_id, count(*) - 1 FROM answer a JOIN request r ON r.custom_id = a.custom_id "
                "WHERE a.ok = 1 GROUP BY a.custom_id HAVING count(*) > 1 LIMIT ?",
                (cap,),
            ).fetchall()
        unknown_ids = []
        if unknown:
            unknown_ids = db.execute(
                "SELECT custom_id FROM answer WHERE custom_id NOT IN (SELECT custom_id FROM request) LIMIT ?",
                (cap,),
            ).fetchall()
        return Dropped(
            int(duplicates), unknown, [(str(c), int(n)) for c, n in duplicate_ids], [str(c) for (c,) in unknown_ids]
        )

    def ordered(self, *, batch: int) -> Iterator[list[Any]]:
        """Every request in input order with its best answer (the first success, else the latest
        error), `batch` rows at a time: (custom_id, file, offset, length, ok, usage), the last five
        None for a request never answered. Rows come as sqlite3 makes them, unchecked: this is
        the merge's hot loop."""
        rows = self._db.execute(_ORDERED)
        while chunk := rows.fetchmany(batch):
            yield chunk


class FirstLines:
    """custom_id → the line it was first seen on, for a uniqueness check, in bounded memory.

    The first `in_memory` ids live in a dict; past that they go to a private scratch file,
    so a file of millions of requests is checked without holding every id.
    """

    def __init__(self, *, in_memory: int, spill_dir: Path | None = None) -> None:
        self._in_memory = in_memory
        #: where the scratch file goes past `in_memory` ids (None: the system's temporary folder)
        self._spill_dir = spill_dir
        self._memory: dict[str, int] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._db: sqlite3.Connection | None = None

    def add(self, custom_id: str, line: int) -> int | None:
        """Remember `custom_id` at `line`; return the earlier line if it was seen before."""
        earlier = self._memory.get(custom_id)
        if earlier is not None:
            return earlier
        if self._db is None and len(self._memory) < self._in_memory:
            self._memory[custom_id] = line
            return None
        db = self._open()
        try:
            db.execute("INSERT INTO seen VALUES (?, ?)", (custom_id, line))
        except sqlite3.IntegrityError:
            row = db.execute("SELECT line FROM seen WHERE id = ?", (custom_id,)).fetchone()
            return int(row[0])
        return None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            if self._spill_dir is not None:
                self._spill_dir.mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(prefix=".batchd-ids-", dir=self._spill_dir)
            self._db = sqlite3.connect(Path(self._dir.name) / "seen.db", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=OFF")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
            self._db.execute("BEGIN")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
