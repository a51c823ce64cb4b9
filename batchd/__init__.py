"""batchd: a folder-driven, durable batch-inference service, and the seed's client API for Batch APIs."""

from batchd.client import AsyncClient, Client
from batchd.models import BatchEndpoint, BatchJob, BatchJobStatus, BatchRequest, JobState

__all__ = ["AsyncClient", "BatchEndpoint", "BatchJob", "BatchJobStatus", "BatchRequest", "Client", "JobState"]
__version__ = "0.1.0"
