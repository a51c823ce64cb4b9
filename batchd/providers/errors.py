"""What a failed provider call raises: imported by the dialects, their retry driver and the daemon."""

from __future__ import annotations


class ProviderError(Exception):
    """A call to the provider did not succeed.

    `retryable` says whether the same call may simply be made again later
    (network trouble, 429, 5xx); `outcome_unknown` says the provider may have
    acted even though no answer arrived (a create that timed out), so the
    caller must reconcile before repeating it. `queue_full` says a create was refused
    because the account's queue is full (retryable).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retryable: bool = False,
        outcome_unknown: bool = False,
        retry_after: float | None = None,
        queue_full: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retryable = retryable
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after
        #: the provider refused a create because its queue of enqueued work is full: a wait,
        #: never a failure (the job goes back to `queued`, daemon/admission.py)
        self.queue_full = queue_full
