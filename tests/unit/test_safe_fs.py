"""safe_fs and durable_files: nothing planted is followed, nothing is deleted, modes are exact.

The tests run as root, whom permissions do not stop: they check where writes land, the
modes of what is created, and that symlinks are not followed, not EACCES. "Owned by
someone else" is made with chown.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd import durable_files
from batchd.durable_files import atomic_file, write_atomic
from batchd.safe_fs import (
    DIR_MODE,
    FILE_MODE,
    NAME_MAX,
    NotRegularFile,
    PlantedEntry,
    check_within,
    create_new,
    fit_name,
    make_dirs,
    open_regular,
    real_dir,
    remove_own_files,
)

STRANGER = 4242


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 000, so that only explicit modes can explain what is found."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file outside every folder batchd writes into: it must never change."""
    path = tmp_path / "outside" / "sentinel"
    path.parent.mkdir()
    path.write_bytes(b"untouched")
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def planted(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".planted-" in p.name)


def test_create_new_makes_exactly_its_mode_whatever_the_umask(tmp_path: Path, no_umask: None) -> None:
    os.close(create_new(tmp_path / "f"))
    os.close(create_new(tmp_path / "secret", 0o600))
    assert (mode_of(tmp_path / "f"), mode_of(tmp_path / "secret")) == (FILE_MODE, 0o600)


@pytest.mark.parametrize("dangling", [False, True])
def test_create_new_refuses_a_symlink_and_never_writes_through_it(
    tmp_path: Path, sentinel: Path, dangling: bool
) -> None:
    target = tmp_path / "outside" / "nothing-yet" if dangling else sentinel
    (tmp_path / "report").symlink_to(target)
    with pytest.raises(FileExistsError):
        create_new(tmp_path / "report")
    assert sentinel.read_bytes() == b"untouched"
    assert not (tmp_path / "outside" / "nothing-yet").exists()


def test_a_fixed_temp_name_replaces_our_leftover_and_moves_a_planted_symlink_aside(
    tmp_path: Path, sentinel: Path
) -> None:
    (tmp_path / ".a.tmp").write_bytes(b"half a file from a crash")
    os.close(create_new(tmp_path / ".a.tmp", replace_own=True))
    assert (tmp_path / ".a.tmp").read_bytes() == b""
    (tmp_path / ".b.tmp").symlink_to(sentinel)
    os.close(create_new(tmp_path / ".b.tmp", replace_own=True))
    (aside,) = planted(tmp_path)
    assert aside.name.startswith(".b.tmp.planted-") and aside.readlink() == sentinel
    assert sentinel.read_bytes() == b"untouched"


def test_a_hard_link_at_a_temp_name_is_moved_aside_not_truncated(tmp_path: Path, sentinel: Path) -> None:
    os.link(sentinel, tmp_path / ".c.tmp")
    os.close(create_new(tmp_path / ".c.tmp", replace_own=True))
    assert sentinel.read_bytes() == b"untouched" and len(planted(tmp_path)) == 1


def test_atomic_file_through_a_planted_temp_symlink_writes_only_its_own_file(
    tmp_path: Path, sentinel: Path, no_umask: None
) -> None:
    (tmp_path / ".job.json.tmp").symlink_to(sentinel)
    write_atomic(tmp_path / "job.json", b"{}")
    assert (tmp_path / "job.json").read_bytes() == b"{}" and mode_of(tmp_path / "job.json") == FILE_MODE
    assert sentinel.read_bytes() == b"untouched"
    assert [p.readlink() for p in planted(tmp_path)] == [sentinel]


def test_atomic_file_replaces_a_symlink_at_its_destination_without_following_it(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "out.jsonl").symlink_to(sentinel)
    with atomic_file(tmp_path / "out.jsonl") as out:
        out.write(b"mine\n")
    assert not (tmp_path / "out.jsonl").is_symlink() and (tmp_path / "out.jsonl").read_bytes() == b"mine\n"
    assert sentinel.read_bytes() == b"untouched"


def test_real_dir_makes_its_mode_and_tightens_an_old_loose_folder(tmp_path: Path, no_umask: None) -> None:
    made = real_dir(tmp_path / "new")
    assert mode_of(made) & 0o777 == DIR_MODE & 0o777
    loose = tmp_path / "loose"
    loose.mkdir(0o777)
    real_dir(loose)
    assert mode_of(loose) & 0o777 == 0o750


@pytest.mark.parametrize("impostor", ["symlink", "file", "stranger's folder"])
def test_real_dir_moves_an_impostor_aside_and_replaces_it(tmp_path: Path, sentinel: Path, impostor: str) -> None:
    folder = tmp_path / "rejected"
    if impostor == "symlink":
        folder.symlink_to(sentinel.parent)
    elif impostor == "file":
        folder.write_bytes(b"a file")
    else:
        folder.mkdir()
        (folder / "x.errors.txt").symlink_to(sentinel)
        os.chown(folder, STRANGER, STRANGER)
    real_dir(folder)
    assert folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.geteuid()
    assert list(folder.iterdir()) == []
    (aside,) = planted(tmp_path)
    assert aside.name.startswith("rejected.planted-")
    assert sentinel.read_bytes() == b"untouched" and sorted(sentinel.parent.iterdir()) == [sentinel]


def test_make_dirs_checks_every_level(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / ".batchd").mkdir()
    (tmp_path / ".batchd" / "work").symlink_to(sentinel.parent)
    work = make_dirs(tmp_path, [".batchd", "work", "job"])
    assert work == tmp_path / ".batchd" / "work" / "job" and work.is_dir()
    assert sorted(sentinel.parent.iterdir()) == [sentinel]


def test_open_regular_reads_a_file_and_refuses_the_rest(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "ok").write_bytes(b"data")
    fd = open_regular(tmp_path / "ok")
    assert os.read(fd, 10) == b"data"
    os.close(fd)
    (tmp_path / "link").symlink_to(sentinel)
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would wait for ever
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir"):
        with pytest.raises(NotRegularFile):
            open_regular(tmp_path / name)


def test_check_within_refuses_a_symlink_on_the_way(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / ".batchd" / "claimed" / "j").mkdir(parents=True)
    (tmp_path / ".batchd" / "claimed" / "j" / ".upload.jsonl").write_bytes(b"x")
    check_within(tmp_path, tmp_path / ".batchd" / "claimed" / "j" / ".upload.jsonl")
    (tmp_path / ".batchd" / "work").symlink_to(sentinel.parent)
    with pytest.raises(PlantedEntry):
        check_within(tmp_path, tmp_path / ".batchd" / "work" / "sentinel")
    (tmp_path / ".batchd" / "claimed" / "j" / "link.jsonl").symlink_to(sentinel)
    with pytest.raises(PlantedEntry):
        check_within(tmp_path, tmp_path / ".batchd" / "claimed" / "j" / "link.jsonl")


def test_remove_own_files_takes_only_regular_files_and_never_follows_a_symlink(tmp_path: Path, sentinel: Path) -> None:
    folder = make_dirs(tmp_path, [".batchd", "work", "job"])
    for name in ("round-1.jsonl", "batch-3.output.jsonl", "retry.jsonl"):
        (folder / name).write_text("x")
    (folder / "link").symlink_to(sentinel)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner").write_text("x")
    remove_own_files(folder, keep={"retry.jsonl"})
    assert sorted(p.name for p in folder.iterdir()) == ["link", "retry.jsonl", "sub"]
    assert (folder / "sub" / "inner").exists() and sentinel.read_bytes() == b"untouched"


def test_remove_own_files_removes_the_folder_once_empty_and_refuses_a_symlinked_one(
    tmp_path: Path, sentinel: Path
) -> None:
    folder = make_dirs(tmp_path, [".batchd", "work", "job"])
    (folder / "round-1.jsonl").write_text("x")
    remove_own_files(folder)
    assert not folder.exists()
    remove_own_files(folder)  # gone already: nothing to do
    swapped = tmp_path / ".batchd" / "work" / "swapped"
    swapped.symlink_to(sentinel.parent)
    with pytest.raises(OSError):
        remove_own_files(swapped)
    assert sentinel.read_bytes() == b"untouched"


def test_fit_name_keeps_the_extension_and_whole_characters() -> None:
    long = "é" * 200 + ".jsonl"
    fitted = fit_name(long, extra=16)
    assert fitted.endswith(".jsonl") and len(fitted.encode()) <= NAME_MAX - 16
    fitted.encode().decode()  # whole characters only
    assert fit_name("short.jsonl", extra=16) == "short.jsonl"


def test_files_written_without_their_fsyncs_are_made_durable_together_or_the_failure_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = durable_files._fsync

    def counted(path: Path, flags: int = os.O_NOFOLLOW) -> None:
        synced.append(path)
        real(path, flags)

    monkeypatch.setattr(durable_files, "_fsync", counted)
    paths = []
    for i in range(5):
        folder = tmp_path / f"claim-{i}"
        folder.mkdir()
        with atomic_file(folder / "copy.jsonl", durable=False) as out:
            out.write(b"{}\n")
        paths.append(folder / "copy.jsonl")
    assert synced == []  # not durable yet: the caller's make_durable is
    durable_files.make_durable(paths)
    assert sorted(synced) == sorted([*paths, *(p.parent for p in paths)])
    paths[2].unlink()
    with pytest.raises(FileNotFoundError):
        durable_files.make_durable(paths)
