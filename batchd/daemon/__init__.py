"""The daemon: the process that runs batchd's work (see `core.py` for the rooms and their order)."""

from batchd.daemon.context import db
from batchd.daemon.core import Daemon, RunResult

__all__ = ["Daemon", "RunResult", "db"]
