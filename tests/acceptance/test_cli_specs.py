"""`batchd validate` and `batchd submit` take a spec (`NAME.json`) as the inbox does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.acceptance.conftest import chat
from tests.acceptance.test_cli import batchd, local_config, write_jsonl


def make_spec(folder: Path, spec: dict[str, Any], lines: list[dict[str, Any]] | None = None) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data" / "job.jsonl", lines if lines is not None else [chat("a"), chat("b")])
    path = folder / "job.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def test_validate_a_good_spec_checks_its_data_and_names_its_provider(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"input": "data/job.jsonl", "metadata": {"k": "v"}})
    result = batchd("validate", str(spec))
    assert result.returncode == 0, result.stdout
    assert "valid spec" in result.stdout and "data/job.jsonl" in result.stdout and "2 requests" in result.stdout
    as_json = json.loads(batchd("validate", "--json", str(spec)).stdout)
    assert (as_json["spec"], as_json["provider"], as_json["ok"], as_json["request_count"]) == (
        "job.json", "default", True, 2,
    )  # fmt: skip


def test_validate_a_spec_with_bad_data_names_the_data_file_and_its_lines(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, {"input": "data/job.jsonl"}, [chat("a"), {"custom_id": "b"}])
    result = batchd("validate", str(spec))
    assert result.returncode == 1
    assert "job.json: its input data/job.jsonl is not valid" in result.stdout and "line 2" in result.stdout
    problems = json.loads(batchd("validate", "--json", str(spec)).stdout)["problems"]
    assert {p["line"] for p in problems} == {2}


def test_validate_refuses_each_bad_spec_naming_the_rule(tmp_path: Path) -> None:
    cases = {
        "input": {"input": "../elsewhere.jsonl"},
        "provider": {"input": "data/job.jsonl", "provider": "nowhere"},
        "spec": {"input": "data/job.jsonl", "colour": "blue"},
        "priority": {"input": "data/job.jsonl", "priority": "high"},
    }
    for rule, body in cases.items():
        spec = make_spec(tmp_path / rule, body)
        result = batchd("validate", "--json", str(spec))
        assert result.returncode == 1, rule
        (problem,) = json.loads(result.stdout)["problems"]
        assert problem["rule"] == rule and problem["line"] is None
    missing = make_spec(tmp_path / "missing", {"input": "data/nope.jsonl"})
    text = batchd("validate", str(missing)).stdout
    assert "job.json" in text and "input: data/nope.jsonl does not exist" in text
    # A spec is JSON, not JSONL: its keys are not mistaken for a request line's.
    assert "custom_id" not in text


def test_submit_a_spec_copies_its_data_first_then_the_spec(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    spec = make_spec(tmp_path / "mine", {"input": "data/job.jsonl"})
    result = batchd("--config", str(config), "submit", str(spec), "--name", "nightly")
    assert result.returncode == 0, result.stderr
    inbox = tmp_path / "state" / "inbox"
    assert (inbox / "nightly.json").read_bytes() == spec.read_bytes()
    assert (inbox / "data" / "job.jsonl").read_bytes() == (tmp_path / "mine" / "data" / "job.jsonl").read_bytes()
    assert sorted(p.name for p in inbox.rglob("*")) == ["data", "job.jsonl", "nightly.json"]  # no temporaries
    assert "no batchd daemon runs" in result.stdout

    # The data path is taken now: a second copy would replace a file the first spec needs.
    again = batchd("--config", str(config), "submit", str(spec), "--name", "other")
    assert again.returncode == 1 and "already waiting" in again.stderr
    assert not (inbox / "other.json").exists()


def test_submit_never_writes_through_a_folder_planted_as_a_symlink_in_the_inbox(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / "data").symlink_to(elsewhere)  # a neighbour's plant, where the spec's data would go
    spec = make_spec(tmp_path / "mine", {"input": "data/job.jsonl"})
    result = batchd("--config", str(config), "submit", str(spec))
    assert result.returncode == 1 and "symlinks are not followed" in result.stderr
    assert list(elsewhere.iterdir()) == [] and not (inbox / "job.json").exists()


def test_validate_for_a_gemini_provider_wants_a_model_from_the_spec_or_the_config(tmp_path: Path) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text('state_dir = "state"\n[provider]\nkind = "gemini"\n', encoding="utf-8")
    env = {"BATCHD_CONFIG": str(config), "GEMINI_API_KEY": "g"}
    lines = [{"key": "a", "request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}}]
    bare = write_jsonl(tmp_path / "bare.jsonl", lines)
    result = batchd("validate", "--json", str(bare), env=env)
    assert result.returncode == 1, result.stdout
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["rule"] == "model" and "spec" in problem["message"] and "config" in problem["message"]
    # The same lines with a spec naming the model are valid: Gemini's rules, not OpenAI's.
    spec = make_spec(tmp_path / "with", {"input": "data/job.jsonl", "model": "gemini-2.5-flash"}, lines)
    result = batchd("validate", str(spec), env=env)
    assert result.returncode == 0, result.stdout
