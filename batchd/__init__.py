"""batchd: a folder-driven, durable batch-inference service."""

from batchd.models import BatchEndpoint, BatchJobStatus, JobState

__all__ = ["BatchEndpoint", "BatchJobStatus", "JobState"]
__version__ = "0.1.0"
