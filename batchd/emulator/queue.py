"""The account's queue of enqueued tokens, as providers keep it: a create that would pass it is
refused, in each dialect's words (for testing batchd's admission control, #18).

Off by default. `POST /_emulator/queue {"max_enqueued_tokens": N}` sets it (`null` turns it off;
`GET` shows it, what is enqueued and how many creates it refused). A batch's tokens are estimated
as batchd estimates them (`batchd.tokens`: its prompts' text at 4 characters a token, plus each
request's max_tokens), and count from its create until it ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from batchd.emulator.state import EmulatorState, StoredBatch
from batchd.tokens import output_tokens, prompt_tokens


class QueueLimit:
    """The most tokens the account may have enqueued at once (None: no limit)."""

    def __init__(self) -> None:
        self.max_tokens: int | None = None
        #: creates refused so far (a test's witness that a client kept within the limit)
        self.refused = 0

    def enqueued(self, state: EmulatorState) -> int:
        """The tokens of the batches not ended yet."""
        return sum(b.enqueued_tokens for b in state.batches() if not b.status.terminal)

    def refusal(self, state: EmulatorState, tokens: int) -> str | None:
        """Why a batch of `tokens` may not be created now (None: it may)."""
        if self.max_tokens is None:
            return None
        held = self.enqueued(state)
        if held + tokens <= self.max_tokens:
            return None
        self.refused += 1
        return f"Limit: {self.max_tokens:,} enqueued tokens, {held:,} enqueued now, and this batch adds {tokens:,}."


def parse_queue(spec: object) -> int | None:
    """The body of `POST /_emulator/queue`: `{"max_enqueued_tokens": N | null}`."""
    if not isinstance(spec, dict) or set(spec) != {"max_enqueued_tokens"}:
        raise ValueError('expected {"max_enqueued_tokens": N or null}')
    value = spec["max_enqueued_tokens"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("max_enqueued_tokens must be a non-negative integer or null")
    return value


def enqueued_tokens(lines: Path) -> int:
    """The tokens a batch's request lines enqueue (blocking: run it in a worker thread)."""
    total = 0
    with lines.open("rb") as stream:
        for raw in stream:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # validation fails the batch; the queue only counts
            body = line.get("body") if isinstance(line, dict) else None
            if isinstance(body, dict):
                total += prompt_tokens(body) + output_tokens(body)
    return total


async def take_room(state: EmulatorState, limit: QueueLimit, batch: StoredBatch) -> str | None:
    """Count `batch`'s tokens into the queue (before it is saved); why not, when the queue is full."""
    if limit.max_tokens is None:
        return None
    tokens = await anyio.to_thread.run_sync(enqueued_tokens, state.content_path(batch.input_file_id))
    refusal = limit.refusal(state, tokens)
    if refusal is None:
        batch.enqueued_tokens = tokens
    return refusal
