"""Loopback ports: pick free ones, wait for a listener to open or close."""

from __future__ import annotations

import socket
import time

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Return *count* distinct ports that are free on 127.0.0.1 right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_ports_listening(ports: list[int], timeout: float) -> None:
    """Wait until something listens on every port (checked by bind, so no connection is made)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        pending = [p for p in pending if not _is_bound(p)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ports {pending} on {HOST} not listening after {timeout} s")
        time.sleep(0.02)


def wait_ports_closed(ports: list[int], timeout: float) -> list[int]:
    """Wait until nothing listens on *ports*; return those still open at the deadline."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if _is_bound(p)]
        if pending:
            time.sleep(0.05)
    return pending


def _is_bound(port: int) -> bool:
    """True while some process still holds a listening socket on the port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: connections in TIME_WAIT don't count, only a live listener.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
    except OSError:
        return True
    finally:
        s.close()
    return False
