"""Dead letters: what an operator or source could not process, with its bytes.

Nothing is dropped silently: an element that fails goes to the operator's
``dead_letter`` output as a :class:`DeadLetter`, and the stream goes on.
"""

from __future__ import annotations

import pickle
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from beamops.results import decode_element


@dataclass(frozen=True)
class DeadLetter:
    """One failed element.

    ``payload`` holds the element's original bytes: the raw message for a
    source, the Arrow encoding for a beamops batch, a pickle otherwise
    (``payload_format`` says which). ``origin`` says where the element came from
    (for Kafka: topic, partition, offset). ``operator`` is the catalog name,
    ``instance`` the label of the operator instance in the pipeline (set when
    the letter leaves it; None for a letter made elsewhere). ``key`` and
    ``headers`` are a Kafka source message's own, to publish a fixed message
    again as it was: ``headers`` is a tuple, empty if it had none, for such a
    message and None for any other letter; ``key`` is None if it had none. Headers are user data that may hold secrets,
    so they stay out of ``origin`` (which is logged) and out of the repr.
    """

    operator: str
    error_type: str
    error: str
    payload: bytes
    payload_format: str
    origin: dict[str, Any] | None = None
    traceback: str = ""
    timestamp: float = field(default_factory=time.time)
    # Defaults are class attributes too: letters pickled before these fields existed still load.
    instance: str | None = None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] | None = field(default=None, repr=False)

    @classmethod
    def from_exception(cls, operator: str, element: Any, exc: BaseException) -> DeadLetter:
        payload, fmt = encode_payload(element)
        return cls(
            operator=operator,
            error_type=type(exc).__name__,
            error=str(exc),
            payload=payload,
            payload_format=fmt,
            origin=getattr(element, "origin", None),
            traceback="".join(traceback.format_exception(exc)),
        )

    def element(self) -> Any:
        """The failed element again, to reprocess once the cause is fixed: a source's raw message
        bytes, a beamops batch or result decoded from Arrow, or an unpickled object (unpickle only
        dead letters you trust). ValueError for a payload kept only as its repr."""
        if self.payload_format == "raw":
            return self.payload
        if self.payload_format == "arrow-ipc":
            return decode_element(self.payload)
        if self.payload_format == "pickle":
            return pickle.loads(self.payload)
        raise ValueError(f"a {self.payload_format!r} payload cannot be turned back into the element")

    @classmethod
    def from_raw(
        cls,
        operator: str,
        raw: bytes,
        exc: BaseException,
        origin: dict[str, Any] | None,
        *,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes | None]] | None = None,
    ) -> DeadLetter:
        """A source's message that did not decode: its bytes, and its key and headers if it had them."""
        return cls(
            operator=operator,
            error_type=type(exc).__name__,
            error=str(exc),
            payload=bytes(raw),
            payload_format="raw",
            origin=origin,
            key=key,
            headers=None if headers is None else tuple(headers),
        )


def encode_payload(element: Any) -> tuple[bytes, str]:
    """The bytes that let someone reprocess ``element`` later."""
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element), "raw"
    to_bytes = getattr(element, "to_bytes", None)
    if callable(to_bytes):
        try:
            return to_bytes(), "arrow-ipc"
        except Exception:  # a half-built element may not encode; fall back to pickle
            pass
    try:
        return pickle.dumps(element), "pickle"
    except Exception as exc:
        return repr(element).encode(errors="replace"), f"repr (pickle failed: {type(exc).__name__})"
