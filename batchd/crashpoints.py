"""Test-only crash points, so tests can kill the daemon at exact places (or make a bug there).

`BATCHD_CRASH_AT=point[@n][,point[@n]…]` makes the process SIGKILL itself the
n-th time (default: the first) it reaches `point`. The kill is a real
`kill -9`: no finally blocks, no flush, exactly what a power cut or the OOM
killer does to the process. Without the variable every call is a dictionary
lookup and nothing else. Points are named where they are placed; the crash
tests list them.

`BATCHD_RAISE_AT=point[,point…]` instead raises `InjectedBug` (a RuntimeError: what a bug
looks like to the daemon) each time `point` is reached, while the file named by
`BATCHD_RAISE_WHILE` exists (always, when that is unset): a test removes the file to fix the "bug".
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "BATCHD_CRASH_AT"
RAISE_ENV = "BATCHD_RAISE_AT"
RAISE_WHILE_ENV = "BATCHD_RAISE_WHILE"
_reached: Counter[str] = Counter()


class InjectedBug(RuntimeError):
    """A failure no step expects, raised where BATCHD_RAISE_AT asks (tests only)."""


def crashpoint(name: str) -> None:
    """Die (or raise) here if the environment asks for it (tests only)."""
    bugs = os.environ.get(RAISE_ENV)
    if bugs and name in (p.strip() for p in bugs.split(",")):
        switch = os.environ.get(RAISE_WHILE_ENV)
        if not switch or os.path.lexists(switch):
            raise InjectedBug(f"injected bug at {name}")
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[name] += 1
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point == name and _reached[name] == int(nth or 1):
            sys.stdout.write(f'{{"event": "crashpoint.kill", "point": "{name}", "n": {_reached[name]}}}\n')
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
