"""The seed's BatchJob, normalised from either wire dialect; BatchJobStatus equal to either spelling."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from batchd import BatchEndpoint, BatchJob, BatchJobStatus, BatchRequest
from batchd.client import AsyncClient, batch_job
from batchd.providers.openai import parse_batch
from batchd.providers.together import parse_batch_job

T0 = 1764100000
SEED_FIELDS = [
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
]


def test_batch_job_has_every_field_of_the_seed() -> None:
    names = [f.name for f in dataclasses.fields(BatchJob)]
    assert names[: len(SEED_FIELDS)] == SEED_FIELDS


@pytest.mark.parametrize("spelling", ["COMPLETED", "completed", "Completed"])
def test_status_equals_either_spelling(spelling: str) -> None:
    status = BatchJobStatus("completed")
    assert status == spelling and spelling == status
    assert (status != spelling) is False
    assert status != "FAILED" and status != "failed"
    assert status in ("FAILED", spelling)
    assert str(status) == f"{status}" == "completed"
    assert status == BatchJobStatus.COMPLETED == BatchJobStatus(spelling)
    assert hash(status) == hash("completed")
    by_value: dict[str, int] = {status: 1}
    assert by_value["completed"] == 1
    assert status != 1


def test_status_from_the_wire_spellings() -> None:
    assert BatchJobStatus("IN_PROGRESS") is BatchJobStatus.IN_PROGRESS
    assert BatchJobStatus("CANCELING") is BatchJobStatus.CANCELLING
    with pytest.raises(ValueError):
        BatchJobStatus("paused")


def test_seed_constants() -> None:
    assert [m.value for m in BatchJobStatus] == [
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    assert BatchEndpoint.CHAT_COMPLETIONS == "/v1/chat/completions"
    assert BatchEndpoint.COMPLETIONS == "/v1/completions"
    assert BatchEndpoint.EMBEDDINGS == "/v1/embeddings"
    request = BatchRequest("r1", "POST", BatchEndpoint.CHAT_COMPLETIONS, {"model": "m", "messages": []})
    assert request.to_dict() == {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": []},
    }


def openai_batch(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": "completed",
        "output_file_id": "file-out",
        "error_file_id": "",
        "created_at": T0,
        "in_progress_at": T0 + 1,
        "expires_at": T0 + 86400,
        "finalizing_at": T0 + 8,
        "completed_at": T0 + 9,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 2, "completed": 2, "failed": 0},
        "metadata": {"batchd_job_id": "j"},
    }
    body.update(overrides)
    return body


def together_job(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "b-1",
        "user_id": "u",
        "input_file_id": "file-in",
        "file_size_bytes": 170,
        "status": "COMPLETED",
        "job_deadline": "2025-11-26T19:46:40Z",
        "created_at": "2025-11-25T19:46:40Z",
        "endpoint": "/v1/chat/completions",
        "progress": 100.0,
        "model_id": None,
        "output_file_id": "file-out",
        "error_file_id": None,
        "error": None,
        "completed_at": "2025-11-25T19:46:50Z",
    }
    body.update(overrides)
    return body


def test_from_openai() -> None:
    job = batch_job(parse_batch(openai_batch()))
    assert dataclasses.asdict(job) == {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": "completed",
        "output_file_id": "file-out",
        "error_file_id": None,
        "created_at": T0,
        "in_progress_at": T0 + 1,
        "expires_at": T0 + 86400,
        "finalizing_at": T0 + 8,
        "completed_at": T0 + 9,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 2, "completed": 2, "failed": 0},
        "progress": None,
        "metadata": {"batchd_job_id": "j"},
    }
    assert job.status is BatchJobStatus.COMPLETED


def test_from_openai_failed_keeps_its_errors() -> None:
    errors = {"object": "list", "data": [{"code": "bad", "line": 3, "message": "no custom_id", "param": None}]}
    job = batch_job(parse_batch(openai_batch(status="failed", completed_at=None, failed_at=T0 + 2, errors=errors)))
    assert job.status == "FAILED"
    assert (job.failed_at, job.completed_at) == (T0 + 2, None)
    assert job.errors == errors


def test_from_together() -> None:
    job = batch_job(parse_batch_job(together_job()))
    assert job.status == "COMPLETED" and job.status is BatchJobStatus.COMPLETED
    assert job.object == "batch"
    assert job.created_at == T0
    assert job.expires_at == T0 + 86400
    assert job.completed_at == T0 + 10
    assert job.completion_window == "24h"
    assert job.request_counts is None
    assert job.progress == 100.0
    assert job.errors is None and job.error_file_id is None
    assert (job.in_progress_at, job.finalizing_at, job.failed_at) == (None, None, None)


@pytest.mark.parametrize(
    ("status", "field"), [("FAILED", "failed_at"), ("EXPIRED", "expired_at"), ("CANCELLED", "cancelled_at")]
)
def test_together_finish_time_goes_under_its_status(status: str, field: str) -> None:
    job = batch_job(parse_batch_job(together_job(status=status, error="the input was malformed")))
    assert getattr(job, field) == T0 + 10
    assert job.completed_at is None
    assert job.errors == {
        "object": "list",
        "data": [{"code": None, "line": None, "message": "the input was malformed", "param": None}],
    }


def test_together_window_from_its_deadline() -> None:
    job = batch_job(parse_batch_job(together_job(job_deadline="2025-11-25T21:46:40Z")))
    assert job.completion_window == "2h"


def test_client_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="TOGETHER_API_KEY"):
        AsyncClient()
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        AsyncClient(provider="openai")
    with pytest.raises(ValueError, match="provider"):
        AsyncClient(api_key="k", provider="anthropic")  # type: ignore[arg-type]
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    assert AsyncClient().base_url == "https://api.together.ai"
    assert AsyncClient(provider="openai").base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("TOGETHER_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/openai/v1/")
    assert AsyncClient().base_url == "http://127.0.0.1:9"
    assert AsyncClient(provider="openai").base_url == "http://127.0.0.1:9/openai/v1"
    # Arguments win over the environment.
    assert AsyncClient(base_url="http://example.test").base_url == "http://example.test"
    client = AsyncClient(api_key="explicit-secret")
    assert "secret" not in repr(client) and "explicit" not in repr(client)
