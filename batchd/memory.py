"""A long-running daemon's memory: kept to what its data needs."""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt() parameter M_ARENA_MAX (malloc.h).
_M_ARENA_MAX = -8
#: Arenas `batchd run` allows glibc's malloc (the MALLOC_ARENA_MAX environment variable overrides).
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for the rest of the process; True when the cap took.

    glibc gives threads arenas of their own, up to eight per core, and each keeps the memory
    freed in it. The daemon's database calls run on worker threads that come and go: with
    10,000 jobs in flight the extra arenas held 20-25 MB of RSS that no data used
    (tests/benchmarks/bench_idle.py). Two cost no measurable speed: those threads mostly wait
    on SQLite and the network. Call it before the first thread starts. An operator's
    MALLOC_ARENA_MAX is left as glibc read it; on another C library this does nothing.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
