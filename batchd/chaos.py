"""Test-only chaos: errors injected at random into store calls, provider calls and file writes.

`BATCHD_CHAOS="seed=7,rate=0.05"` makes a daemon (once it has started: `arm()`) fail that
share of the calls at the injection points, from a seeded random stream:

* `store`: a transaction fails before it commits (nothing written), or after it committed
  (written, but the caller hears an error: a connection dropped at the worst moment);
* `provider`: a request to the Batch API fails on the wire (a connection error);
* `file`: a file batchd writes fails with ENOSPC or EIO.

`kinds=store+provider` limits the points. Off (the variable unset) every call is one `None`
check. Each injected error is logged as `chaos.injected` with its kind, so a test counts them.
The chaos test (tests/acceptance/test_chaos.py) runs 50 jobs through a daemon this way.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections import Counter
from pathlib import Path

import structlog

ENV = "BATCHD_CHAOS"
KINDS = ("store", "provider", "file")

log = structlog.get_logger("batchd.chaos")


class _Chaos:
    def __init__(self, spec: str) -> None:
        fields = dict(item.strip().partition("=")[::2] for item in spec.split(",") if item.strip())
        self.rng = random.Random(int(fields.get("seed", "0")))
        self.rate = float(fields.get("rate", "0.05"))
        self.kinds = frozenset(fields.get("kinds", "+".join(KINDS)).split("+"))
        self.armed = False
        self.injected: Counter[str] = Counter()
        # Store calls run in worker threads: one draw at a time keeps the stream reproducible per order.
        self.lock = threading.Lock()

    def strikes(self, kind: str) -> bool:
        if not self.armed or kind not in self.kinds:
            return False
        with self.lock:
            return self.rng.random() < self.rate

    def choice(self, options: tuple[str, ...]) -> str:
        with self.lock:
            return self.rng.choice(options)


def _load() -> _Chaos | None:
    spec = os.environ.get(ENV, "").strip()
    return _Chaos(spec) if spec else None


_chaos = _load()


def arm() -> None:
    """Start injecting (the daemon calls this once it has started: start-up is not the test)."""
    if _chaos is not None and not _chaos.armed:
        _chaos.armed = True
        log.warning("chaos.armed", rate=_chaos.rate, kinds=sorted(_chaos.kinds))


def strikes(kind: str, what: str) -> bool:
    """Whether to fail this call of `kind` (`what` names it in the log); the caller raises its own error."""
    if _chaos is None or not _chaos.strikes(kind):
        return False
    _chaos.injected[kind] += 1
    log.warning("chaos.injected", kind=kind, what=what)
    return True


def store_moment() -> str:
    """Where a struck store transaction fails: "before" its commit or "after" it."""
    assert _chaos is not None
    return _chaos.choice(("before", "after"))


def file_fault(path: Path | str) -> None:
    """Raise ENOSPC or EIO for a write to `path`, when the chaos strikes."""
    if not strikes("file", str(path)):
        return
    assert _chaos is not None
    code = errno.ENOSPC if _chaos.choice(("enospc", "eio")) == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected)", str(path))
