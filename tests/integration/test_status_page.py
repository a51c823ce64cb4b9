"""The status page over a real database: the listing and its filters, a job's page with its
deliveries, escaping, the token on every route, and no secret anywhere on it."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchd import metrics
from batchd.config import Settings, build_settings
from batchd.health import Health, LoopMonitor, create_metrics_app
from batchd.models import Job, JobState, NewEvent
from batchd.service import secret_values
from batchd.status import status_routes
from batchd.status.auth import COOKIE
from batchd.status.pages import listing_page
from batchd.status.queries import Filter, read_listing
from batchd.store import Store
from batchd.store.views import newest_jobs
from tests.databases import database_url
from tests.store_helpers import add_job, end_job, fail_attempt

pytestmark = pytest.mark.each_database

API_KEY = "sk-live-provider-key-4f9a"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"status-page-test-secret-32bytes!").decode()
HOOK_URL = "https://hookuser:hookpass-77@hooks.example.com/in?access_token=qtok-55"
TOKEN = "status-token-9c1e"


def settings_for(tmp_path: Path, **metrics_table: Any) -> Settings:
    """A config with a provider key, a webhook secret and an endpoint URL holding credentials."""
    raw = {
        "state_dir": str(tmp_path / "state"),
        "provider": {
            "kind": "together",
            "api_key": API_KEY,
            "base_url": "https://baseuser:basepass-31@api.example.com",
        },
        "webhooks": [{"url": HOOK_URL, "secret": WEBHOOK_SECRET}],
        "metrics": metrics_table,
    }
    return build_settings(raw, base_dir=tmp_path, environ={}, config_path=None)


@asynccontextmanager
async def page_client(
    tmp_path: Path, *, tokens: tuple[str, ...] = ()
) -> AsyncIterator[tuple[Store, httpx.AsyncClient]]:
    store = Store(database_url(tmp_path / "batchd.db"))
    store.migrate()
    settings = settings_for(tmp_path)
    routes = status_routes(store, lambda: settings)
    app = create_metrics_app(
        Health(LoopMonitor(store), store), metrics.Metrics().registry, routes=routes, tokens=tokens
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batchd") as client:
            yield store, client
    finally:
        store.close()


def job_id(n: int) -> str:
    return f"{n:032x}"


def event_to(url: str, n: int) -> NewEvent:
    return NewEvent(f"evt_{n}", "batch.cancelled", b"{}", [(url, "config")])


def rows(html: str) -> list[str]:
    """The jobs table's rows as text (tags stripped), one string per row."""
    table = html.split('<table class="jobs">', 1)[1].split("</table>", 1)[0]
    return [re.sub(r"<[^>]+>", " ", row) for row in table.split("<tr>")[2:]]


async def test_the_listing_shows_each_job_with_what_was_answered_and_filters_by_state_and_name(
    tmp_path: Path,
) -> None:
    async with page_client(tmp_path) as (store, client):
        add_job(store, job_id(1), "alpha-report", state=JobState.COMPLETED)
        add_job(store, job_id(2), "beta run", state=JobState.IN_PROGRESS, request_count=20)
        add_job(store, job_id(3), "gamma", state=JobState.UPLOADING)
        end_job(
            store, job_id(3), JobState.CANCELLED, expect=JobState.UPLOADING,
            request_counts={"total": 20, "completed": 10, "failed": 10, "unanswered": 7},
        )  # fmt: skip
        add_job(store, job_id(4), "100%_odd", state=JobState.REJECTED)

        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        listed = rows(page.text)
        assert len(listed) == 4 and "100%_odd" in listed[0]  # newest first
        (gamma,) = [r for r in listed if "gamma" in r]
        # 13 of 20 answered (10 ok, 3 errors of the provider's, 7 never answered): 65 %, not 100 %.
        assert "cancelled" in gamma and "65 %" in gamma and gamma.split()[-5:-2] == ["10", "10", "20"]
        (alpha,) = [r for r in listed if "alpha" in r]
        assert "completed" in alpha and "100 %" in alpha
        assert f'<a href="/jobs/{job_id(2)}">beta run</a>' in page.text
        # The filter form works without a script: a GET form with the state and the name.
        assert '<form class="filter" method="get" action="/">' in page.text
        assert '<option value="cancelled">cancelled (1)</option>' in page.text

        only_cancelled = rows((await client.get("/", params={"state": "cancelled"})).text)
        assert len(only_cancelled) == 1 and "gamma" in only_cancelled[0]
        searched = rows((await client.get("/", params={"q": "ALPHA"})).text)
        assert len(searched) == 1 and "alpha-report" in searched[0]
        # `%` and `_` are plain characters in a search, not wildcards.
        assert len(rows((await client.get("/", params={"q": "0%_"})).text)) == 1
        assert "No job matches." in (await client.get("/", params={"q": "zzz", "state": "failed"})).text
        # An unknown state shows every job rather than failing.
        assert len(rows((await client.get("/", params={"state": "bogus"})).text)) == 4


async def test_the_listing_reads_only_the_newest_jobs_and_says_so(tmp_path: Path) -> None:
    async with page_client(tmp_path) as (store, _client):
        for n in range(5):
            add_job(store, job_id(n), f"job-{n}", state=JobState.COMPLETED)
        page = newest_jobs(store, limit=3)
        assert [j.name for j in page.jobs] == ["job-4", "job-3", "job-2"] and page.more
        assert not newest_jobs(store, limit=5).more
        settings = settings_for(tmp_path)
        html = listing_page(read_listing(store, settings, Filter(), now=store.now(), limit=3))
        assert len(rows(html)) == 3 and "The newest 3 matching jobs are shown" in html


async def test_a_jobs_page_shows_its_timeline_batches_files_and_deliveries(tmp_path: Path) -> None:
    async with page_client(tmp_path) as (store, client):
        job = add_job(store, job_id(7), "nightly", state=JobState.UPLOADING)
        end_job(
            store, job.id, JobState.CANCELLED, [event_to(HOOK_URL, 7)], expect=JobState.UPLOADING,
            request_counts={"total": 4, "completed": 2, "failed": 2, "unanswered": 2},
        )  # fmt: skip
        (delivery,) = store.deliveries.select(job_id=job.id)
        fail_attempt(store, delivery, next_attempt_at=store.now() + 60, status=503, error="HTTP 503: busy")

        page = await client.get(f"/jobs/{job.id}")
        assert page.status_code == 200
        text = page.text
        assert "<h1>nightly</h1>" in text and "50 %" in text
        assert "received <code>nightly.jsonl</code>" in text and "finished:" in text
        assert "webhook event <code>batch.cancelled</code> (evt_7)" in text
        deliveries = text.split('<table class="deliveries">', 1)[1].split("</table>", 1)[0]
        assert "batch.cancelled" in deliveries and "pending" in deliveries
        assert "<td>503</td>" in deliveries and "HTTP 503: busy" in deliveries and "next attempt" in deliveries
        assert "https://***@hooks.example.com/in?access_token=***" in deliveries

        missing = await client.get(f"/jobs/{job_id(99)}")
        assert missing.status_code == 404 and "No job" in missing.text


async def test_names_and_errors_are_escaped_everywhere(tmp_path: Path) -> None:
    async with page_client(tmp_path) as (store, client):
        name = '<script>alert("x")</script><img src=x onerror=alert(1)>'
        job = add_job(store, job_id(1), name, state=JobState.RECEIVED, model='"><b>model</b>')
        for path in ("/", f"/jobs/{job.id}", "/?q=%3Cscript%3E"):
            html = (await client.get(path)).text
            assert "<script>alert" not in html and "<img src=x" not in html and "<b>model" not in html
            assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
        # Even so, the page may run and load nothing but the listener's own files.
        answer = await client.get("/")
        assert answer.headers["content-security-policy"].startswith("default-src 'self'")


async def test_no_secret_appears_on_any_page(tmp_path: Path) -> None:
    async with page_client(tmp_path) as (store, client):
        job = add_job(
            store, job_id(1), "with-hook", state=JobState.RECEIVED,
            webhook_url="https://specuser:specpass-12@allowed.example.com/h?sig=spec-tok-3",
        )  # fmt: skip
        end_job(store, job.id, JobState.FAILED, [event_to(HOOK_URL, 1)], expect=JobState.RECEIVED)
        secrets = [*secret_values(settings_for(tmp_path)), "specpass-12", "spec-tok-3"]
        assert {API_KEY, WEBHOOK_SECRET, "hookpass-77", "qtok-55", "basepass-31"} <= set(secrets)
        pages = [await client.get(path) for path in ("/", f"/jobs/{job.id}", "/?state=failed")]
        assert all(p.status_code == 200 for p in pages)
        for page in pages:
            for secret in secrets:
                assert secret not in page.text
        endpoints = pages[0].text.split('<table class="endpoints">', 1)[1]
        assert "https://***@hooks.example.com/in?access_token=***" in endpoints
        assert "https://***@allowed.example.com/h?sig=***" in pages[1].text


async def test_the_token_is_asked_for_on_every_route(tmp_path: Path) -> None:
    async with page_client(tmp_path, tokens=("old-token", TOKEN)) as (store, client):
        job: Job = add_job(store, job_id(1), "a", state=JobState.COMPLETED)
        paths = ["/metrics", "/healthz", "/", f"/jobs/{job.id}", "/static/refresh.js", "/static/status.css"]
        for path in paths:
            refused = await client.get(path)
            assert refused.status_code == 401, path
            assert "Bearer" in refused.headers["www-authenticate"] and "a" not in refused.cookies
            wrong = await client.get(path, headers={"Authorization": "Bearer status-token-9c1f"})
            assert wrong.status_code == 401, path
            assert (await client.get(path, params={"token": TOKEN[:-1]})).status_code == 401, path
            bearer = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert bearer.status_code in (200, 503), path  # /healthz: 503 before the first tick
            assert (await client.get(path, headers={"Authorization": "Bearer old-token"})).status_code != 401
        # A browser opens the page once with ?token=: the answer sets a cookie that opens the rest.
        opened = await client.get("/", params={"token": TOKEN})
        assert opened.status_code == 200 and COOKIE in opened.cookies
        assert TOKEN not in opened.cookies[COOKIE] and TOKEN not in opened.text
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        client.cookies.set(COOKIE, opened.cookies[COOKIE])
        for path in paths:
            assert (await client.get(path)).status_code != 401, path
        client.cookies.set(COOKIE, "0" * 64)
        assert (await client.get("/")).status_code == 401


async def test_without_a_token_file_the_page_is_open_and_serves_its_assets(tmp_path: Path) -> None:
    async with page_client(tmp_path) as (_store, client):
        script = await client.get("/static/refresh.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "setInterval" in script.text
        style = await client.get("/static/status.css")
        assert style.status_code == 200 and ".s-completed" in style.text
        assert (await client.get("/static/../pyproject.toml")).status_code == 404
        assert (await client.get("/static/nothing.js")).status_code == 404
        html = (await client.get("/")).text
        # Nothing from elsewhere: every src and href is one of the listener's own paths.
        assert all(link.startswith("/") for link in re.findall(r'(?:src|href)="([^"]*)"', html))


async def test_spend_against_the_budget_is_on_the_page_and_in_metrics(tmp_path: Path) -> None:
    from batchd.admission import Limit, period_starts
    from batchd.status.queries import spend_against_budget

    store = Store(database_url(tmp_path / "batchd.db"))
    store.migrate()
    raw = {
        "state_dir": str(tmp_path / "state"),
        "pricing": {"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        "budget": {"usd_per_day": 10, "usd_per_month": 100},
    }
    settings = build_settings(raw, base_dir=tmp_path, environ={}, config_path=None)
    day, month = period_starts(store.now())
    limit = Limit(usd_per_day=10, usd_per_month=100, day_start=day, month_start=month)
    for n, cost in ((1, 2.5), (2, 1.25)):
        add_job(store, job_id(n), f"job-{n}", model="m")
        verdict = store.admission.admit(job_id(n), expect=JobState.RECEIVED, limit=limit, shards=lambda _: 1, cost=cost)
        assert verdict.admitted
    m = metrics.enable()
    try:
        spend = lambda: spend_against_budget(store, settings, store.now())  # noqa: E731
        routes = status_routes(store, lambda: settings)
        app = create_metrics_app(Health(LoopMonitor(store), store), m.registry, routes=routes, spend=spend)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batchd") as client:
            page = (await client.get("/")).text
            await client.get("/metrics")
        assert 'Spend (estimated, UTC) today: <span class="num">$3.75</span> of' in page
        assert 'this month: <span class="num">$3.75</span> of <span class="num">$100.00</span>' in page
        assert m.registry.get_sample_value("batchd_spend_usd", {"period": "day"}) == 3.75
        assert m.registry.get_sample_value("batchd_budget_usd", {"period": "month"}) == 100.0
    finally:
        metrics.disable()
        store.close()
