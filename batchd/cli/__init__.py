"""The `batchd` command line (DESIGN §7): parsing and printing only.

`app.py` builds the top-level group from the commands of `run.py`, `files.py`,
`jobs.py`, `webhooks.py` and `emulator.py`; what they share is in `common.py`,
what they print in `records.py`. Exit codes: see `common.py`.
"""

from batchd.cli.app import main

__all__ = ["main"]
