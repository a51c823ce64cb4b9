"""Admission's pure parts: the decision, the token estimate, what reads as "queue full", the
life cycle of a queued job, the UTC periods of a spend budget."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from batchd import admission, lifecycle
from batchd.admission import InFlight, Limit
from batchd.config import ProviderSettings
from batchd.lifecycle import Step
from batchd.models import BatchStatus, Job, JobState, Limits, RemoteBatchRecord
from batchd.providers.wire import create_refusal, is_queue_full
from batchd.tokens import output_tokens, prompt_tokens


def job(**values: object) -> Job:
    base: dict[str, object] = {
        "id": "j1", "name": "n", "source": "n.jsonl", "state": JobState.RECEIVED, "provider": "openai",
        "created_at": 1.0, "updated_at": 1.0, "estimated_input_tokens": 600, "estimated_output_tokens": 400,
        "request_count": 10, "size_bytes": 1000,
    }  # fmt: skip
    return Job(**{**base, **values})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the decision


def test_a_job_that_fits_goes_and_one_that_does_not_says_why() -> None:
    limit = Limit(max_batches=3, max_tokens=2500)
    assert admission.decide(job(), 1, None, limit, InFlight(batches=2, tokens=1500)) is None
    too_many = admission.decide(job(), 2, None, limit, InFlight(batches=2, tokens=0))
    assert too_many == "its provider has 2 of max_batches_in_flight = 3 batches in flight; it needs 2"
    too_big = admission.decide(job(), 1, None, limit, InFlight(batches=1, tokens=1600))
    assert (
        too_big
        == "1,600 tokens of its model are enqueued at its provider, and it adds about 1,000 (the limit is 2,500)"
    )


def test_the_queue_keeps_arrival_order() -> None:
    reason = admission.decide(job(), 1, None, Limit(max_batches=9), InFlight(ahead=True))
    assert reason == "waiting for the jobs queued before it at its provider"


def test_a_job_too_big_for_a_provider_limit_goes_alone_rather_than_never() -> None:
    limit = Limit(max_batches=1, max_tokens=10)
    assert admission.decide(job(), 4, None, limit, InFlight()) is None
    assert admission.decide(job(), 4, None, limit, InFlight(batches=1, tokens=5)) is not None


def test_a_spend_budget_counts_what_was_let_in_this_period_and_the_job() -> None:
    limit = Limit(usd_per_day=10.0, usd_per_month=100.0)
    assert admission.decide(job(), 1, 2.0, limit, InFlight(spent_today=8.0, spent_this_month=50)) is None
    day = admission.decide(job(), 1, 2.5, limit, InFlight(spent_today=8.0, spent_this_month=50))
    assert day == "the spend budget of the day: $8.00 of $10.00 used, and it is estimated at $2.50"
    month = admission.decide(job(), 1, 2.0, limit, InFlight(spent_today=0.0, spent_this_month=99))
    assert month is not None and month.startswith("the spend budget of the month: $99.00 of $100.00")
    # No price for its model: a budget cannot hold it (the daemon logs job.cost_unknown).
    assert admission.decide(job(), 1, None, limit, InFlight(spent_today=10.0, spent_this_month=100)) is None


def test_the_shards_a_job_will_have_follow_the_providers_limits() -> None:
    limits = Limits(max_bytes=300, max_requests=4)
    assert admission.expected_shards(job(request_count=10, size_bytes=100), limits) == 3
    assert admission.expected_shards(job(request_count=1, size_bytes=1000), limits) == 4
    assert admission.expected_shards(job(request_count=0, size_bytes=0), limits) == 1


def test_the_cost_estimate_prices_prompt_and_output_tokens() -> None:
    from batchd.config import Price

    estimate = admission.estimated_cost(job(), Price(input_per_mtok=1.0, output_per_mtok=4.0))
    assert estimate == pytest.approx((600 * 1.0 + 400 * 4.0) / 1_000_000)
    assert admission.estimated_cost(job(), None) is None


def test_a_queue_full_answer_narrows_the_token_limit() -> None:
    configured = ProviderSettings(max_batches_in_flight=5, max_enqueued_tokens=9000)
    assert admission.provider_limit(configured, None) == (5, 9000)
    assert admission.provider_limit(configured, 4000) == (5, 4000)
    assert admission.provider_limit(configured, 20000) == (5, 9000)
    assert admission.provider_limit(ProviderSettings(), 4000) == (0, 4000)


def test_the_budget_periods_are_the_utc_day_and_month() -> None:
    now = datetime(2026, 3, 17, 23, 59, 59, tzinfo=UTC).timestamp()
    day, month = admission.period_starts(now)
    assert datetime.fromtimestamp(day, UTC) == datetime(2026, 3, 17, tzinfo=UTC)
    assert datetime.fromtimestamp(month, UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(admission.next_period(now), UTC) == datetime(2026, 3, 18, tzinfo=UTC)


# ---------------------------------------------------------------- the estimate


def test_the_prompt_is_estimated_from_its_text_not_its_pictures() -> None:
    text = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    assert prompt_tokens(text) == -(-(1 + 4 + 400) // 4)
    picture = {
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}},
        ]}],
    }  # fmt: skip
    assert prompt_tokens(picture) < 20
    gemini = {"contents": [{"parts": [{"text": "y" * 40}, {"inline_data": {"data": "B" * 10_000}}]}]}
    assert prompt_tokens(gemini) == 10


def test_the_output_is_what_each_dialect_says_it_may_write() -> None:
    assert output_tokens({"max_tokens": 300}) == 300
    assert output_tokens({"max_completion_tokens": 200, "max_tokens": 300}) == 200
    assert output_tokens({"generationConfig": {"maxOutputTokens": 64}}) == 64
    assert output_tokens({"generation_config": {"max_output_tokens": 32}}) == 32
    assert output_tokens({"max_tokens": True}) == 0
    assert output_tokens({"input": "embed me"}) == 0


# ---------------------------------------------------------------- "queue full"


@pytest.mark.parametrize(
    ("status", "body", "full"),
    [
        (400, {"error": {"message": "Enqueued token limit reached", "code": "token_limit_exceeded"}}, True),
        (429, {"error": "Queued token limit exceeded for your account"}, True),
        (
            429,
            {"type": "error", "error": {"type": "rate_limit_error", "message": "batch processing queue is full"}},
            True,
        ),
        (429, {"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}, True),
        (429, {"error": {"message": "Rate limit reached for requests", "code": "rate_limit_exceeded"}}, False),
        (400, {"error": {"message": "the queue of requests is invalid", "code": "invalid"}}, False),
        (503, {"error": "the queue is busy"}, False),
    ],
)
def test_what_reads_as_a_full_queue(status: int, body: dict[str, object], full: bool) -> None:
    assert is_queue_full(status, body) is full
    error = create_refusal(httpx.Response(status, json=body), "create")
    assert error.queue_full is full
    if full:
        assert error.retryable and not error.outcome_unknown


# ---------------------------------------------------------------- the life cycle


def row(status: BatchStatus) -> RemoteBatchRecord:
    return RemoteBatchRecord(
        id=1, job_id="j1", round=0, shard=0, input_file_id="f", remote_id=None, status=status,
        create_attempts=0, intent_at=1.0, updated_at=1.0,
    )  # fmt: skip


def test_a_queued_job_costs_nothing_until_woken() -> None:
    waiting = job(state=JobState.QUEUED, next_check_at=None)
    assert lifecycle.next_action(waiting, [], 100.0).step is Step.NONE
    woken = job(state=JobState.QUEUED, next_check_at=90.0)
    assert lifecycle.next_action(woken, [], 100.0) == lifecycle.Action(Step.ADMIT, 90.0)
    refused = lifecycle.next_action(woken, [row(BatchStatus.CREATING)], 100.0)
    assert refused.step is Step.ADMIT and [b.status for b in refused.batches] == [BatchStatus.CREATING]


def test_a_cancelled_queued_job_ends_without_reaching_the_provider() -> None:
    cancelled = job(state=JobState.QUEUED, next_check_at=None, cancel_requested=True)
    assert lifecycle.next_action(cancelled, [], 100.0).step is Step.DOWNLOAD
    with_shard = lifecycle.next_action(cancelled, [row(BatchStatus.CREATING)], 100.0)
    assert with_shard.step is Step.SUBMIT  # which skips a shard never created


def test_queued_sits_between_received_and_uploading() -> None:
    assert lifecycle.may_move(JobState.RECEIVED, JobState.QUEUED)
    assert lifecycle.may_move(JobState.QUEUED, JobState.UPLOADING)
    assert lifecycle.may_move(JobState.SUBMITTING, JobState.QUEUED)
    assert lifecycle.may_move(JobState.VALIDATING, JobState.QUEUED)  # failed unrun for a full queue
    assert not lifecycle.may_move(JobState.DOWNLOADING, JobState.QUEUED)
    assert not lifecycle.may_move(JobState.QUEUED, JobState.RECEIVED)


def test_an_openai_batch_failed_unrun_for_a_full_queue_reads_as_a_wait() -> None:
    from batchd.providers.openai import parse_batch

    errors = {"object": "list", "data": [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached"}]}
    wire = {"id": "batch_1", "status": "failed", "errors": errors, "created_at": 1, "input_file_id": "f"}
    assert parse_batch(wire).queue_full
    other = {**wire, "errors": {"object": "list", "data": [{"code": "invalid_json_line", "line": 2}]}}
    assert not parse_batch(other).queue_full
    assert not parse_batch({**wire, "status": "completed"}).queue_full


# ---------------------------------------------------------------- the daemon's wake-ups


async def test_a_count_of_the_queue_read_while_an_admission_runs_never_forgets_that_job() -> None:
    """A job being let in may end up queued: a count of the queue that read before its answer
    committed must not conclude that nothing waits, or the room that frees up later would wake
    nobody (the job would wait for ever)."""
    import threading
    from types import SimpleNamespace
    from typing import Any, cast

    import anyio

    from batchd.config import BudgetSettings
    from batchd.daemon.admission import Admitter
    from batchd.daemon.context import Context
    from batchd.store import Verdict

    started, answer, queued = threading.Event(), threading.Event(), [0]
    calls = {"wake_heads": 0}
    job_ = job()

    def admit(*_: Any, **__: Any) -> Verdict:
        started.set()
        answer.wait(10)  # the admission's transaction, answered once the test says so
        queued[0] = 1
        return Verdict(job_, "its provider has 1 of max_batches_in_flight = 1 batches in flight; it needs 1")

    def wake_heads() -> int:
        calls["wake_heads"] += 1
        return queued[0]

    store = SimpleNamespace(
        admission=SimpleNamespace(admit=admit, wake_heads=wake_heads, queued_count=lambda: queued[0])
    )
    provider = ProviderSettings(max_batches_in_flight=1)
    settings = SimpleNamespace(
        budget=BudgetSettings(), pricing={}, provider_named=lambda _: provider,
        polling=SimpleNamespace(min_interval_s=1.0, max_interval_s=2.0),
    )  # fmt: skip
    ctx = Context(
        cast(Any, settings), store=cast(Any, store), provider=cast(Any, None), daemon_id="d", clock=lambda: 100.0,
        rng=cast(Any, None), wake=lambda: None, poke_deliverer=lambda: None, faults=cast(Any, None),
    )  # fmt: skip
    admitter = Admitter(ctx)
    await admitter.tick(100.0)  # at start: nothing waits
    assert calls["wake_heads"] == 1
    results: list[Job | None] = []
    async with anyio.create_task_group() as tg:

        async def gate() -> None:
            results.append(await admitter.gate(job_))

        tg.start_soon(gate)
        while not started.is_set():  # noqa: ASYNC110 - the admission runs in a worker thread
            await anyio.sleep(0.001)
        admitter.room_freed()  # a round ended meanwhile
        await admitter.tick(100.0)  # reads an empty queue: the admission has not answered
        assert calls["wake_heads"] == 2
        admitter.room_freed()  # another round ends, before the admission's answer (queued) is back
        answer.set()
    assert results == [None]  # queued
    await admitter.tick(100.0)  # that room wakes the queue's head: the job asks again
    assert calls["wake_heads"] == 3
