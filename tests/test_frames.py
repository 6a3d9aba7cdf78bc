"""Frame batches and their Arrow IPC wire format (DESIGN.md section 4)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from beamops import (
    ComMap,
    ComPartial,
    DeadLetter,
    DenseFrameBatch,
    FrameDecodeError,
    FrameHeader,
    Image,
    SparseFrameBatch,
    decode_batch,
    decode_element,
    encode_batch,
)
from beamops.frames import SCHEMA_VERSION

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ----------------------------------------------------------

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
# Frame shapes up to the largest that fits uint32 indices (65536 x 65536 = 2**32 pixels).
frame_shapes = st.one_of(
    shapes,
    st.sampled_from([(576, 576), (1, 1), (65536, 65536), (1, 2**32), (2**32, 1)]),
)
scan_shapes = st.one_of(shapes, st.sampled_from([(1, 1), (576, 576), (4096, 4096)]))


@st.composite
def headers(draw: st.DrawFn, frame_shape: Any = frame_shapes, scan_shape: Any = scan_shapes) -> FrameHeader:
    return FrameHeader(
        scan_number=draw(st.integers(0, 2**63)),
        scan_shape=draw(scan_shape),
        frame_shape=draw(frame_shape),
        detector=draw(st.text(max_size=20)),
        total_frames=draw(st.one_of(st.none(), st.integers(1, 2**40))),
    )


@st.composite
def sparse_batches(draw: st.DrawFn, max_frames: int = 12, max_events: int = 30) -> SparseFrameBatch:
    header = draw(headers())
    n = draw(st.integers(0, max_frames))
    pixel = st.integers(0, header.n_pixels - 1)
    frames = [np.array(draw(st.lists(pixel, max_size=max_events)), dtype=np.uint32) for _ in range(n)]
    positions = draw(st.lists(st.integers(0, header.n_positions - 1), min_size=n, max_size=n))
    numbers = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n))
    return SparseFrameBatch.from_frames(header, frames, positions, numbers)


@st.composite
def dense_batches(draw: st.DrawFn, max_frames: int = 5) -> DenseFrameBatch:
    header = draw(headers(frame_shape=st.tuples(st.integers(1, 12), st.integers(1, 12))))
    n = draw(st.integers(0, max_frames))
    seed = draw(st.integers(0, 2**32 - 1))
    frames = np.random.default_rng(seed).integers(0, 2**16, size=(n, *header.frame_shape), dtype=np.uint16)
    positions = np.array(draw(st.lists(st.integers(0, header.n_positions - 1), min_size=n, max_size=n)), np.uint32)
    numbers = np.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)), np.uint64)
    return DenseFrameBatch(header, frames, positions, numbers)


# --- helpers -------------------------------------------------------------


def assert_sparse_equal(got: Any, want: SparseFrameBatch) -> None:
    assert isinstance(got, SparseFrameBatch)
    assert got.header == want.header
    assert got.n_frames == want.n_frames
    assert got.events.dtype == np.uint32 and got.scan_positions.dtype == np.uint32
    assert got.frame_numbers.dtype == np.uint64
    np.testing.assert_array_equal(got.events, want.events)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.scan_positions, want.scan_positions)
    np.testing.assert_array_equal(got.frame_numbers, want.frame_numbers)
    for i in range(want.n_frames):
        np.testing.assert_array_equal(got.frame(i), want.frame(i))


def assert_dense_equal(got: Any, want: DenseFrameBatch) -> None:
    assert isinstance(got, DenseFrameBatch)
    assert got.header == want.header
    assert got.frames.dtype == np.uint16
    assert got.frames.shape == want.frames.shape
    np.testing.assert_array_equal(got.frames, want.frames)
    np.testing.assert_array_equal(got.scan_positions, want.scan_positions)
    np.testing.assert_array_equal(got.frame_numbers, want.frame_numbers)


def assert_invariants(batch: Any) -> None:
    """What an operator relies on, checked independently of the library's validate()."""
    h = batch.header
    assert h.schema_version == SCHEMA_VERSION
    assert min(h.scan_shape) >= 1 and min(h.frame_shape) >= 1
    n = len(batch.scan_positions)
    assert len(batch.frame_numbers) == n
    if n:
        assert int(batch.scan_positions.max()) < h.scan_shape[0] * h.scan_shape[1]
    if isinstance(batch, SparseFrameBatch):
        offsets = np.asarray(batch.offsets, np.int64)
        assert len(offsets) == n + 1 and offsets[0] == 0 and offsets[-1] == len(batch.events)
        assert np.all(np.diff(offsets) >= 0)
        if len(batch.events):
            assert int(batch.events.max()) < h.frame_shape[0] * h.frame_shape[1]
    else:
        assert batch.frames.shape == (n, *h.frame_shape)
        assert batch.frames.dtype == np.uint16


def decode_or_error(data: Any) -> Any:
    """decode_batch's result, or None for a FrameDecodeError; any other exception fails the test."""
    try:
        batch = decode_batch(data)
    except FrameDecodeError as exc:
        assert str(exc), "a decode error needs a message"
        return None
    assert_invariants(batch)
    return batch


HEADER = FrameHeader(scan_number=7, scan_shape=(4, 5), frame_shape=(6, 7), total_frames=40)


def small_sparse() -> SparseFrameBatch:
    frames = [np.array([0, 41, 41], np.uint32), np.array([], np.uint32), np.array([5], np.uint32)]
    return SparseFrameBatch.from_frames(HEADER, frames, [0, 19, 19], [10, 11, 12])


def small_dense() -> DenseFrameBatch:
    frames = np.arange(2 * 42, dtype=np.uint16).reshape(2, 6, 7) * 700
    return DenseFrameBatch(HEADER, frames, np.array([3, 3], np.uint32), np.array([0, 2**64 - 1], np.uint64))


def raw_sparse(**fields: Any) -> SparseFrameBatch:
    """A sparse batch built without validation, to encode invalid content."""
    values: dict[str, Any] = {
        "header": HEADER,
        "events": np.array([1, 2, 3], np.uint32),
        "offsets": np.array([0, 1, 3], np.int64),
        "scan_positions": np.array([0, 19], np.uint32),
        "frame_numbers": np.array([0, 1], np.uint64),
    }
    values.update(fields)
    return SparseFrameBatch(**values)


def ipc(rb: pa.RecordBatch, *more: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        for batch in (rb, *more):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def with_header(rb: pa.RecordBatch, **changes: Any) -> pa.RecordBatch:
    meta = dict(rb.schema.metadata)
    header = json.loads(meta[b"beamops.header"])
    header.update(changes)
    meta[b"beamops.header"] = json.dumps(header).encode()
    return rb.replace_schema_metadata(meta)


# --- round trips -----------------------------------------------------------


@FAST
@given(sparse_batches())
def test_sparse_round_trip(batch: SparseFrameBatch) -> None:
    data = encode_batch(batch)
    assert isinstance(data, bytes)
    assert_sparse_equal(decode_batch(data), batch)
    # Also from the buffer types a Kafka client may hand over.
    assert_sparse_equal(decode_batch(memoryview(data)), batch)
    assert_sparse_equal(decode_batch(pa.py_buffer(data)), batch)


@FAST
@given(dense_batches())
def test_dense_round_trip(batch: DenseFrameBatch) -> None:
    assert_dense_equal(decode_batch(encode_batch(batch)), batch)


@FAST
@given(sparse_batches())
def test_sparse_encoding_is_deterministic_and_re_encodes_identically(batch: SparseFrameBatch) -> None:
    data = encode_batch(batch)
    assert encode_batch(batch) == data
    assert encode_batch(decode_batch(data)) == data


def test_empty_sparse_batch_round_trips() -> None:
    batch = SparseFrameBatch.from_frames(HEADER, [], [])
    got = decode_batch(encode_batch(batch))
    assert_sparse_equal(got, batch)
    assert got.n_frames == 0 and len(got.events) == 0 and list(got.offsets) == [0]


def test_batch_of_empty_frames_round_trips() -> None:
    batch = SparseFrameBatch.from_frames(HEADER, [np.array([], np.uint32)] * 4, [0, 1, 1, 19])
    got = decode_batch(encode_batch(batch))
    assert_sparse_equal(got, batch)
    assert list(got.offsets) == [0, 0, 0, 0, 0]


def test_empty_dense_batch_round_trips() -> None:
    batch = DenseFrameBatch(HEADER, np.zeros((0, 6, 7), np.uint16), np.zeros(0, np.uint32), np.zeros(0, np.uint64))
    assert_dense_equal(decode_batch(encode_batch(batch)), batch)


def test_extreme_values_round_trip() -> None:
    header = FrameHeader(0, (1, 1), (65536, 65536), detector="", total_frames=None)
    batch = SparseFrameBatch.from_frames(header, [np.array([0, 2**32 - 1], np.uint32)], [0], [2**64 - 1])
    assert_sparse_equal(decode_batch(encode_batch(batch)), batch)


def test_origin_is_not_encoded() -> None:
    batch = small_sparse().with_origin({"topic": "frames", "partition": 0, "offset": 12})
    assert batch.origin == {"topic": "frames", "partition": 0, "offset": 12}
    assert decode_batch(encode_batch(batch)).origin is None


def test_from_frames_builds_csr() -> None:
    batch = small_sparse()
    assert list(batch.offsets) == [0, 3, 3, 4]
    assert list(batch.events) == [0, 41, 41, 5]
    assert batch.n_frames == len(batch) == 3
    assert list(batch.frame(0)) == [0, 41, 41]
    assert list(batch.frame(1)) == []


def test_from_frames_rejects_out_of_range_content() -> None:
    with pytest.raises(FrameDecodeError, match=r"event index 42"):
        SparseFrameBatch.from_frames(HEADER, [np.array([42])], [0])
    with pytest.raises(FrameDecodeError, match=r"scan position 20"):
        SparseFrameBatch.from_frames(HEADER, [np.array([1])], [20])


# --- zero copy -------------------------------------------------------------


@FAST
@given(sparse_batches())
def test_sparse_decode_is_zero_copy(batch: SparseFrameBatch) -> None:
    data = encode_batch(batch)
    wire = np.frombuffer(data, dtype=np.uint8)
    got = decode_batch(data)
    arrays = [got.scan_positions, got.frame_numbers] if got.n_frames else []
    if len(got.events):
        arrays.append(got.events)
    for arr in arrays:
        assert np.shares_memory(arr, wire), arr
        assert not arr.flags.owndata
        assert not arr.flags.writeable  # a view of the message: operators must not write into it


@FAST
@given(dense_batches())
def test_dense_decode_is_zero_copy(batch: DenseFrameBatch) -> None:
    assume(batch.n_frames > 0)
    data = encode_batch(batch)
    wire = np.frombuffer(data, dtype=np.uint8)
    got = decode_batch(data)
    for arr in (got.frames, got.scan_positions, got.frame_numbers):
        assert np.shares_memory(arr, wire)
        assert not arr.flags.owndata
        assert not arr.flags.writeable


# --- untrusted bytes: FrameDecodeError and nothing else --------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_frame_decode_error(data: bytes) -> None:
    assert decode_or_error(data) is None


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4096), st.booleans())
def test_valid_prefix_with_garbage_raises_only_frame_decode_error(garbage: bytes, cut: int, dense: bool) -> None:
    data = encode_batch(small_dense() if dense else small_sparse())
    decode_or_error(data[: cut % len(data)] + garbage)


@pytest.mark.parametrize("make", [small_sparse, small_dense], ids=["sparse", "dense"])
def test_every_prefix_of_a_small_batch_raises_frame_decode_error(make: Any) -> None:
    batch = make()
    data = encode_batch(batch)
    decoded_at = []
    for cut in range(len(data)):
        got = decode_or_error(data[:cut])
        if got is not None:
            decoded_at.append(cut)
            (assert_sparse_equal if isinstance(batch, SparseFrameBatch) else assert_dense_equal)(got, batch)
    # Arrow readers accept a stream cut exactly before its 8-byte end-of-stream marker;
    # the record batch is complete there. Every other truncation must fail.
    assert decoded_at in ([], [len(data) - 8])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_batches(max_frames=40, max_events=60), st.data())
def test_random_cuts_of_bigger_batches_raise_frame_decode_error(batch: SparseFrameBatch, data: st.DataObject) -> None:
    encoded = encode_batch(batch)
    cut = data.draw(st.integers(0, len(encoded) - 9), label="cut")
    assert decode_or_error(encoded[:cut]) is None


@pytest.mark.parametrize("make", [small_sparse, small_dense], ids=["sparse", "dense"])
def test_every_single_bit_flip_decodes_validly_or_raises_frame_decode_error(make: Any) -> None:
    data = bytearray(encode_batch(make()))
    rejected = 0
    for bit in range(len(data) * 8):
        data[bit // 8] ^= 1 << (bit % 8)
        rejected += decode_or_error(bytes(data)) is None
        data[bit // 8] ^= 1 << (bit % 8)
    assert rejected > 0  # the flips do reach the checks


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_batches(max_frames=20), st.lists(st.integers(0, 2**20), min_size=1, max_size=8))
def test_multi_bit_flips_decode_validly_or_raise_frame_decode_error(batch: SparseFrameBatch, bits: list[int]) -> None:
    data = bytearray(encode_batch(batch))
    for bit in bits:
        bit %= len(data) * 8
        data[bit // 8] ^= 1 << (bit % 8)
    decode_or_error(bytes(data))


@pytest.mark.parametrize("value", ["a string", None, 42, [1, 2]], ids=["str", "None", "int", "list"])
def test_non_bytes_input_raises_frame_decode_error(value: Any) -> None:
    with pytest.raises(FrameDecodeError):
        decode_batch(value)


# --- specific invalid batches: FrameDecodeError with a helpful message ------


def test_unknown_schema_version() -> None:
    data = raw_sparse(header=replace(HEADER, schema_version=SCHEMA_VERSION + 1)).to_bytes()
    with pytest.raises(FrameDecodeError, match=rf"unknown schema version {SCHEMA_VERSION + 1}"):
        decode_batch(data)


def test_event_index_out_of_frame() -> None:
    data = raw_sparse(events=np.array([1, 2, 6 * 7], np.uint32)).to_bytes()
    with pytest.raises(FrameDecodeError, match=r"event index 42 out of range for frame_shape \(6, 7\)"):
        decode_batch(data)


def test_last_valid_event_index_is_accepted() -> None:
    got = decode_batch(raw_sparse(events=np.array([1, 2, 6 * 7 - 1], np.uint32)).to_bytes())
    assert int(got.events.max()) == 41


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_scan_position_out_of_scan(dense: bool) -> None:
    bad = np.array([0, 4 * 5], np.uint32)
    batch = replace(small_dense() if dense else raw_sparse(), scan_positions=bad)
    with pytest.raises(FrameDecodeError, match=r"scan position 20 out of range for scan_shape \(4, 5\)"):
        decode_batch(batch.to_bytes())


def test_non_monotonic_offsets_in_the_wire_format() -> None:
    good = raw_sparse().to_arrow()
    events = pa.ListArray.from_arrays(pa.array([0, 2, 1, 3], pa.int32()), pa.array([1, 2, 3], pa.uint32()))
    positions = pa.array([0, 1, 2], pa.uint32())
    numbers = pa.array([0, 1, 2], pa.uint64())
    rb = pa.RecordBatch.from_arrays([events, positions, numbers], schema=good.schema)
    with pytest.raises(FrameDecodeError, match=r"(?i)offset.*(monoton|invariant|decreas)"):
        decode_batch(ipc(rb))


def test_non_monotonic_offsets_fail_validation() -> None:
    batch = raw_sparse(
        events=np.array([1, 2, 3], np.uint32),
        offsets=np.array([0, 2, 1, 3]),
        scan_positions=np.array([0, 1, 2], np.uint32),
        frame_numbers=np.array([0, 1, 2], np.uint64),
    )
    with pytest.raises(FrameDecodeError, match="offsets are not monotonic"):
        batch.validate()


def test_from_arrow_checks_the_offsets_itself() -> None:
    # decode_batch lets Arrow validate the offsets first; from_arrow must not depend on that.
    good = raw_sparse().to_arrow()
    events = pa.ListArray.from_arrays(pa.array([0, 2, 1, 3], pa.int32()), pa.array([1, 2, 3], pa.uint32()))
    rb = pa.RecordBatch.from_arrays(
        [events, pa.array([0, 1, 2], pa.uint32()), pa.array([0, 1, 2], pa.uint64())], schema=good.schema
    )
    with pytest.raises(FrameDecodeError, match="offsets are not monotonic"):
        SparseFrameBatch.from_arrow(rb, HEADER)


def test_offsets_not_covering_the_events_fail_validation() -> None:
    with pytest.raises(FrameDecodeError, match="offsets must run from 0 to len"):
        raw_sparse(offsets=np.array([0, 1, 2])).validate()
    with pytest.raises(FrameDecodeError, match="n_frames \\+ 1"):
        raw_sparse(offsets=np.array([0, 3])).validate()


def test_two_record_batches_in_one_message() -> None:
    rb = small_sparse().to_arrow()
    with pytest.raises(FrameDecodeError, match="exactly one record batch"):
        decode_batch(ipc(rb, rb))


@pytest.mark.parametrize(
    ("tail", "decodes"),
    [
        (b"", True),  # the stream cut before its end-of-stream marker
        (b"\xff\xff\xff\xff\x00\x00\x00\x00", True),  # the marker
        (b"\x00\x00\x00\x00", True),  # the marker of Arrow's legacy framing
        (b"\x01\x02\x03", False),  # bytes that are no message
        (b"\xff\xff\xff\xff\x10\x00\x00\x00", False),  # a message cut short
    ],
    ids=["nothing", "end-of-stream", "legacy-end", "junk", "cut-message"],
)
def test_what_may_follow_the_record_batch(tail: bytes, decodes: bool) -> None:
    batch = small_sparse()
    body = encode_batch(batch)[:-8]  # without its end-of-stream marker
    origin = {"topic": "t", "partition": 0, "offset": 7}
    if decodes:
        got = decode_batch(body + tail, origin)
        assert_sparse_equal(got, batch)
        assert got.origin == origin
    else:
        with pytest.raises(FrameDecodeError):
            decode_batch(body + tail)


def test_stream_with_only_a_schema() -> None:
    rb = small_sparse().to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema):
        pass
    with pytest.raises(FrameDecodeError, match="no record batch"):
        decode_batch(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("data", [b"", b"\xff\xff\xff\xff\x00\x00\x00\x00"], ids=["no-bytes", "end-of-stream-only"])
def test_empty_stream(data: bytes) -> None:
    with pytest.raises(FrameDecodeError, match="empty stream"):
        decode_batch(data)


def test_record_batch_before_the_schema() -> None:
    data = small_sparse().to_bytes()
    messages = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
    messages.read_next_message()  # the schema
    body = messages.read_next_message().serialize().to_pybytes()
    with pytest.raises(FrameDecodeError, match="not a schema"):
        decode_batch(body + data)


def test_stream_in_arrows_legacy_framing_still_decodes() -> None:
    # Arrow < 0.15 wrote messages without the continuation marker; the schema is then read as Arrow does.
    batch = small_sparse()
    rb = batch.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rb.schema, options=pa.ipc.IpcWriteOptions(use_legacy_format=True)) as writer:
        writer.write_batch(rb)
    legacy = sink.getvalue().to_pybytes()
    assert legacy[:4] != b"\xff\xff\xff\xff"
    assert_sparse_equal(decode_batch(legacy), batch)


@pytest.mark.parametrize("cut", [5, 8, 100, -9])
def test_stream_cut_short_is_a_decode_error(cut: int) -> None:
    # The first message's length prefix then points past the bytes there are, or the body is cut.
    data = small_sparse().to_bytes()[:cut]
    with pytest.raises(FrameDecodeError):
        decode_batch(data)


def test_non_beamops_arrow_stream() -> None:
    foreign = pa.record_batch({"a": pa.array([1, 2, 3])})
    with pytest.raises(FrameDecodeError, match="not a beamops frame batch"):
        decode_batch(ipc(foreign))


def test_arrow_file_format_instead_of_stream() -> None:
    rb = small_sparse().to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, rb.schema) as writer:
        writer.write_batch(rb)
    with pytest.raises(FrameDecodeError):
        decode_batch(sink.getvalue().to_pybytes())


def test_beamops_kind_with_foreign_columns() -> None:
    foreign = pa.record_batch({"a": pa.array([1, 2, 3])}).replace_schema_metadata(
        {b"beamops.kind": b"sparse", b"beamops.header": HEADER.to_json()}
    )
    with pytest.raises(FrameDecodeError, match="unexpected columns"):
        decode_batch(ipc(foreign))


def test_unknown_kind() -> None:
    rb = small_sparse().to_arrow()
    rb = rb.replace_schema_metadata({**rb.schema.metadata, b"beamops.kind": b"hologram"})
    with pytest.raises(FrameDecodeError, match=r"not a beamops frame batch.*hologram"):
        decode_batch(ipc(rb))


def test_sparse_columns_declared_dense() -> None:
    rb = small_sparse().to_arrow()
    rb = rb.replace_schema_metadata({**rb.schema.metadata, b"beamops.kind": b"dense"})
    with pytest.raises(FrameDecodeError, match="unexpected columns"):
        decode_batch(ipc(rb))


def test_dense_frame_shape_disagreeing_with_the_header() -> None:
    rb = with_header(small_dense().to_arrow(), frame_shape=[7, 6 + 1])
    with pytest.raises(FrameDecodeError, match="unexpected columns"):
        decode_batch(ipc(rb))


def test_nulls_are_rejected() -> None:
    good = raw_sparse().to_arrow()
    rb = pa.RecordBatch.from_arrays(
        [good.column(0), pa.array([0, None], pa.uint32()), good.column(2)], schema=good.schema
    )
    with pytest.raises(FrameDecodeError, match="nulls"):
        decode_batch(ipc(rb))


def test_null_events_inside_a_list_are_rejected() -> None:
    good = raw_sparse().to_arrow()
    events = pa.ListArray.from_arrays(pa.array([0, 1, 3], pa.int32()), pa.array([1, None, 3], pa.uint32()))
    rb = pa.RecordBatch.from_arrays([events, good.column(1), good.column(2)], schema=good.schema)
    with pytest.raises(FrameDecodeError):
        decode_batch(ipc(rb))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scan_number": -1}, "scan_number must be >= 0"),
        ({"scan_number": "7"}, "scan_number must be an integer"),
        ({"scan_number": True}, "scan_number must be an integer"),
        ({"scan_shape": [0, 5]}, "scan_shape must be two positive ints"),
        ({"scan_shape": [4]}, r"scan_shape must be \[rows, cols\]"),
        ({"scan_shape": [4.0, 5]}, "scan_shape must be an integer"),
        ({"frame_shape": [2**20, 2**20]}, "does not fit uint32"),
        ({"scan_shape": [2**16, 2**16 + 1]}, "does not fit uint32 scan positions"),
        ({"total_frames": 0}, "total_frames must be >= 1"),
        ({"schema_version": None}, "schema_version must be an integer"),
    ],
)
def test_bad_headers(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(FrameDecodeError, match=message):
        decode_batch(ipc(with_header(small_sparse().to_arrow(), **changes)))


@pytest.mark.parametrize(
    "raw_header",
    [b"", b"not json", b"[1, 2]", b'{"scan_number": 1}', b"[" * 100_000, b"\xff\xfe"],
    ids=["empty", "not-json", "list", "missing-keys", "deeply-nested", "not-utf8"],
)
def test_unparseable_headers(raw_header: bytes) -> None:
    rb = small_sparse().to_arrow()
    rb = rb.replace_schema_metadata({b"beamops.kind": b"sparse", b"beamops.header": raw_header})
    with pytest.raises(FrameDecodeError):
        decode_batch(ipc(rb))


def test_sliced_record_batch_decodes_to_its_rows() -> None:
    # Another Arrow writer may send a slice; offsets then do not start at 0.
    batch = raw_sparse(
        events=np.array([1, 2, 3, 4, 5], np.uint32),
        offsets=np.array([0, 1, 3, 5]),
        scan_positions=np.array([0, 19, 4], np.uint32),
        frame_numbers=np.array([0, 1, 2], np.uint64),
    )
    got = decode_batch(ipc(batch.to_arrow().slice(1, 2)))
    assert list(got.events) == [2, 3, 4, 5]
    assert list(got.offsets) == [0, 2, 4]
    assert list(got.scan_positions) == [19, 4]
    assert list(got.frame_numbers) == [1, 2]


# --- ComMap --------------------------------------------------------------


@st.composite
def com_maps(draw: st.DrawFn) -> ComMap:
    header = draw(headers(frame_shape=shapes, scan_shape=shapes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x, y = (rng.normal(100, 30, header.scan_shape).astype(np.float32) for _ in range(2))
    nan_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    x[rng.random(header.scan_shape) < nan_fraction] = np.nan
    y[rng.random(header.scan_shape) < nan_fraction] = np.nan
    return ComMap(
        header,
        x,
        y,
        frames_seen=draw(st.integers(0, 2**40)),
        positions_seen=draw(st.integers(0, header.n_positions)),
        final=draw(st.booleans()),
        complete=draw(st.booleans()),
    )


@FAST
@given(com_maps())
def test_com_map_round_trip(com: ComMap) -> None:
    got = ComMap.from_bytes(com.to_bytes())
    assert got.header == com.header
    assert got.scan_number == com.scan_number
    assert (got.frames_seen, got.positions_seen, got.final, got.complete) == (
        com.frames_seen,
        com.positions_seen,
        com.final,
        com.complete,
    )
    for a, b in ((got.x, com.x), (got.y, com.y)):
        assert a.dtype == np.float32 and a.shape == com.header.scan_shape
        np.testing.assert_array_equal(a, b)  # NaN == NaN here
    np.testing.assert_array_equal(got.stacked(), np.stack([com.x, com.y]))


def test_com_map_x_is_not_swapped_with_y() -> None:
    header = FrameHeader(1, (2, 3), (8, 8))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    com = ComMap(header, x, x + 100, frames_seen=6, positions_seen=6, final=True, complete=True)
    got = ComMap.from_bytes(com.to_bytes())
    assert got.x[1, 2] == 5 and got.y[1, 2] == 105
    assert got.stacked()[0, 1, 2] == 5


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_com_map_from_garbage_raises_frame_decode_error(data: bytes) -> None:
    with pytest.raises(FrameDecodeError):
        ComMap.from_bytes(data)


def test_com_map_from_a_frame_batch_is_an_error() -> None:
    with pytest.raises(FrameDecodeError, match="not a ComMap"):
        ComMap.from_bytes(encode_batch(small_sparse()))


def test_com_map_is_not_a_frame_batch() -> None:
    com = ComMap(HEADER, np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32), 1, 1, False, False)
    with pytest.raises(FrameDecodeError, match="not a beamops frame batch"):
        decode_batch(com.to_bytes())


# --- results and dead letters decode back into elements ----------------------------------------


def _results(header: FrameHeader) -> list[Any]:
    rng = np.random.default_rng(5)
    n, shape = 6, header.scan_shape
    partial = ComPartial(
        header,
        np.arange(n, dtype=np.uint32),
        rng.random(n) * 100,
        rng.random(n) * 100,
        np.arange(n, dtype=np.int64) * 3,
        np.arange(n, dtype=np.uint64) + 40,
    )
    com_map = ComMap(header, rng.random(shape, np.float32), rng.random(shape, np.float32), 12, 6, True, False)
    image = Image(header, "adf", rng.random((3, 5), np.float32), "counts", 12, False, False)
    return [partial, replace(partial, frame_numbers=None), com_map, image]


def test_every_result_decodes_back_from_its_bytes() -> None:
    header = FrameHeader(scan_number=9, scan_shape=(2, 3), frame_shape=(16, 16), total_frames=6)
    for result in _results(header):
        for decoded in (type(result).from_bytes(result.to_bytes()), decode_element(result.to_bytes())):
            assert type(decoded) is type(result) and decoded.header == result.header
            for name, want in vars(result).items():
                got = getattr(decoded, name)
                if isinstance(want, np.ndarray):
                    np.testing.assert_array_equal(got, want)
                    assert got.dtype == want.dtype, name
                elif name != "origin":
                    assert got == want, name
    batch = SparseFrameBatch.from_frames(header, [np.array([1, 2], np.uint32)], [0])
    assert encode_batch(decode_element(batch.to_bytes())) == batch.to_bytes()


def test_bytes_of_another_kind_or_garbage_are_a_decode_error() -> None:
    header = FrameHeader(scan_number=9, scan_shape=(2, 3), frame_shape=(16, 16))
    partial, _, com_map, _ = _results(header)
    with pytest.raises(FrameDecodeError, match="not a ComMap"):
        ComMap.from_bytes(partial.to_bytes())
    with pytest.raises(FrameDecodeError, match="not a ComPartial"):
        ComPartial.from_bytes(com_map.to_bytes())
    for garbage in (b"", b"\x00" * 64, partial.to_bytes()[:-20]):
        with pytest.raises(FrameDecodeError):
            decode_element(garbage)


def test_a_dead_letter_gives_back_its_element() -> None:
    header = FrameHeader(scan_number=9, scan_shape=(2, 3), frame_shape=(16, 16))
    partial = _results(header)[0]
    error = ValueError("bad")
    again = DeadLetter.from_exception("com_reduce", partial, error).element()
    assert isinstance(again, ComPartial)
    np.testing.assert_array_equal(again.sum_x, partial.sum_x)
    assert DeadLetter.from_raw("read_kafka", b"\x01\x02", error, None).element() == b"\x01\x02"
    assert DeadLetter.from_exception("op", {"a": 1}, error).element() == {"a": 1}  # pickled
    unpicklable = DeadLetter.from_exception("op", (lambda: 0), error)
    assert unpicklable.payload_format.startswith("repr")
    with pytest.raises(ValueError, match="cannot be turned back"):
        unpicklable.element()
