"""decode_sparse_frames: Arrow IPC bytes -> SparseFrameBatch.

Decoding is zero-copy: the batch's arrays are views of the message buffer.
Malformed bytes (truncated, random, unknown schema version, indices out of
range, or a dense batch where sparse frames are expected) go to dead letters
with their raw bytes; the stream goes on.
"""

from __future__ import annotations

from beamops import SparseFrameBatch, operator
from beamops.frames import decode_sparse_batch


@operator(
    output_name="frames",
    title="Decode sparse frame batches",
    input_description="One Arrow IPC stream per batch (a Kafka message value)",
    output_description="Validated sparse frame batches",
)
def decode_sparse_frames(message: bytes) -> SparseFrameBatch:
    """Decode and validate one encoded batch of counted frames."""
    return decode_sparse_batch(message)
