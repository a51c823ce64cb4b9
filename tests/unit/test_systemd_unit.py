"""systemd/batchd.service: the keys DESIGN §9 and docs/systemd.md promise, and systemd's own verdict on it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "batchd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value in order (a unit file may repeat a key; configparser cannot)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        sections[current][key.strip()].append(value.strip())
    return sections


def one(values: dict[str, list[str]], key: str) -> str:
    assert key in values, f"{key}= is missing"
    return values[key][-1]


def test_the_unit_has_every_promised_key() -> None:
    unit = parse_unit(UNIT)
    service = unit["Service"]
    assert one(service, "Type") in ("notify", "notify-reload")
    assert one(service, "NotifyAccess") == "main"
    exec_start = one(service, "ExecStart").split()
    assert exec_start[0].startswith("/") and exec_start[0].endswith("/batchd")
    assert exec_start[1:] == ["run", "--config", "/etc/batchd/batchd.toml"]
    assert one(service, "Restart") == "on-failure"
    assert re.fullmatch(r"[0-9]+s?", one(service, "WatchdogSec"))
    assert one(service, "StateDirectory") == "batchd"
    assert one(service, "ConfigurationDirectory") == "batchd"
    assert (one(service, "User"), one(service, "Group")) == ("batchd", "batchd")
    # Stopping: batchd exits within 10 s of SIGTERM (DESIGN §7); systemd must wait at least that long.
    assert int(one(service, "TimeoutStopSec").rstrip("s")) >= 10
    assert "HUP" in one(service, "ExecReload")

    credentials = dict(v.split(":", 1) for v in service["LoadCredential"])
    assert set(credentials) == {"together_api_key", "webhook_secret", "spec_webhook_secret"}
    assert all(path.startswith("/etc/batchd/credentials/") for path in credentials.values())
    # Each has a fallback, so a missing file does not stop the unit from starting.
    assert {v.split(":", 1)[0] for v in service["SetCredential"]} == set(credentials)

    assert one(service, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "NoNewPrivileges") == "yes"
    assert one(service, "CapabilityBoundingSet") == ""
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_the_config_the_unit_reads_points_at_its_credentials() -> None:
    config = (ROOT / "config" / "batchd.toml").read_text(encoding="utf-8")
    for name in ("together_api_key", "webhook_secret", "spec_webhook_secret"):
        assert f"${{CREDENTIALS_DIRECTORY}}/{name}" in config


def test_sysusers_and_tmpfiles_give_a_setgid_sticky_group_writable_inbox() -> None:
    sysusers = (ROOT / "systemd" / "batchd.sysusers.conf").read_text(encoding="utf-8")
    assert re.search(r"^g batchd ", sysusers, re.M) and re.search(r"^u batchd ", sysusers, re.M)
    tmpfiles = (ROOT / "systemd" / "batchd.tmpfiles.conf").read_text(encoding="utf-8")
    inbox = re.search(r"^d /var/lib/batchd/inbox\s+(\d+)\s+(\S+)\s+(\S+)", tmpfiles, re.M)
    assert inbox is not None
    mode, user, group = inbox.groups()
    # 3770 (DESIGN §9): setgid keeps the group of dropped files; sticky keeps members from
    # renaming each other's entries or batchd's folders (rejected/, .batchd/) to plant symlinks.
    assert (int(mode, 8), user, group) == (0o3770, "batchd", "batchd")


def test_the_systemd_guide_installs_the_files_that_exist() -> None:
    guide = (ROOT / "docs" / "systemd.md").read_text(encoding="utf-8")
    section = guide.split("## Install", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(?<![/\w])((?:systemd|config)/[\w.]+)", section))
    assert {"systemd/batchd.service", "systemd/batchd.sysusers.conf", "config/batchd.toml"} <= named
    for name in named:
        assert (ROOT / name).is_file(), name
    assert "systemctl enable --now batchd" in section


@needs_analyze
def test_systemd_analyze_security_rates_the_exposure_at_two_or_less(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for batchd\.service: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout
    # The families batchd needs stay allowed: these two checks must be the ones still open.
    assert re.search(r"✗ RestrictAddressFamilies=~AF_\(INET\|INET6\)", done.stdout)
    assert "Invalid syntax" not in done.stderr and "Unknown key" not in done.stderr, done.stderr


@needs_analyze
def test_systemd_analyze_verify_finds_nothing_but_the_absent_binary(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]  # fmt: skip
    assert problems == []
