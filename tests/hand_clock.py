"""A clock a test moves by hand (pass it where batchd takes `clock=`), and a sleep that only
remembers (pass it where batchd takes `sleep=`)."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingSleep:
    """Stands in for anyio.sleep: remembers the waits and returns at once (no test waits out a backoff)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
