"""The Provider protocol: what the daemon and the client need from a Batch API.

One implementation per wire dialect (together.py, openai.py, anthropic.py, gemini.py), each over an
`httpx.AsyncClient` that the caller builds and passes in. `ProviderError` lives in
errors.py and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Protocol

from batchd.models import Limits, RemoteBatch, RemoteFile
from batchd.providers.errors import ProviderError

__all__ = ["Provider", "ProviderError"]


class Provider(Protocol):
    """A Batch API seen through one wire dialect."""

    #: "together" | "openai" | "anthropic" | "gemini" | "local"
    kind: str
    limits: Limits
    #: whether a listed batch names what it was created from (its input file, batchd's job in
    #: its metadata): a lost create is then found again by those; else (Anthropic) only by its
    #: request count and creation time (daemon/submit.py)
    identifies_creates: bool
    #: whether the requests go up as a file and the results come back as files, each deleted by
    #: `delete_file` (Together, OpenAI, Gemini, the local backend); else (Anthropic) the requests
    #: travel inline and the results live in the batch, deleted with it by `delete_batch`. What
    #: the daemon deletes is the provider's `delete_files` setting (daemon/finish.py).
    uploads_files: bool

    async def upload_file(self, path: Path, *, filename: str, sha256: str) -> str:
        """Upload a batch input file; return the provider's file id.

        Safe to call again after a crash: a file with the same checksum is
        reused where the provider allows it (Together answers 409).
        """
        ...

    async def upload(self, path: Path, *, filename: str, sha256: str) -> RemoteFile:
        """`upload_file`, answering what the provider says about the stored file (the client shows it)."""
        ...

    async def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        job_id: str | None = None,
        input_path: Path | None = None,
        model: str | None = None,
    ) -> RemoteBatch:
        """Create a batch. Never retried blindly: a lost answer raises
        ProviderError(outcome_unknown=True) and the caller reconciles by listing.

        `job_id` is batchd's job (the daemon always gives it; the client has
        none): where the dialect has metadata it goes there as `batchd_job_id`.
        `input_path` is the uploaded file's local copy: a dialect whose requests travel
        inline in the create (Anthropic) sends it from there; the others ignore it.
        `model` is the one model of the batch: a dialect that names it in the create call
        (Gemini) needs it; the others ignore it (their lines name it).
        """
        ...

    async def delete_file(self, file_id: str) -> None:
        """Delete a file at the provider (an uploaded input, a result file), retried while the
        provider's answer is passing; one already gone (404) counts as deleted. A refusal raises
        ProviderError. Only where `uploads_files`."""
        ...

    async def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch, and the results it holds, at the provider (retried as
        `delete_file`; 404 counts as deleted). Only where not `uploads_files` (Anthropic)."""
        ...

    async def get_batch(self, batch_id: str) -> RemoteBatch: ...

    async def list_batches(
        self, *, wanted: Collection[str] | None = None, since: datetime | None = None
    ) -> list[RemoteBatch]:
        """The account's batches; without arguments every one of them (all pages).

        `wanted`: only the batches with these ids are returned, and only they are parsed
        (an unwanted item the dialect cannot read does not fail the list), without their
        wire objects (`raw` empty: a sweep may want 100,000 of them). A wanted id the
        provider does not show is simply missing from the answer.

        `since`: batches created before this moment are not needed. Where the dialect
        lists newest first in pages (OpenAI), paging stops at the first page that reaches
        them; batches already read are still returned, so this bounds the work and never
        filters. Callers subtract their own margin for clock skew (the daemon: CLOCK_SKEW_S).

        OpenAI also stops paging once every wanted batch is found. Together answers one
        array: the listing costs one call whatever the arguments; `wanted` still spares
        the parsing.
        """
        ...

    async def cancel_batch(self, batch_id: str) -> RemoteBatch: ...

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content into `dest`; return its size in bytes.

        If `dest` already holds a prefix (an interrupted download), the rest is
        fetched with `Range` and appended. A body shorter than announced raises
        ProviderError(retryable=True) and leaves the prefix for the next try.
        """
        ...
