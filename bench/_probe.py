"""In-process probes for Beam pipelines on FnApiRunner (which runs the SDK worker in this process).

These live in an importable module so that Beam pickles them by reference:
their module-level state is then shared with the benchmark that reads it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

_lock = threading.Lock()
_first: dict[str, float] = {}
_last: dict[str, float] = {}
_collected: dict[str, list[Any]] = {}
_inputs: dict[str, list[bytes]] = {}


def register_inputs(key: str, items: list[bytes]) -> None:
    """Make ``items`` readable by :func:`lookup` (pre-encoded messages held in process memory)."""
    with _lock:
        _inputs[key] = items


def lookup(index: int, key: str) -> bytes:
    """Message ``index`` of the inputs registered under ``key``."""
    return _inputs[key][index]


def stamp_first(element: Any, key: str) -> Any:
    """Pass ``element`` through, noting when the first one went past."""
    now = time.perf_counter()
    with _lock:
        if now < _first.get(key, math.inf):
            _first[key] = now
    return element


def collect(element: Any, key: str) -> None:
    """Keep ``element``, noting when the last one arrived."""
    now = time.perf_counter()
    with _lock:
        _collected.setdefault(key, []).append(element)
        _last[key] = max(now, _last.get(key, -math.inf))


def tally(element: Any, key: str) -> None:
    """Keep only ``element``'s frame count, noting when the last one arrived."""
    collect(element.n_frames, key)


def pop(key: str) -> tuple[list[Any], float | None, float | None]:
    """(collected elements, first stamp, last stamp) of ``key``, forgetting them."""
    with _lock:
        _inputs.pop(key, None)
        return _collected.pop(key, []), _first.pop(key, None), _last.pop(key, None)
