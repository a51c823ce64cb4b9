"""Numbers in sentences: plurals and costs as a person reads them."""

from __future__ import annotations

from batchd.text import counted, dollars


def test_counted_says_one_request_and_many_requests() -> None:
    assert counted(1, "request") == "1 request"
    assert counted(0, "job") == "0 jobs"
    assert counted(2000, "request") == "2,000 requests"
    assert counted(2, "webhook event") == "2 webhook events"


def test_dollars_never_prints_a_float_exponent() -> None:
    assert dollars(1.3e-05) == "$0.000013"
    assert dollars(0.0042) == "$0.0042"
    assert dollars(12.3456) == "$12.35"
    assert dollars(1234.5) == "$1,234.50"
    assert dollars(0.0) == "$0.00"
