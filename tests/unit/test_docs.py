"""The documentation matches the code: every config key, every metric, every JSON field, every link."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from batchd.config import load as config_load
from batchd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: Documented as final while another branch builds them; each entry goes once the code has it
#: (the tests below fail on an entry the code already has, so none outlives its merge).
CONFIG_KEYS_AHEAD_OF_CODE: set[str] = set()
#: Files another branch commits (the status page's screenshot).
LINK_TARGETS_AHEAD_OF_REPO: set[str] = set()
#: `batchd jobs --json` fields another branch adds (`status`, with `state` kept as its alias).
JSON_FIELDS_AHEAD_OF_CODE: set[str] = set()


def _rows(path: Path, heading_level: str = "## ") -> dict[str, list[str]]:
    """The first cell (in backticks) of every table row in `path`, by the heading above it."""
    rows: dict[str, list[str]] = {}
    heading = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(heading_level):
            heading = line[len(heading_level) :].strip()
        found = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if found:
            rows.setdefault(heading, []).append(found.group(1))
    return rows


# ---------------------------------------------------------------- config keys


def code_config_keys() -> set[str]:
    """Every key the loader accepts, spelled as the reference spells it.

    load.py checks every key against these sets before anything is built, so they are what
    the code accepts; a new special table in `_check_known_keys` must be added here too.
    """
    keys = set(config_load._TOP_KEYS)
    keys |= {f"{section}.{key}" for section, names in config_load._SECTION_KEYS.items() for key in names}
    keys |= {f"webhooks.{key}" for key in config_load._WEBHOOK_KEYS}
    keys |= {f"pricing.MODEL.{key}" for key in config_load._PRICE_KEYS}
    keys.add("providers.NAME")  # [providers.NAME] tables take the keys of [provider]
    return keys


def documented_config_keys() -> set[str]:
    return {key for keys in _rows(DOCS / "reference" / "config.md").values() for key in keys}


def test_the_config_reference_documents_exactly_the_keys_the_code_accepts() -> None:
    code = code_config_keys()
    docs = documented_config_keys()
    assert sorted(code - docs) == [], "accepted by the code but missing from docs/reference/config.md"
    assert sorted(docs - code - CONFIG_KEYS_AHEAD_OF_CODE) == [], "documented but not accepted by the code"
    assert sorted(CONFIG_KEYS_AHEAD_OF_CODE & code) == [], "in the code now: remove from CONFIG_KEYS_AHEAD_OF_CODE"


def test_the_loader_has_no_special_table_the_reference_does_not_know() -> None:
    # Tables the loader checks by hand (not through _SECTION_KEYS): each one is documented above.
    special = set(re.findall(r'key == "(\w+)"', inspect.getsource(config_load._check_known_keys)))
    assert special == {"pricing", "providers", "webhooks"}


# ---------------------------------------------------------------- metrics


def code_metrics() -> dict[str, set[str]]:
    """Metric name (as exposed: counters with `_total`) → its label names."""
    metrics: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            name = str(metric._name) + ("_total" if metric._type == "counter" else "")
            metrics[name] = set(metric._labelnames)
    return metrics


def documented_metrics() -> dict[str, set[str]]:
    documented: dict[str, set[str]] = {}
    text = (DOCS / "reference" / "metrics.md").read_text(encoding="utf-8")
    for found in re.finditer(r"^\|\s*`(batchd_\w+)`\s*\|\s*\w+\s*\|([^|]*)\|", text, re.M):
        documented[found.group(1)] = set(re.findall(r"`(\w+)`", found.group(2)))
    return documented


def test_the_metrics_reference_documents_every_metric_and_its_labels() -> None:
    code = code_metrics()
    assert len(code) > 10
    assert code == documented_metrics()


# ---------------------------------------------------------------- JSON fields


def _json_section(heading: str) -> str:
    text = (DOCS / "reference" / "json.md").read_text(encoding="utf-8")
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_json_reference_documents_every_key_of_jobs_and_show() -> None:
    from batchd.cli.records import job_record, show_record
    from batchd.models import JobState
    from tests.unit.test_ops import job, remote

    section = _json_section("batchd jobs --json")
    example = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    finished = job(JobState.COMPLETED, finished_at=1100.0, request_counts={"total": 1})
    record = job_record(finished, [remote(None)], 2000.0)
    assert set(record) <= set(example)
    assert set(example) - set(record) <= JSON_FIELDS_AHEAD_OF_CODE

    documented = set(_rows(DOCS / "reference" / "json.md").get("batchd show --json", []))
    shown = show_record(finished, [remote(100.0)], [], 2000.0)
    nested = {*shown, *shown["timings"], *shown["files"], *shown["remote_batches"][0]}
    assert sorted(nested - documented - set(example)) == []


def test_the_json_reference_documents_every_key_of_job_json_and_webhooks() -> None:
    from batchd.webhooks.events import webhook_data

    documented = set(_rows(DOCS / "reference" / "json.md").get("job.json", []))
    source = inspect.getsource(__import__("batchd.outbox", fromlist=["job_document"]).job_document)
    keys = set(re.findall(r'^\s+"(\w+)":', source, re.M))
    assert keys and sorted(keys - documented) == []
    data = webhook_data({key: None for key in keys})
    assert sorted(set(data) - documented) == []


# ---------------------------------------------------------------- links


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of `path`, and explicit `<a id>`s."""
    found: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = heading.group(1).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            found.add(slug)
        found |= set(re.findall(r'<a id="([^"]+)"', line))
    return found


def links(path: Path) -> list[str]:
    """Every Markdown link target in `path`, outside code blocks and code spans."""
    targets: list[str] = []
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        targets += re.findall(r"\]\(([^)\s]+)\)", line)
    return targets


def test_no_link_in_the_documentation_points_at_nothing() -> None:
    broken = []
    for path in markdown_files():
        for target in links(path):
            if re.match(r"(https?|mailto):", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            shown = f"{path.relative_to(ROOT)}: {target}"
            relative = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                if relative not in LINK_TARGETS_AHEAD_OF_REPO:
                    broken.append(shown)
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(shown + " (no such heading)")
    assert broken == []
    present = [name for name in LINK_TARGETS_AHEAD_OF_REPO if (ROOT / name).exists()]
    assert present == [], "in the repository now: remove from LINK_TARGETS_AHEAD_OF_REPO"


def test_the_link_checker_sees_links_and_anchors() -> None:
    readme_links = links(ROOT / "README.md")
    assert "docs/design.md" in readme_links and "docs/reference/config.md" in readme_links
    assert "past-the-limits-shards-and-follow-up-rounds" in anchors(DOCS / "design.md")
