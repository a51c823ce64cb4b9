"""Claim folders (claims.py), rejected names (rejections.py) and source changes (source_file.py):
the decisions, and the few filesystem moves they make."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from batchd import claims
from batchd.claims import ClaimFolder
from batchd.rejections import REPORT_SUFFIX, rejected_names
from batchd.safe_fs import NAME_MAX
from batchd.source_file import SourceState, describe_change, snapshot

LEASE = 30.0
ME = "me" * 16


def folder(claimer: str | None, age_s: float = 0.0, claim_id: str = "c" * 32) -> ClaimFolder:
    return ClaimFolder(claim_id, Path("/nowhere") / claim_id, claimer, age_s)


@pytest.mark.parametrize(
    ("claim", "daemons", "taking", "expected"),
    [
        # this process's own: abandoned unless a take of it is running now
        (folder(ME), {}, {"c" * 32}, False),
        (folder(ME), {}, set(), True),
        # another daemon's: by what the database says of it, however young the folder
        (folder("peer"), {"peer": "running"}, set(), False),
        (folder("peer", age_s=10 * LEASE), {"peer": "running"}, set(), False),
        (folder("peer"), {"peer": "gone"}, set(), True),
        (folder("peer"), {"peer": "stopped"}, set(), True),
        # no marker (an older release), or a claimer the database does not know: by its age
        (folder(None), {}, set(), False),
        (folder(None, age_s=LEASE), {}, set(), True),
        (folder("stranger", age_s=1.0), {}, set(), False),
        (folder("stranger", age_s=LEASE + 1), {}, set(), True),
    ],
)
def test_a_claim_is_abandoned_only_when_its_claimer_is_known_to_be_gone(
    claim: ClaimFolder, daemons: dict[str, str], taking: set[str], expected: bool
) -> None:
    assert claims.abandoned(claim, me=ME, taking=taking, daemons=daemons, lease_s=LEASE) is expected


def make_claim(root: Path, claimer: str | None) -> ClaimFolder:
    path = root / uuid.uuid4().hex
    path.mkdir(parents=True)
    if claimer is not None:
        claims.write_marker(path, claimer, time.time())
    found = claims.look(path, time.time())
    assert found is not None and found.claimer == claimer
    return found


@pytest.mark.parametrize("claimer", ["gone-daemon", None])
def test_of_two_daemons_taking_over_one_claim_exactly_one_succeeds(tmp_path: Path, claimer: str | None) -> None:
    claim = make_claim(tmp_path, claimer)
    assert claims.take_over(claim, "first", time.time()) is True
    assert claims.take_over(claim, "second", time.time()) is False
    assert claims.read_claimer(claim.path) == "first"


def test_release_gives_back_an_empty_claim_and_keeps_anything_else(tmp_path: Path) -> None:
    empty = make_claim(tmp_path, "d")
    assert claims.release(empty.path) is True and not empty.path.exists()
    other = make_claim(tmp_path, "d")
    (other.path / "data").mkdir()
    assert claims.release(other.path) is False and (other.path / "data").is_dir()


def test_quarantine_moves_the_whole_claim_folder(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    claim = make_claim(inbox / ".batchd" / "claimed", "d")
    (claim.path / "x.jsonl").write_bytes(b"kept")
    dest = claims.quarantine(inbox, claim.path, source="x.jsonl", error=OSError("no"))
    assert dest == inbox / ".batchd" / "quarantine" / claim.id
    assert (dest / "x.jsonl").read_bytes() == b"kept" and not claim.path.exists()


def test_rejected_names_fit_the_filesystem_with_their_report() -> None:
    job_id = "0123456789abcdef" * 2
    assert rejected_names("x.csv", job_id) == ["x.csv", "x.01234567.csv"]
    assert rejected_names("noext", job_id) == ["noext", "noext.01234567"]
    for source in ("a" * 240 + ".jsonl", "é" * 120 + ".jsonl", "b" * 255, "c." + "d" * 250):
        names = rejected_names(source, job_id)
        own = names[-1]
        assert "01234567" in own
        # the report and the temp name it is rewritten through fit too
        assert len(f".{own}{REPORT_SUFFIX}.tmp".encode()) <= NAME_MAX
        own.encode().decode()
    assert rejected_names("a" * 240 + ".jsonl", job_id)[-1].endswith(".01234567.jsonl")


def stat_of(tmp_path: Path, content: bytes) -> os.stat_result:
    path = tmp_path / "f"
    path.write_bytes(content)
    return path.lstat()


def test_describe_change_names_what_happened(tmp_path: Path) -> None:
    now = stat_of(tmp_path, b"abc")
    same = SourceState.of(now)
    assert describe_change(same, now) is None
    assert "grew from 2 to 3 bytes" in str(describe_change(SourceState(2, now.st_mtime_ns), now))
    assert "shrank from 4 to 3" in str(describe_change(SourceState(4, now.st_mtime_ns), now))
    assert "rewritten" in str(describe_change(SourceState(3, now.st_mtime_ns - 1), now))
    assert "gone" in str(describe_change(same, None))


def test_a_snapshot_reads_only_the_size_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"line 1\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(path, "ab") as writer:
            writer.write(b"line 2\n")
        with snapshot(fd, 7) as stream:
            assert stream.read() == b"line 1\n"
    finally:
        os.close(fd)
