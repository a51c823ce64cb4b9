"""batchd: a folder-driven, durable batch-inference service, and the seed's client API for Batch APIs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchd.client import AsyncClient, Client
    from batchd.models import BatchEndpoint, BatchJob, BatchJobStatus, BatchRequest, JobState

__all__ = ["AsyncClient", "BatchEndpoint", "BatchJob", "BatchJobStatus", "BatchRequest", "Client", "JobState"]
__version__ = "0.1.0"

# The client API is imported on first use: a merge's helper process (merge_helper.py) imports
# batchd's merge modules alone, and httpx and the models took most of its start (a third of a second).
_LAZY = {
    "AsyncClient": "batchd.client",
    "Client": "batchd.client",
    "BatchEndpoint": "batchd.models",
    "BatchJob": "batchd.models",
    "BatchJobStatus": "batchd.models",
    "BatchRequest": "batchd.models",
    "JobState": "batchd.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batchd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
