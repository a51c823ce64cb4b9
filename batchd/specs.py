"""Specs (DESIGN §3): `NAME.json`, naming a data file in a sub-folder of the inbox and settings.

A spec is read through a descriptor opened without following a symlink, and its data file
is reached folder by folder the same way: a folder swapped for a symlink between the checks
and the reads is refused, never followed. The data file joins its spec in the claim folder
once it passed its checks; when a spec is rejected, its data file is left where it is.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from batchd.config import DEFAULT_PROVIDER, ProviderSettings, Settings
from batchd.rejections import on_line, whole_file
from batchd.safe_fs import NotRegularFile, open_folder, open_regular, real_dir
from batchd.webhooks import webhook_url_refusal

__all__ = [
    "MAX_SPEC_BYTES", "SPEC_KEYS", "Spec", "input_path", "is_ignored_name", "move_data", "open_data", "read_spec",
    "spec_data",
]  # fmt: skip

SPEC_KEYS = frozenset({"input", "completion_window", "model", "webhook_url", "metadata", "provider", "priority"})
#: A spec is a small JSON document; anything bigger is a mistake, not a spec.
MAX_SPEC_BYTES = 1_000_000


def is_ignored_name(name: str) -> bool:
    """Names the producer protocol keeps out of batchd's way (DESIGN §3)."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


@dataclass(frozen=True)
class Spec:
    """A parsed `NAME.json` spec."""

    input: str
    completion_window: str | None = None
    model: str | None = None
    webhook_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: the configured provider it goes to (DEFAULT_PROVIDER: [provider])
    provider: str = DEFAULT_PROVIDER
    #: its place among jobs waiting for admission, higher first (read and checked; admission
    #: control, which uses it, is to come)
    priority: int = 0


def read_spec(claimed: Path, settings: Settings) -> Spec:
    """Parse a claimed spec; raises Rejection naming what is wrong with it."""
    source = claimed.name
    with os.fdopen(open_regular(claimed), "rb") as stream:
        content = stream.read(MAX_SPEC_BYTES + 1)
    if len(content) > MAX_SPEC_BYTES:
        raise whole_file(source, "spec", f"a spec is at most {MAX_SPEC_BYTES} bytes")
    try:
        raw = json.loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise whole_file(source, "encoding", "a spec must be UTF-8") from None
    except json.JSONDecodeError as exc:
        raise on_line(source, exc.lineno, "json", f"not valid JSON ({exc.msg})") from None
    # Anything json.loads raises is the spec's fault (too deeply nested, an integer over
    # Python's digit limit); escaping as an exception would stop intake, and recover()
    # would meet the same claimed spec at every start.
    except RecursionError:
        raise whole_file(source, "json", "not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise whole_file(source, "json", f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise whole_file(source, "spec", "a spec must be a JSON object")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise whole_file(source, "spec", f"unknown key(s) {', '.join(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    data_path = raw.get("input")
    if not isinstance(data_path, str) or not data_path:
        raise whole_file(source, "input", "`input` (the JSONL file, relative to the inbox) is required")
    window = raw.get("completion_window")
    # isascii: str.isdigit() also accepts digits such as "²" that no provider reads as a number.
    if window is not None and (
        not isinstance(window, str)
        or not (window[:-1].isascii() and window[:-1].isdigit())
        or window[-1:] not in ("h", "d")
    ):
        raise whole_file(source, "completion_window", 'must look like "24h"')
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise whole_file(source, "model", "must be a non-empty string")
    meta = raw.get("metadata", {})
    if not isinstance(meta, dict):
        raise whole_file(source, "metadata", "must be a JSON object")
    url = raw.get("webhook_url")
    if url is not None and not isinstance(url, str):
        raise whole_file(source, "webhook_url", f"{url!r} is not a URL string")
    refused = None if url is None else webhook_url_refusal(url, settings.inbox.allow_webhook_urls)
    if refused is not None:
        raise whole_file(source, "webhook_url", refused)
    provider = raw.get("provider", DEFAULT_PROVIDER)
    if not isinstance(provider, str) or settings.provider_named(provider) is None:
        known = ", ".join(settings.provider_names)
        raise whole_file(source, "provider", f"no provider is configured as {provider!r} (configured: {known})")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise whole_file(source, "priority", f"must be an integer, not {priority!r}")
    return Spec(
        input=data_path, completion_window=window, model=model, webhook_url=url, metadata=meta,
        provider=provider, priority=priority,
    )  # fmt: skip


def spec_data(inbox_dir: Path, claimed: Path, spec: Spec) -> Path:
    """The spec's data file: inside a sub-folder of the inbox, no `..`, no symlink, existing."""
    # After a crash the data may already sit in the claim folder.
    already = claimed.parent / "data" / PurePosixPath(spec.input).name
    if already.is_file() and not already.is_symlink():
        return already
    return input_path(inbox_dir, claimed.name, spec)


def input_path(base_dir: Path, source: str, spec: Spec) -> Path:
    """The data file a spec names under `base_dir` (the inbox; for `batchd validate`, the spec's
    own folder), checked by the inbox's rules: inside a sub-folder, no `..`, no symlink, a
    regular `.jsonl` file that exists. Raises Rejection naming the rule."""
    rel = PurePosixPath(spec.input)
    if rel.is_absolute() or "\\" in spec.input:
        raise whole_file(source, "input", "must be a path relative to the inbox, not absolute")
    if any(part in ("..", ".") for part in rel.parts) or len(rel.parts) < 2:
        raise whole_file(source, "input", "must name a file inside a sub-folder of the inbox, without `..`")
    if rel.parts[0] in (".batchd", "rejected") or any(is_ignored_name(p) for p in rel.parts):
        raise whole_file(source, "input", f"{spec.input!r} is in a folder batchd does not take from")
    current = base_dir
    for part in rel.parts:
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            raise whole_file(source, "input", f"{spec.input} does not exist") from None
        if stat.S_ISLNK(mode):
            raise whole_file(source, "input", f"{spec.input}: symlinks are not followed")
    if not stat.S_ISREG(current.lstat().st_mode):
        raise whole_file(source, "input", f"{spec.input} is not a regular file")
    if current.suffix != ".jsonl":
        raise whole_file(source, "input", f"{spec.input} must be a .jsonl file")
    return current


def _data_parent(inbox_dir: Path, claimed: Path, data: Path) -> int:
    """A descriptor of the folder holding a spec's data file in the inbox, reached folder by
    folder without following a symlink (one swapped in since `spec_data` looked is refused)."""
    try:
        return open_folder(inbox_dir, data.relative_to(inbox_dir).parts[:-1])
    except NotRegularFile as exc:
        raise whole_file(claimed.name, "input", str(exc)) from None


def open_data(inbox_dir: Path, claimed: Path, data: Path) -> int:
    """Open a spec's data file for reading (see `_data_parent`)."""
    if data.parent == claimed.parent / "data":
        return open_regular(data)
    parent = _data_parent(inbox_dir, claimed, data)
    try:
        return open_regular(Path(data.name), dir_fd=parent)
    except NotRegularFile:
        raise whole_file(
            claimed.name, "input", f"{data.relative_to(inbox_dir).as_posix()} is not a regular file"
        ) from None
    finally:
        os.close(parent)


def move_data(inbox_dir: Path, claimed: Path, data: Path, fd: int) -> Path:
    """Rename the data file that `fd` reads into the claim folder; return where it is now."""
    if data.parent == claimed.parent / "data":
        return data
    source = claimed.name
    shown = data.relative_to(inbox_dir).as_posix()
    folder = real_dir(claimed.parent / "data")
    moved = folder / data.name
    parent = _data_parent(inbox_dir, claimed, data)
    try:
        os.rename(data.name, moved, src_dir_fd=parent)
    except FileNotFoundError:
        # Gone since it was checked: another spec naming the same file claimed it first
        # (takes run in parallel). A rejection, not an error that leaves this spec
        # claimed without a job until the next start.
        folder.rmdir()
        raise whole_file(source, "input", f"{shown} does not exist (any more)") from None
    finally:
        os.close(parent)
    opened, now = os.fstat(fd), os.lstat(moved)
    if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
        # Swapped for another file between the read and the rename: that one is not taken.
        raise whole_file(source, "input", f"{shown} was replaced while batchd was taking it")
    return moved


def batch_model(provider: ProviderSettings, spec: Spec | None, source: str) -> str | None:
    """The model a Gemini batch is created for (Gemini names it in the create call, not on each
    line): the spec's, else the provider's `model`; a Rejection naming both when neither says.
    None for the other kinds, whose lines name their model. Named without Gemini's `models/`
    prefix, as `[pricing]` names it."""
    if provider.kind != "gemini":
        return None
    model = ((spec.model if spec else None) or provider.model).removeprefix("models/")
    if not model:
        where = "its spec's" if spec else "a spec's"
        raise whole_file(
            source,
            "model",
            f'a Gemini batch is created for one model, named by {where} "model" or by the provider\'s '
            "`model` in the config; neither names one",
        )
    return model
