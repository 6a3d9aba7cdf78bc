"""write_dead_letters: DeadLetter -> a .json description and a .bin payload per failure.

Files go to ``<out_dir>/dead_letters/``, named ``<instance>-<id>`` after the
operator instance that failed (its label in the pipeline: the instance id of a
pipeline definition; the operator's name for a letter without one), with
characters other than letters, digits, ``_`` and ``-`` made ``_``. The ``.bin``
holds the original bytes (``payload_format`` says how to read them:
``arrow-ipc`` decodes with ``beamops.decode_element``, a frame batch or a
result; ``raw`` is a source's message as it came); the ``.json`` says which
operator and instance failed, why, and where the element came from. Nothing is
dropped: a job can be rerun on the payloads once the cause is fixed.

A Kafka source's message also keeps its ``key`` and ``headers`` (``[name,
value]`` pairs, in order), to publish it again as it was. Bytes are written as
``{"text": ...}`` when they are UTF-8, else as ``{"base64": ...}``; no key or a
header without a value is ``null``, a message without headers has ``[]``, and
``headers`` is ``null`` only for a letter an operator made (not a source).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from beamops import DeadLetter, OperatorParams, operator
from beamops.io.files import atomic_write, output_dir
from beamops.spec import Mount

# An instance label is any text (Beam labels may hold '/', '.' or spaces): keep file names to one
# plain name in the folder.
_NOT_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9_-]")


class WriteDeadLettersParams(OperatorParams):
    out_dir: Mount = Field("out", title="Output directory", description="Dead letters go to <out_dir>/dead_letters/.")


@operator(
    output_name="path",
    title="Write dead letters",
    input_description="Failed elements",
    output_description="Paths of the files written",
)
def write_dead_letters(letter: DeadLetter, params: WriteDeadLettersParams) -> Iterator[str]:
    """Write each dead letter as <instance>-<id>.json (what failed and why) and .bin (its bytes)."""
    folder = output_dir(Path(params.out_dir) / "dead_letters")
    name = _NOT_IN_FILE_NAMES.sub("_", letter.instance or letter.operator)
    stem = f"{name}-{uuid.uuid4().hex[:12]}"
    payload, description = folder / f"{stem}.bin", folder / f"{stem}.json"
    atomic_write(payload, lambda fh: fh.write(letter.payload))
    meta = {
        "operator": letter.operator,
        "instance": letter.instance,
        "error_type": letter.error_type,
        "error": letter.error,
        "payload_file": payload.name,
        "payload_format": letter.payload_format,
        "origin": letter.origin,
        "key": _bytes_json(letter.key),
        "headers": None if letter.headers is None else [[k, _bytes_json(v)] for k, v in letter.headers],
        "timestamp": letter.timestamp,
        "traceback": letter.traceback,
    }
    atomic_write(description, lambda fh: fh.write(json.dumps(meta, indent=2, default=str).encode()))
    return iter([str(payload), str(description)])


def _bytes_json(value: bytes | None) -> dict[str, str] | None:
    """``value`` in JSON: {"text": ...} when it is UTF-8, else {"base64": ...}; None stays None."""
    if value is None:
        return None
    try:
        return {"text": value.decode()}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}
