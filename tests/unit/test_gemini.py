"""Gemini's lines, batches and answers, without the network: its line rules (through the same
`validate_file` the inbox and `batchd validate` use), its batch objects as they come on the wire,
its answers merged into the outbox in input order, its passing errors resubmitted, its usage
priced, and its config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchd.config import ConfigError, Price, build_settings
from batchd.models import PROVIDER_LIMITS, BatchEndpoint, RemoteStatus
from batchd.pricing import estimate_cost
from batchd.providers.errors import ProviderError
from batchd.providers.gemini import GeminiProvider, model_path, parse_batch, parse_file
from batchd.results import merge_results
from batchd.shards import is_transient, write_followups
from batchd.validation import RULES, Report, validate_file

LIMITS = PROVIDER_LIMITS["gemini"]


def line(key: Any = "k1", **request: Any) -> dict[str, Any]:
    """A valid Gemini batch line; keyword arguments replace keys of `request` (None: remove)."""
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    for name, value in request.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return {"key": key, "request": body}


def check(tmp_path: Path, *lines: Any) -> Report:
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    return validate_file(path, source="batch.jsonl", limits=LIMITS, dialect="gemini")


def rules_of(report: Report) -> list[tuple[int | None, str]]:
    return [(p.line, p.rule) for p in report.problems]


# -- the line rules ----------------------------------------------------------


def test_good_lines_pass_with_the_generate_content_endpoint_and_no_model(tmp_path: Path) -> None:
    report = check(tmp_path, line("a"), line("b b/ü"), line("c" * 200))
    assert report.ok and report.request_count == 3
    # The create call names the model, not the lines.
    assert report.endpoint == BatchEndpoint.GENERATE_CONTENT and report.model is None


@pytest.mark.parametrize("key", ["", 7, None, ["k"]])
def test_key_must_be_a_non_empty_string(tmp_path: Path, key: Any) -> None:
    report = check(tmp_path, line("ok"), line(key))
    assert rules_of(report) == [(2, "key")]


def test_a_missing_key_and_a_duplicate_are_named(tmp_path: Path) -> None:
    report = check(tmp_path, line("same"), {"request": line()["request"]}, line("same"))
    assert rules_of(report) == [(2, "key"), (3, "duplicate_key")]
    assert "line 1" in report.problems[1].message


def test_an_openai_line_says_which_format_is_wanted(tmp_path: Path) -> None:
    openai_line = {"custom_id": "o", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    report = check(tmp_path, openai_line)
    assert rules_of(report) == [(1, "key"), (1, "request")]
    assert '{"key", "request"}' in report.problems[0].message


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ({"key": "a"}, "request"),
        ({"key": "a", "request": "text"}, "request"),
        (line("a", contents=None), "contents"),
        (line("a", contents=[]), "contents"),
        (line("a", contents="hi"), "contents"),
    ],
)
def test_each_rule_of_request(tmp_path: Path, value: dict[str, Any], rule: str) -> None:
    report = check(tmp_path, value)
    assert rules_of(report) == [(1, rule)]
    assert rule in RULES


# -- batches on the wire -----------------------------------------------------


def operation(state: str = "BATCH_STATE_RUNNING", **batch: Any) -> dict[str, Any]:
    metadata = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
        "model": "models/gemini-2.5-flash",
        "displayName": "batchd-0123abcd",
        "inputConfig": {"fileName": "files/in-1"},
        "createTime": "2026-12-07T10:00:00.123456Z",
        "state": state,
        "batchStats": {"requestCount": "5", "successfulRequestCount": "3", "failedRequestCount": "1",
                       "pendingRequestCount": "1"},
        **batch,
    }  # fmt: skip
    return {"name": "batches/b-1", "metadata": metadata, "done": False}


def test_an_operation_is_read_with_its_counts_as_strings_and_the_job_in_its_display_name() -> None:
    batch = parse_batch(operation())
    assert batch.id == "batches/b-1" and batch.status is RemoteStatus.IN_PROGRESS
    assert batch.input_file_id == "files/in-1" and batch.endpoint == BatchEndpoint.GENERATE_CONTENT
    assert batch.request_counts == {"total": 5, "completed": 3, "failed": 1, "pending": 1}
    assert batch.metadata == {"batchd_job_id": "0123abcd"}
    assert batch.created_at is not None and batch.created_at.year == 2026
    assert batch.output_file_id is None


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("BATCH_STATE_PENDING", RemoteStatus.VALIDATING),
        ("JOB_STATE_PENDING", RemoteStatus.VALIDATING),
        ("JOB_STATE_RUNNING", RemoteStatus.IN_PROGRESS),
        ("BATCH_STATE_SUCCEEDED", RemoteStatus.COMPLETED),
        ("JOB_STATE_SUCCEEDED", RemoteStatus.COMPLETED),
        ("BATCH_STATE_FAILED", RemoteStatus.FAILED),
        ("BATCH_STATE_CANCELLED", RemoteStatus.CANCELLED),
        ("JOB_STATE_CANCELLED", RemoteStatus.CANCELLED),
        ("BATCH_STATE_EXPIRED", RemoteStatus.EXPIRED),
    ],
)
def test_both_spellings_of_each_state(state: str, status: RemoteStatus) -> None:
    assert parse_batch(operation(state)).status is status


@pytest.mark.parametrize("state", ["BATCH_STATE_UNSPECIFIED", "RUNNING", None, 3])
def test_an_unknown_state_is_an_error_naming_it(state: Any) -> None:
    with pytest.raises(ProviderError, match="unknown state"):
        parse_batch(operation(state))


def test_the_results_file_is_found_in_the_response_the_output_or_an_sdks_dest() -> None:
    done = operation("BATCH_STATE_SUCCEEDED")
    done["response"] = {"responsesFile": "files/out-1"}
    assert parse_batch(done).output_file_id == "files/out-1"
    assert parse_batch(operation(output={"responsesFile": "files/out-2"})).output_file_id == "files/out-2"
    bare = {"name": "batches/b-2", "state": "JOB_STATE_SUCCEEDED", "dest": {"file_name": "files/out-3"}}
    assert parse_batch(bare).output_file_id == "files/out-3"


def test_a_count_left_out_is_zero_and_a_batch_without_stats_has_no_counts() -> None:
    # Google's JSON leaves zero counts out.
    batch = parse_batch(operation(batchStats={"requestCount": "2", "successfulRequestCount": "2"}))
    assert batch.request_counts == {"total": 2, "completed": 2, "failed": 0, "pending": 0}
    assert parse_batch(operation(batchStats={})).request_counts is None


def test_a_batch_created_elsewhere_names_no_job() -> None:
    assert parse_batch(operation(displayName="my nightly run")).metadata is None


@pytest.mark.parametrize("name", ["batches/../files/x", "files/x", "batches/", "", None, "batches/a?b"])
def test_a_name_that_is_not_a_batch_resource_is_refused(name: Any) -> None:
    with pytest.raises(ProviderError, match="malformed"):
        parse_batch({**operation(), "name": name})


def test_an_upload_answer_names_the_file_and_refuses_an_odd_name() -> None:
    stored = parse_file(
        {"file": {"name": "files/abc", "sizeBytes": "42", "displayName": "x.jsonl"}}, filename="y", size=1
    )
    assert (stored.id, stored.bytes, stored.filename) == ("files/abc", 42, "x.jsonl")
    with pytest.raises(ProviderError):
        parse_file({"file": {"name": "files/../../etc"}}, filename="y", size=1)


def test_model_names_and_base_urls() -> None:
    assert model_path("gemini-2.5-flash") == "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
    assert model_path("models/gemini-2.5-flash") == model_path("gemini-2.5-flash")
    with pytest.raises(ProviderError):
        model_path("models/a/b")
    for url in ("https://g.example", "https://g.example/", "https://g.example/v1beta", "https://g.example/v1/"):
        assert GeminiProvider.normalise_base_url(url) == "https://g.example"


# -- answers into the outbox -------------------------------------------------

USAGE = {"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10}


def ok(key: str) -> bytes:
    response = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": f"re {key}"}]}}],
        "usageMetadata": USAGE,
    }
    return json.dumps({"key": key, "response": response}, separators=(", ", ": ")).encode()


def failed(key: str, code: int, status: str) -> bytes:
    return json.dumps({"key": key, "error": {"code": code, "message": "no", "status": status}}).encode()


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


def test_answers_split_into_output_and_errors_in_input_order_with_usage(tmp_path: Path) -> None:
    upload = write_lines(tmp_path / "upload.jsonl", [json.dumps(line(k)).encode() for k in "abcde"])
    answers = {
        "e": ok("e"),
        "b": failed("b", 429, "RESOURCE_EXHAUSTED"),
        "a": ok("a"),
        "c": failed("c", 400, "INVALID_ARGUMENT"),
    }
    results = write_lines(tmp_path / "results.jsonl", list(answers.values()))
    folder = tmp_path / "outbox"
    folder.mkdir()
    merged = merge_results(
        input_path=upload, answers=[results], folder=folder, unanswered_code="not_returned",
        scratch_dir=tmp_path / "scratch", key="key",
    )  # fmt: skip
    assert (merged.total, merged.completed, merged.failed, merged.unanswered) == (5, 2, 3, 1)
    assert (folder / "output.jsonl").read_bytes().splitlines() == [answers["a"], answers["e"]]
    errors = (folder / "errors.jsonl").read_bytes().splitlines()
    assert errors[:2] == [answers["b"], answers["c"]]  # verbatim, in input order
    # A request never answered gets the synthesized line, keyed as Gemini's lines are.
    assert json.loads(errors[2]) == {
        "key": "d", "response": None,
        "error": {"code": "not_returned", "message": json.loads(errors[2])["error"]["message"]},
    }  # fmt: skip
    assert merged.usage == {key: 2 * value for key, value in USAGE.items()}


@pytest.mark.parametrize(
    ("status", "passing"),
    [("RESOURCE_EXHAUSTED", True), ("UNAVAILABLE", True), ("DEADLINE_EXCEEDED", True), ("INTERNAL", True),
     ("INVALID_ARGUMENT", False), ("PERMISSION_DENIED", False)],
)  # fmt: skip
def test_passing_errors_are_those_gemini_names_passing(status: str, passing: bool) -> None:
    code = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}.get(status, 400)
    assert is_transient(json.loads(failed("k", code, status))) is passing


def test_followups_are_the_passing_failures_and_the_expired_keyed_by_key(tmp_path: Path) -> None:
    requests = [json.dumps(line(k)).encode() for k in "abcd"]
    upload = write_lines(tmp_path / "upload.jsonl", requests)
    expired = json.dumps({"key": "d", "response": None, "error": {"code": "batch_expired", "message": "x"}}).encode()
    errors = write_lines(
        tmp_path / "errors.jsonl", [failed("a", 503, "UNAVAILABLE"), failed("c", 400, "INVALID_ARGUMENT"), expired]
    )
    dest = tmp_path / "round-1.jsonl"
    assert write_followups(upload, errors, dest, key="key") == 2
    assert dest.read_bytes().splitlines() == [requests[0], requests[3]]


def test_usage_metadata_is_priced_with_thoughts_as_output_and_cached_input_at_its_share() -> None:
    usage = {"promptTokenCount": 1_000_000, "cachedContentTokenCount": 400_000, "candidatesTokenCount": 500_000,
             "thoughtsTokenCount": 500_000, "totalTokenCount": 2_000_000}  # fmt: skip
    cost = estimate_cost(usage, Price(input_per_mtok=1.0, output_per_mtok=2.0))
    assert cost is not None
    # 600k full input + 400k cached at a quarter + 1M output.
    assert cost["estimated_usd"] == pytest.approx(0.6 + 0.1 + 2.0)


# -- config ------------------------------------------------------------------


def settings(tmp_path: Path, provider: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    raw = {"state_dir": str(tmp_path), "provider": provider}
    return build_settings(raw, base_dir=tmp_path, environ=environ or {}, config_path=None)


def test_a_gemini_provider_takes_its_key_from_gemini_api_key_and_a_model(tmp_path: Path) -> None:
    built = settings(tmp_path, {"kind": "gemini", "model": "gemini-2.5-flash"}, {"GEMINI_API_KEY": "g"})
    assert built.provider.kind == "gemini" and built.provider.model == "gemini-2.5-flash"
    assert built.provider.base_url == "https://generativelanguage.googleapis.com"
    assert built.provider.api_key.reveal() == "g"
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        settings(tmp_path, {"kind": "gemini"})


def test_only_a_gemini_provider_takes_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"provider\.model: only a gemini provider"):
        settings(tmp_path, {"kind": "openai", "model": "gpt-x"}, {"OPENAI_API_KEY": "o"})
