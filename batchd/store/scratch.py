"""A throwaway SQLite index on disk: a uniqueness check over files of any size in flat memory.

Not batchd's state (that is the Store's database): the index lives in a private file for
one validation, with durability switched off, and is deleted when that work ends; a re-run
rebuilds it from the file. It sits in this package because it is the one place in batchd
that speaks SQL. (A merge joins on disk without SQL: merge_work.py.)
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path


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
