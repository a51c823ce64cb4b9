"""Wake-ups from commands to daemons, through the database they share.

A command (`batchd cancel`, `resume`, `retry`, `webhooks replay|enable`) changes rows that a
daemon's loop would otherwise only see at its next look: a job nobody holds waits for the next
heartbeat's claim (a third of a lease), a delivery for the next idle round. So the command also
counts up a sequence number, in the same transaction as the work it makes, and every daemon
reads the few sequence numbers a few times a second (`SignalStore.read`: one tiny table, one
index): a number that moved wakes the loop it names. The check is the same on SQLite and
PostgreSQL, needs no connection held open, and a daemon that missed a change (it was down)
finds the work anyway at its start-up claim and in its regular rounds: the signal only makes
the work start sooner, it never carries it.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Connection, insert, select, update

from batchd.store.database import Database
from batchd.store.schema import signals


class Signal(StrEnum):
    #: jobs changed by a command (a new job nobody holds yet, a cancel, a resume): claim and tick
    JOBS = "jobs"
    #: deliveries made due by a command (a replay, an endpoint enabled): deliver
    DELIVERIES = "deliveries"


def bump(conn: Connection, signal: Signal) -> None:
    """Count `signal` up, inside the caller's transaction (it is seen when the work is)."""
    conn.execute(update(signals).where(signals.c.name == signal.value).values(seq=signals.c.seq + 1))


def create_rows(conn: Connection) -> None:
    """One row per signal (the migration, under its lock): `bump` then only ever updates."""
    present = {str(name) for (name,) in conn.execute(select(signals.c.name))}
    missing = [{"name": s.value, "seq": 0} for s in Signal if s.value not in present]
    if missing:
        conn.execute(insert(signals), missing)


class SignalStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def read(self) -> dict[Signal, int]:
        """Each signal's sequence number (0 for one never bumped)."""
        with self._db.read() as conn:
            found = {str(name): int(seq) for name, seq in conn.execute(select(signals.c.name, signals.c.seq))}
        return {signal: found.get(signal.value, 0) for signal in Signal}
