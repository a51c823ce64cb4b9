"""Numbers in sentences, as a person reads them: "1 request", "2,000 requests", "$0.000013"."""

from __future__ import annotations

import math


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 request`, `2,000 requests` (`plural` when adding an s is wrong)."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def dollars(amount: float) -> str:
    """`$12.35`, `$0.0042`, `$0.000013`: cents for sums of a cent or more, else two significant
    digits, never the exponent notation (`1.3e-05`) a float prints by itself."""
    if amount >= 0.01 or amount <= 0:
        return f"${amount:,.2f}"
    digits = -math.floor(math.log10(amount)) + 1
    return f"${amount:.{digits}f}"
