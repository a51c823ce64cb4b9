"""sd_notify without C dependencies: a datagram to $NOTIFY_SOCKET (path or abstract)."""

from __future__ import annotations

import os
import socket
import time


def notify(message: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send one notification (e.g. "READY=1"); False when not under systemd or when it fails."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # An abstract socket: the leading @ stands for a NUL byte.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC (when it is meant for this process), else None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None


def reloading_message() -> str:
    """RELOADING=1 with the MONOTONIC_USEC= that Type=notify-reload requires (plain Type=notify ignores it)."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
