"""Finishing steps give the process to intake while a burst of files waits to be taken."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest

from batchd.daemon import context as context_module
from batchd.daemon.context import Context


def make_context() -> Context:
    settings = SimpleNamespace(polling=SimpleNamespace(min_interval_s=1.0, max_interval_s=2.0))
    return Context(
        cast(Any, settings), store=cast(Any, None), provider=cast(Any, None), daemon_id="d",
        clock=lambda: 0.0, rng=cast(Any, None), wake=lambda: None, poke_deliverer=lambda: None,
        faults=cast(Any, None),
    )  # fmt: skip


async def test_a_finishing_step_waits_until_the_files_waiting_are_taken() -> None:
    ctx = make_context()
    caught_up = anyio.Event()
    ctx.intake_backlog = lambda: caught_up
    done = anyio.Event()

    async def finishing() -> None:
        await ctx.yield_to_intake()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(finishing)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        caught_up.set()
    assert done.is_set()


async def test_without_a_backlog_nothing_waits() -> None:
    ctx = make_context()
    with anyio.fail_after(1):
        await ctx.yield_to_intake()


async def test_a_stream_that_never_lets_up_holds_finishing_back_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(context_module, "YIELD_TO_INTAKE_S", 0.05)
    ctx = make_context()
    never = anyio.Event()
    ctx.intake_backlog = lambda: never
    with anyio.fail_after(5):
        await ctx.yield_to_intake()
    assert not never.is_set()
