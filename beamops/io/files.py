"""Writing result files that readers may be watching.

Files are written under a temporary name and renamed, so a viewer polling the
directory never sees half a file; live previews are throttled per key. A
directory or file that cannot be written raises WorkerEnvironmentError: the
bundle fails and the job says why, instead of a good result going to dead
letters (whose writer would fail the same way).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import BinaryIO

from beamops.operator import WorkerEnvironmentError

# A full, read-only or failing disk, or a directory this worker may not write to: every file would
# fail the same way (and the dead-letter writer too).
_EVERY_FILE_FAILS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def fails_every_file(exc: OSError) -> bool:
    """Whether ``exc``, raised writing one file, says the worker cannot write any (not this file's problem)."""
    return exc.errno in _EVERY_FILE_FAILS


def unwritable(path: str | Path, exc: OSError) -> WorkerEnvironmentError:
    """The error that fails the job when ``path`` cannot be written."""
    return WorkerEnvironmentError(f"cannot write {str(path)!r}: {exc}")


def output_dir(path: str | Path) -> Path:
    """``path`` (``~`` expanded) as a directory that exists (made with its parents if need be)."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkerEnvironmentError(f"cannot make the output directory {str(folder)!r}: {exc}") from exc
    return folder


def writable_dir(path: str | Path) -> Path:
    """:func:`output_dir`, and a WorkerEnvironmentError if this process cannot write files in it."""
    folder = output_dir(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WorkerEnvironmentError(f"cannot write files in the output directory {str(folder)!r}: permission denied")
    return folder


def files_like(folder: Path, pattern: str, shown: int = 3) -> str:
    """The files of ``folder`` that match ``pattern``, named for a message ("a, b, c and 4 more"); "" if none."""
    found = sorted(path.name for path in folder.glob(pattern))
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return ", ".join(found[:shown]) + more


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``. If anything
    interrupts it (an error, Ctrl-C), ``path`` is as it was and the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as exc:
        raise unwritable(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


class PreviewThrottle:
    """Lets a preview through at most once every ``interval_s`` per key, in this process."""

    def __init__(self) -> None:
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable, interval_s: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < interval_s:
            return False
        self._last[key] = now
        return True
