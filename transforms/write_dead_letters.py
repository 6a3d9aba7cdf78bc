"""write_dead_letters: DeadLetter -> a .json description and a .bin payload per failure.

Files go to ``<out_dir>/dead_letters/``. The ``.bin`` holds the original bytes
(``payload_format`` says how to read them: ``arrow-ipc`` decodes with
``beamops.decode_element``, a frame batch or a result; ``raw`` is a source's
message as it came); the ``.json`` says which operator failed, why, and
where the element came from. Nothing is dropped: a job can be rerun on the
payloads once the cause is fixed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from beamops import DeadLetter, OperatorParams, operator
from beamops.io.files import atomic_write, output_dir
from beamops.spec import Mount


class WriteDeadLettersParams(OperatorParams):
    out_dir: Mount = Field("out", title="Output directory", description="Dead letters go to <out_dir>/dead_letters/.")


@operator(
    output_name="path",
    title="Write dead letters",
    input_description="Failed elements",
    output_description="Paths of the files written",
)
def write_dead_letters(letter: DeadLetter, params: WriteDeadLettersParams) -> Iterator[str]:
    """Write each dead letter as <operator>-<id>.json (what failed and why) and .bin (its bytes)."""
    folder = output_dir(Path(params.out_dir) / "dead_letters")
    stem = folder / f"{letter.operator}-{uuid.uuid4().hex[:12]}"
    payload = stem.with_suffix(".bin")
    atomic_write(payload, lambda fh: fh.write(letter.payload))
    meta = {
        "operator": letter.operator,
        "error_type": letter.error_type,
        "error": letter.error,
        "payload_file": payload.name,
        "payload_format": letter.payload_format,
        "origin": letter.origin,
        "timestamp": letter.timestamp,
        "traceback": letter.traceback,
    }
    atomic_write(stem.with_suffix(".json"), lambda fh: fh.write(json.dumps(meta, indent=2, default=str).encode()))
    return iter([str(payload), str(stem.with_suffix(".json"))])
