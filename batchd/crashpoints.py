"""Test-only crash points, so tests can kill the daemon at exact places.

`BATCHD_CRASH_AT=point[@n][,point[@n]…]` makes the process SIGKILL itself the
n-th time (default: the first) it reaches `point`. The kill is a real
`kill -9`: no finally blocks, no flush, exactly what a power cut or the OOM
killer does to the process. Without the variable every call is a dictionary
lookup and nothing else. Points are named where they are placed; the crash
tests list them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "BATCHD_CRASH_AT"
_reached: Counter[str] = Counter()


def crashpoint(name: str) -> None:
    """Die here if the environment asks for it (tests only)."""
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
