"""Injected faults: what the control endpoint accepts, and which request gets which fault.

Pure decisions only: `Faults.pick()` says what to do with a request; the
control middleware (`control.py`) carries it out. The user documentation is
the docstring of `batchd.emulator`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: The random mode's statuses unless told otherwise.
DEFAULT_RANDOM_STATUSES: tuple[int | str, ...] = (429, 500, 503)
#: The word that stands for a dropped connection among the random mode's statuses.
DROP = "drop"


class FaultSpecError(ValueError):
    """A fault posted to /_emulator/faults (or given as a flag) is malformed."""


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` + `path` with a fault."""

    method: str
    #: a path; `*` stands for exactly one segment, e.g. "/v1/files/*/content"
    path: str
    status: int | None = None
    times: int = 1
    retry_after: float | None = None
    #: carry the request out first, then answer the fault instead (a lost answer)
    act: bool = False
    #: send the real headers (full Content-Length) but only this many body bytes, then close
    truncate_at: int | None = None
    #: close the connection without sending any response
    drop: bool = False
    #: wait this long first (then the fault, or the real answer when no other fault is given)
    delay_s: float | None = None

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is one this fault is waiting for."""
        if method != self.method:
            return False
        want = self.path.strip("/").split("/")
        got = path.strip("/").split("/")
        return len(want) == len(got) and all(w in ("*", g) for w, g in zip(want, got, strict=True))

    @property
    def kind(self) -> str:
        """How the stats count it: the status, "drop", "truncate" or "delay"."""
        if self.truncate_at is not None:
            return "truncate"
        if self.drop:
            return DROP
        if self.status is not None:
            return str(self.status)
        return "delay"


@dataclass
class RandomFaults:
    """Each API request fails with probability `rate`, with a status drawn from `statuses`.

    `"drop"` among the statuses stands for a dropped connection. Seeded, the
    draws repeat exactly for the same sequence of requests.
    """

    rate: float
    statuses: tuple[int | str, ...] = DEFAULT_RANDOM_STATUSES
    retry_after: float | None = None
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float) or not 0.0 <= self.rate <= 1.0:
            raise FaultSpecError("rate must be a number from 0 to 1")
        if not self.statuses:
            raise FaultSpecError("statuses must not be empty")
        for status in self.statuses:
            if status != DROP and (isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599):
                raise FaultSpecError(f'statuses must be HTTP statuses from 400 to 599 or "{DROP}", not {status!r}')
        if self.retry_after is not None and not _non_negative(self.retry_after):
            raise FaultSpecError("retry_after must be a number >= 0")
        self._rng = random.Random(self.seed)

    def draw(self, method: str, path: str) -> Fault | None:
        """A one-off fault for this request, or None (most of the time)."""
        if self._rng.random() >= self.rate:
            return None
        choice = self._rng.choice(self.statuses)
        if choice == DROP:
            return Fault(method, path, drop=True)
        assert isinstance(choice, int)
        return Fault(method, path, status=choice, retry_after=self.retry_after)

    def describe(self) -> dict[str, Any]:
        """The JSON form (as posted)."""
        return {"rate": self.rate, "statuses": list(self.statuses), "retry_after": self.retry_after, "seed": self.seed}


def _finite(value: int | float) -> bool:
    # math.isfinite() raises OverflowError on an integer too large for a float (JSON allows one).
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _non_negative(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and _finite(value) and value >= 0


def _number(spec: dict[str, Any], key: str, *, lowest: float, integer: bool) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    wrong_kind = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_kind or not _finite(value) or value < lowest:
        raise FaultSpecError(f"{key} must be a {'whole ' if integer else ''}number >= {lowest:g}")
    return value


def _flag(spec: dict[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise FaultSpecError(f"{key} must be true or false")
    return value


_FAULT_KEYS = frozenset({"method", "path", "status", "times", "retry_after", "act", "truncate_at", "drop", "delay_s"})
_RANDOM_KEYS = frozenset({"rate", "statuses", "retry_after", "seed"})


def parse_fault(spec: Any) -> Fault:
    """Build a Fault from its JSON form; raise FaultSpecError when it is malformed."""
    if not isinstance(spec, dict):
        raise FaultSpecError("a fault is a JSON object")
    unknown = sorted(set(spec) - _FAULT_KEYS)
    if unknown:
        raise FaultSpecError(f"unknown keys: {', '.join(unknown)}")
    method, path = spec.get("method"), spec.get("path")
    if not isinstance(method, str) or not method:
        raise FaultSpecError("method is required")
    if not isinstance(path, str) or not path.startswith("/"):
        raise FaultSpecError("path is required and starts with /")
    status = _number(spec, "status", lowest=100, integer=True)
    truncate_at = _number(spec, "truncate_at", lowest=0, integer=True)
    delay_s = _number(spec, "delay_s", lowest=0, integer=False)
    drop = _flag(spec, "drop")
    if status is not None and status > 599:
        raise FaultSpecError("status must be from 100 to 599")
    if sum((status is not None, truncate_at is not None, drop)) > 1:
        raise FaultSpecError("give only one of status, truncate_at and drop")
    if status is None and truncate_at is None and not drop and delay_s is None:
        raise FaultSpecError("status, truncate_at, drop or delay_s is required")
    times = _number(spec, "times", lowest=1, integer=True)
    return Fault(
        method=method.upper(),
        path=path,
        status=status,
        times=1 if times is None else times,
        retry_after=_number(spec, "retry_after", lowest=0, integer=False),
        act=_flag(spec, "act"),
        truncate_at=truncate_at,
        drop=drop,
        delay_s=delay_s,
    )


def parse_random(spec: dict[str, Any]) -> RandomFaults:
    """Build the random mode from its JSON form; raise FaultSpecError when it is malformed."""
    unknown = sorted(set(spec) - _RANDOM_KEYS)
    if unknown:
        raise FaultSpecError(f"unknown keys for the random mode: {', '.join(unknown)}")
    statuses = spec.get("statuses", list(DEFAULT_RANDOM_STATUSES))
    if not isinstance(statuses, list):
        raise FaultSpecError("statuses must be a list")
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise FaultSpecError("seed must be an integer")
    return RandomFaults(
        rate=spec.get("rate"),  # type: ignore[arg-type]  # checked by RandomFaults
        statuses=tuple(statuses),
        retry_after=spec.get("retry_after"),
        seed=seed,
    )


def parse_latency(spec: dict[str, Any]) -> float:
    """`{"latency_s": S}`: the delay added to every API request."""
    if set(spec) != {"latency_s"}:
        raise FaultSpecError("latency_s goes alone")
    value = spec["latency_s"]
    if not _non_negative(value):
        raise FaultSpecError("latency_s must be a number >= 0")
    return float(value)


@dataclass
class Faults:
    """Every fault waiting to be served, and the count of those served."""

    pending: list[Fault] = field(default_factory=list)
    random: RandomFaults | None = None
    #: added to every API request before anything else
    latency_s: float = 0.0
    served: Counter[str] = field(default_factory=Counter)

    def pick(self, method: str, path: str) -> Fault | None:
        """The fault this request gets: a pending one first (used up by one), else a random draw."""
        for fault in self.pending:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.times <= 0:
                    self.pending.remove(fault)
                return fault
        if self.random is not None:
            return self.random.draw(method, path)
        return None

    def clear(self) -> None:
        """Forget every pending fault, the random mode and the latency (the counts stay)."""
        self.pending.clear()
        self.random = None
        self.latency_s = 0.0
