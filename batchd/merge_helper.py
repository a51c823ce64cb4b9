"""The helper process of a big merge: a second `Worker` on the merge's phases (merge_work.py).

``python -m batchd.merge_helper``, started by `Helper` with this interpreter, environment and
working directory (so it imports this same batchd), scans at once, then joins and writes
when told. Messages are marshal'd tuples: on its stdin the plan, then ("join", total) and
("write", total, output, errors); on its stdout one answer per phase, ("ok", result) or
("error", message). The output files' descriptors are inherited (pass_fds).

The helper only saves time: when it cannot start, dies or fails (`HelperFailed`), the merge
is done again without one, and what the files make fail (a ValueError, an OSError) fails it
as it would have without a helper.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from batchd.merge_plan import Plan
from batchd.merge_work import Worker, read_exactly

__all__ = ["HELPER_FROM_BYTES", "Helper", "HelperFailed", "helper_wanted"]

#: From this many bytes of input and answers a merge has a helper; below, starting one costs
#: more than it saves.
HELPER_FROM_BYTES = 64 << 20

# How often an orphaned helper notices that its merge is gone.
_WATCH_S = 1.0


def helper_wanted(size: int) -> bool:
    """Whether a merge of `size` bytes of input and answers gets a helper: big enough, and a
    second CPU to run it on (on one, the two processes would only take turns)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return size >= HELPER_FROM_BYTES and cpus > 1


class HelperFailed(RuntimeError):
    """The helper process could not start, died, or failed."""


class Helper:
    """The merge's side of a helper process."""

    def __init__(self, plan: Plan, fds: list[int]) -> None:
        # Its stderr goes to a file, read only if it fails: a pipe nobody reads could fill and block it.
        self._stderr = Path(plan.folder) / "helper.stderr"
        try:
            with self._stderr.open("wb") as stderr:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "batchd.merge_helper"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    pass_fds=fds,
                )
        except OSError as exc:
            raise HelperFailed(f"the merge's helper process did not start: {exc}") from exc
        self.send(*plan.as_tuple())

    def send(self, *message: Any) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            marshal.dump(message, stdin)
            stdin.flush()
        except OSError:
            pass  # it is gone: `answer` says why

    def answer(self) -> Any:
        """The helper's result of the phase it was given (waits for it)."""
        stdout = self._process.stdout
        assert stdout is not None
        try:
            reply = marshal.load(stdout)
        except (EOFError, ValueError, TypeError):
            status = self._process.wait()
            tail = self._stderr.read_bytes()[-2000:].decode(errors="replace").strip()
            raise HelperFailed(f"the merge's helper process ended (status {status}): {tail}") from None
        if reply[0] == "ok":
            return reply[1]
        raise HelperFailed(f"the merge's helper process failed: {reply[1]}")

    def close(self, *, done: bool) -> None:
        """End the helper: `done`, it exits (its stdin closed); else it is killed, whatever it does."""
        if not done:
            self._process.kill()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # it is gone already
                    stream.close()
        self._process.wait()


def _reply(channel: IO[bytes], *message: Any) -> None:
    marshal.dump(message, channel)
    channel.flush()


def _exit_when_orphaned(parent: int) -> None:
    # A merge killed outright cannot end its helper: the helper ends itself.
    while os.getppid() == parent:
        time.sleep(_WATCH_S)
    os._exit(1)


def main() -> int:
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    # The channel is the stdout we were given; anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    commands = sys.stdin.buffer
    worker = Worker(Plan(*marshal.load(commands)), "helper", read_exactly)
    try:
        _reply(channel, "ok", worker.scan().as_tuple())
        while True:
            try:
                command, total, *rest = marshal.load(commands)
            except EOFError:
                return 0  # the merge is done, or gone
            if command == "join":
                _reply(channel, "ok", worker.join(total).as_tuple())
            else:
                output, errors = rest
                worker.write(total, output, errors)
                _reply(channel, "ok", None)
    except Exception as exc:
        _reply(channel, "error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
