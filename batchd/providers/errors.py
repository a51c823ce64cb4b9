"""What a failed provider call raises: imported by the dialects, their retry driver and the daemon."""

from __future__ import annotations


class ProviderError(Exception):
    """A call to the provider did not succeed.

    `retryable` says whether the same call may simply be made again later
    (network trouble, 429, 5xx); `outcome_unknown` says the provider may have
    acted even though no answer arrived (a create that timed out), so the
    caller must reconcile before repeating it.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retryable: bool = False,
        outcome_unknown: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retryable = retryable
        self.outcome_unknown = outcome_unknown
        self.retry_after = retry_after
