"""The daemon's local backend in process: a token per start in a 0600 file, needed on every route,
given to the provider and kept out of the logs; the token file never written through a symlink."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from batchd import logs
from batchd.config import Settings, load_settings
from batchd.local_backend import open_local_backend, read_token, token_path, write_token
from tests.integration.emulator_helpers import request_line, to_jsonl


def settings_in(tmp_path: Path) -> Settings:
    config = tmp_path / "batchd.toml"
    config.write_text('state_dir = "state"\n', encoding="utf-8")
    return load_settings(config, environ={})


def test_the_token_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_token(tmp_path / "local", "first-token-value")
    finally:
        os.umask(old)
    path = token_path(tmp_path / "local")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "local").stat().st_mode) == 0o700
    assert read_token(tmp_path / "local") == "first-token-value"
    write_token(tmp_path / "local", "second-token-value")
    assert read_token(tmp_path / "local") == "second-token-value"
    assert [p.name for p in (tmp_path / "local").iterdir()] == ["token"]


def test_a_symlink_at_the_token_is_replaced_never_followed(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me", encoding="utf-8")
    (local / "token").symlink_to(victim)
    write_token(local, "the-new-token-value")
    assert victim.read_text(encoding="utf-8") == "keep me"
    assert not (local / "token").is_symlink() and read_token(local) == "the-new-token-value"


def test_a_symlinked_local_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "local").symlink_to(elsewhere)
    with pytest.raises(OSError):
        write_token(tmp_path / "local", "never-written-token")
    assert list(elsewhere.iterdir()) == []


async def test_every_route_needs_this_starts_token_and_the_logs_never_show_it(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    data = tmp_path / "in.jsonl"
    data.write_bytes(to_jsonl([request_line("a")]))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    tokens = []
    for _ in range(2):  # two starts, two tokens
        with capture_logs() as captured:
            async with httpx.AsyncClient(trust_env=False) as http, open_local_backend(settings, http) as provider:
                token = read_token(tmp_path / "state" / "local")
                tokens.append(token)
                (event,) = [e for e in captured if e["event"] == "service.local_backend"]
                url = event["url"]
                # The provider has the token: the daemon's own calls go through.
                file_id = await provider.upload_file(data, filename="in.jsonl", sha256=digest)
                for method, path in [
                    ("GET", "/v1/batches"),
                    ("GET", "/v1/files"),
                    ("GET", f"/v1/files/{file_id}/content"),
                    ("GET", "/openai/v1/files"),
                    ("GET", "/_emulator/stats"),
                    ("GET", "/_emulator/faults"),
                    ("POST", "/_emulator/pause"),
                    ("GET", "/nowhere"),
                ]:
                    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
                        answer = await http.request(method, f"{url}{path}", headers=headers)
                        assert answer.status_code == 401, (path, headers)
                        assert file_id not in answer.text and '"custom_id"' not in answer.text
                bearer = {"Authorization": f"Bearer {token}"}
                content = await http.get(f"{url}/v1/files/{file_id}/content", headers=bearer)
                assert content.status_code == 200 and b'"custom_id": "a"' in content.content
        assert logs.scrub(None, "", f"x {token} y") == "x *** y"
        assert all(token not in repr(entry) for entry in captured)
    assert tokens[0] != tokens[1]
