"""The status page in a real headless Chromium, served by a real `batchd run`.

One job finished (its webhook delivered) and one held in flight by the emulator (three of
five requests answered): the browser loads `/` and a job's page with the token of
`[metrics] token_file` in the URL, runs the page's script, and prints the DOM it ended with.

Skipped when Chromium is not installed, except on CI (`CI` set), where it must run:
`.ci/run` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import anyio
import pytest

from batchd.store import Store
from tests.acceptance.conftest import DaemonProcess, chat, eventually, harness
from tests.integration.emulator_helpers import HoldEngine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ON_CI = bool(os.environ.get("CI"))
TOKEN = "browser-test-token-51d2"
#: Chromium with nothing that reaches outside the machine, and no sandbox (CI runs as root).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if ON_CI:
            pytest.fail("chromium is not installed, and CI is set: .ci/run installs it", pytrace=False)
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return CHROMIUM


async def dump_dom(chromium: str, profile: Path, url: str) -> str:
    """The DOM after the page's scripts ran, as Chromium prints it."""
    done = await anyio.run_process([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url], check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def listening_url(daemon: DaemonProcess) -> str:
    (entry,) = daemon.logs_named("metrics.listening")
    assert entry["auth_required"] is True
    return str(entry["url"])


async def test_a_browser_sees_the_finished_job_the_job_in_flight_and_the_deliveries(
    tmp_path: Path, chromium: str
) -> None:
    engine = HoldEngine()
    async with harness(tmp_path, engine=engine) as h:
        (h.ws.root / "metrics.token").write_text(TOKEN + "\n", encoding="utf-8")
        with h.ws.config.open("a", encoding="utf-8") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\ntoken_file = "metrics.token"\n')
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        base = listening_url(daemon)

        h.ws.drop("finished-report.jsonl", [chat("a"), chat("b")])
        await h.receiver.wait_for(lambda hooks: any(hook.status == 204 for hook in hooks))
        h.ws.drop("in-flight.jsonl", [chat("q-0"), chat("q-1"), chat("q-2"), chat("h-3", "hold"), chat("h-4", "hold")])
        store = Store(h.ws.database_url)
        try:
            # Three of five answered: the provider says 60 %, and the daemon's next poll records it.
            await eventually(lambda: any(b.progress == 60.0 for bs in store.batches.by_job().values() for b in bs), 30)
            await eventually(lambda: all(d.state.value == "delivered" for d in store.deliveries.select()), 30)
            (finished,) = [j for j in store.jobs.select() if j.name == "finished-report"]
        finally:
            store.close()

        profile = tmp_path / "chromium-profile"
        listing = await dump_dom(chromium, profile, f"{base}/?token={TOKEN}")
        # The refresh script was served, allowed by the page's policy, and ran.
        assert 'data-live="on"' in listing
        shown = text_of(listing.split('<table class="jobs">', 1)[1].split("</table>", 1)[0])
        assert re.search(r"finished-report completed default .*100 % 2 0 2", shown), shown
        assert re.search(r"in-flight in_progress default .*60 % - - 5", shown), shown
        assert f'href="/jobs/{finished.id}"' in listing
        daemons = text_of(listing.split('<table class="daemons">', 1)[1].split("</table>", 1)[0])
        assert "running" in daemons
        assert h.receiver.url in text_of(listing.split('<table class="endpoints">', 1)[1])

        job = await dump_dom(chromium, profile, f"{base}/jobs/{finished.id}?token={TOKEN}")
        deliveries = text_of(job.split('<table class="deliveries">', 1)[1].split("</table>", 1)[0])
        assert "batch.completed" in deliveries and h.receiver.url in deliveries and "delivered" in deliveries
        assert "204" in deliveries
        assert "<h1>finished-report</h1>" in job and "finished-report/job.json" in job

        # Without the token the browser gets nothing but the refusal.
        refused = await dump_dom(chromium, tmp_path / "other-profile", f"{base}/")
        assert "finished-report" not in refused and "401" in refused
        engine.release.set()
