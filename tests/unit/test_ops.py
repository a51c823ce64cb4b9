"""Operations in small pieces: sd_notify datagrams, the STATUS line, [metrics] settings, metric
hooks, log redaction, and the operator commands' formatting."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from batchd import logs as batchd_logging
from batchd import metrics, systemd
from batchd.cli.records import human_age, jobs_table, progress_of, progress_text
from batchd.config import ConfigError, load_settings
from batchd.health import status_line
from batchd.models import BatchStatus, Job, JobState, RemoteBatchRecord
from batchd.providers.together import TogetherProvider

# ---------------------------------------------------------------- sd_notify


def receive_all(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    found = []
    while True:
        try:
            found.append(sock.recv(4096).decode())
        except BlockingIOError:
            return found


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(path)})
        assert systemd.notify("STATUS=1 active", environ={"NOTIFY_SOCKET": str(path)})
        assert receive_all(server) == ["READY=1", "STATUS=1 active"]


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"batchd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert receive_all(server) == ["WATCHDOG=1"]


def test_notify_without_systemd_or_with_nobody_listening_is_false(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", environ={}) is False
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert systemd.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval_s({}) is None


def test_reloading_carries_the_monotonic_clock() -> None:
    first, second = systemd.reloading_message().split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and int(usec) > 0


def test_status_line_shows_active_states_first_then_the_finished_ones() -> None:
    counts = {"in_progress": 2, "validating": 1, "completed": 10, "rejected": 1}
    assert status_line(counts, 3) == (
        "3 active (1 validating, 2 in_progress); 11 done (10 completed, 1 rejected); 3 webhooks pending"
    )
    assert status_line({}, 0) == "0 active; 0 done; 0 webhooks pending"


# ---------------------------------------------------------------- [metrics] settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_metrics_listener_is_off_by_default(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), environ={})
    assert settings.metrics.listen == "" and settings.metrics.address is None


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)), ("localhost:0", ("localhost", 0))],
)
def test_metrics_listen_takes_host_and_port(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    settings = load_settings(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'), environ={})
    assert settings.metrics.address == address


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":9464", "[::1]"])
def test_a_bad_metrics_listen_names_the_key(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_settings(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'), environ={})


def test_metrics_listen_from_the_environment_and_unknown_keys(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), environ={"BATCHD_METRICS_LISTEN": "127.0.0.1:9100"})
    assert settings.metrics.address == ("127.0.0.1", 9100)
    with pytest.raises(ConfigError, match=r"unknown key metrics\.port"):
        load_settings(write(tmp_path, "[metrics]\nport = 9464\n"), environ={})
    with pytest.raises(ConfigError, match=r"metrics\.listen must be a string"):
        load_settings(write(tmp_path, "[metrics]\nlisten = 9464\n"), environ={})


def test_the_example_config_documents_the_metrics_section() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "batchd.toml"
    settings = load_settings(example, environ={})
    assert settings.metrics.address is None
    assert "[metrics]" in example.read_text(encoding="utf-8")


# ---------------------------------------------------------------- metric hooks


@pytest.fixture
def enabled() -> Iterator[metrics.Metrics]:
    yield metrics.enable()
    metrics.disable()


def samples(m: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_hooks_do_nothing_while_metrics_are_off(tmp_path: Path) -> None:
    assert metrics.current() is None
    metrics.intake(rejected=False)
    metrics.api_call("together.get", 200, 0.1)
    metrics.job_finished("completed", 3.0, [tmp_path / "missing"])
    assert metrics.current() is None


def test_hooks_move_the_exported_series(enabled: metrics.Metrics, tmp_path: Path) -> None:
    (tmp_path / "output.jsonl").write_bytes(b"x" * 100)
    metrics.intake(rejected=False)
    metrics.intake(rejected=True)
    metrics.api_call("together.get", 200, 0.02)
    metrics.api_call("together.get", None, 1.0)
    metrics.api_call("together.create", 503, 0.5)
    metrics.retry("together.get")
    metrics.poll_round("sweep", 0.05)
    metrics.job_finished("completed", 42.0, [tmp_path / "output.jsonl", tmp_path / "errors.jsonl"])
    metrics.webhook("delivered")
    metrics.set_job_counts({"in_progress": 2})
    found = samples(enabled)
    assert found[("batchd_submissions_total", ())] == 1
    assert found[("batchd_rejections_total", ())] == 1
    assert found[("batchd_api_calls_total", (("endpoint", "together.get"), ("outcome", "2xx")))] == 1
    assert found[("batchd_api_calls_total", (("endpoint", "together.get"), ("outcome", "error")))] == 1
    assert found[("batchd_api_calls_total", (("endpoint", "together.create"), ("outcome", "5xx")))] == 1
    assert found[("batchd_retries_total", (("what", "together.get"),))] == 1
    assert found[("batchd_poll_duration_seconds_count", (("mode", "sweep"),))] == 1
    assert found[("batchd_job_duration_seconds_sum", (("state", "completed"),))] == 42
    assert found[("batchd_outbox_bytes_total", ())] == 100
    assert found[("batchd_webhook_deliveries_total", (("outcome", "delivered"),))] == 1
    assert found[("batchd_jobs", (("state", "in_progress"),))] == 2
    assert found[("batchd_jobs", (("state", "completed"),))] == 0
    assert not any(name.endswith("_created") for name, _ in found)


# ---------------------------------------------------------------- log redaction


def test_configured_secret_values_never_reach_a_rendered_line(capsys: pytest.CaptureFixture[str]) -> None:
    key = "tg-" + uuid.uuid4().hex
    hook_secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    batchd_logging.redact_values([key, hook_secret, "short"])
    batchd_logging.configure(json=True)
    try:
        log = structlog.get_logger("test")
        log.info("provider.error", error=f"401 for Bearer {key}", url=f"https://x/?k={key}")
        log.info("note", detail=["nested", {"deep": hook_secret.removeprefix("whsec_")}])
        try:
            raise RuntimeError(f"boom {key}")
        except RuntimeError:
            log.exception("crashed")
        log.info("plain", text="short words stay")
    finally:
        structlog.reset_defaults()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    text = "\n".join(lines)
    assert key not in text and hook_secret.removeprefix("whsec_") not in text
    assert "Bearer ***" in text and "RuntimeError: boom ***" in text
    assert "short words stay" in text


# ---------------------------------------------------------------- operator command formatting


def job(state: JobState, **values: object) -> Job:
    return Job(id="f" * 32, name="nightly", source="nightly.jsonl", state=state, provider="together",
               created_at=1000.0, updated_at=1000.0, **values)  # type: ignore[arg-type]  # fmt: skip


def remote(progress: float | None, remote_id: str | None = "b1") -> RemoteBatchRecord:
    return RemoteBatchRecord(id=1, job_id="f" * 32, round=0, shard=0, input_file_id="file-1", remote_id=remote_id,
                             status=BatchStatus.IN_PROGRESS, create_attempts=1, intent_at=1000.0, updated_at=1000.0,
                             progress=progress)  # fmt: skip


def test_progress_comes_from_the_remote_batches_while_in_flight() -> None:
    assert progress_of(job(JobState.UPLOADING), []) == 0.0
    assert progress_of(job(JobState.IN_PROGRESS), [remote(40.0)]) == 40.0
    assert progress_of(job(JobState.IN_PROGRESS), [remote(None)]) is None
    assert progress_of(job(JobState.VALIDATING), [remote(None, remote_id=None)]) is None
    assert progress_of(job(JobState.COMPLETED), [remote(40.0)]) == 100.0
    # A finished job counts what was answered: cancelled with 13 of 20 answered is 65 %, not 100 %.
    counts = {"total": 20, "completed": 10, "failed": 10, "unanswered": 7}
    assert progress_of(job(JobState.CANCELLED, request_counts=counts), [remote(40.0)]) == 65.0
    assert progress_of(job(JobState.REJECTED), []) is None


def test_ages_bars_and_the_table() -> None:
    assert [human_age(s) for s in (5, 75, 7300, 200000)] == ["5s", "1m", "2h", "2d"]
    assert progress_text(45.5) == " 45%"
    assert progress_text(50.0, width=10) == "[#####.....]  50%"
    assert progress_text(None) == "-"
    record = {"id": "f" * 32, "name": "n" * 40, "state": "in_progress", "progress": 12.0, "requests": 3,
              "request_counts": None, "age_s": 90.0, "provider_name": "claude"}  # fmt: skip
    header, line = jobs_table([record])
    assert header.split() == [
        "ID", "NAME", "STATE", "PROGRESS", "REQUESTS", "OK", "FAILED", "AGE", "PROVIDER", "OWNER",
    ]  # fmt: skip
    assert line.split() == ["ffffffff", "n" * 31 + "…", "in_progress", "12%", "3", "-", "-", "1m", "claude", "-"]


async def test_local_backend_calls_are_labelled_local_not_together(enabled: metrics.Metrics) -> None:
    answers = iter([httpx.Response(503), httpx.Response(200, json={"id": "b1", "status": "IN_PROGRESS"})])
    transport = httpx.MockTransport(lambda request: next(answers))

    async def no_wait(_: float) -> None:
        return None

    async with httpx.AsyncClient(transport=transport) as http:
        provider = TogetherProvider(http, api_key="k", base_url="http://local.test", kind="local", sleep=no_wait)
        assert (await provider.get_batch("b1")).id == "b1"
    found = samples(enabled)
    assert found[("batchd_api_calls_total", (("endpoint", "local.get"), ("outcome", "5xx")))] == 1
    assert found[("batchd_api_calls_total", (("endpoint", "local.get"), ("outcome", "2xx")))] == 1
    assert found[("batchd_retries_total", (("what", "local.get"),))] == 1
    assert not [key for key in found if any(v.startswith("together.") for _, v in key[1])]
