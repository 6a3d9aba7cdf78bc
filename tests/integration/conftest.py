"""Helpers shared by the integration tests of the local servers (test_kafka_broker, test_flink_cluster)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(hex local address, port) of every TCP socket in LISTEN state that ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                address, port = local.split(":")
                found.append((address, int(port, 16)))
    return found


@pytest.fixture
def listening_sockets() -> Callable[[int], list[tuple[str, int]]]:
    """``listening_sockets(pid)``: (hex local address, port) of every TCP socket in LISTEN state that
    ``pid`` holds (compare the addresses with 127.0.0.1 as /proc/net/tcp and tcp6 write it)."""
    return _listening_sockets
