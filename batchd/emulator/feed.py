"""A running batch's requests, handed to the worker's lanes one at a time.

The feed decides what is sent next and when: the input file in order, up to the plan's limit,
skipping what the spool says was answered before a restart, spread over the IN_PROGRESS time
when the timeline asks for it, never past the batch's deadline, and not while the emulator is
paused. Lanes ask it for work (`next`) one at a time, so those rules hold as they would for
a single dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

import anyio

from batchd.emulator.spool import RequestLines, custom_id_hash
from batchd.jsonl import loads


class RequestFeed:
    """The next request of a batch to answer, for whichever lane asks (see the module's doc).

    `gate_wait` returns once the emulator is not paused; `clock` is the emulator's (compared
    with `deadline`); pacing runs on anyio's clock from `started`.
    """

    def __init__(
        self,
        lines: RequestLines,
        *,
        limit: int,
        answered: Collection[str],
        pace_s: float,
        started: float,
        deadline: datetime,
        clock: Callable[[], datetime],
        gate_wait: Callable[[], Any],
    ) -> None:
        self._lines = lines
        self._limit = limit
        self._answered = answered
        self._pace_s = pace_s
        self._started = started
        self._deadline = deadline
        self._clock = clock
        self._gate_wait = gate_wait
        self._block: list[tuple[int, bytes]] = []
        self._next_in_block = 0
        #: requests of the input looked at so far (answered before or not)
        self.position = 0
        #: the deadline passed before every request was handed out
        self.expired = False
        # One lane reads at a time; taken at once when free (anyio's Lock yields even then).
        self._lock = anyio.Lock(fast_acquire=True)

    async def next(self) -> tuple[str, dict[str, Any]] | None:
        """The next request to answer and its custom_id hash; None once there is none to hand out."""
        async with self._lock:
            while not self.expired and self.position < self._limit:
                if self._next_in_block >= len(self._block):
                    self._block, self._next_in_block = await self._lines.next_lines(), 0
                    if not self._block:
                        return None
                _lineno, raw = self._block[self._next_in_block]
                self._next_in_block += 1
                self.position += 1
                request: dict[str, Any] = loads(raw)  # validated before the batch started
                key = custom_id_hash(request["custom_id"])
                if key in self._answered:
                    continue
                if self._pace_s:
                    # Spread the requests over the IN_PROGRESS time, so progress climbs steadily.
                    await anyio.sleep_until(self._started + self._pace_s * (self.position - 1) / self._limit)
                if self._clock() >= self._deadline:
                    self.expired = True
                    return None
                await self._gate_wait()
                return key, request
            return None
