"""ArrayRecordCoder: the Beam coder of the batch and result types round-trips them exactly."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import registry
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # alias: not a pytest class
from apache_beam.testing.util import assert_that

from beamops import ComMap, ComPartial, DenseFrameBatch, FrameHeader, Image, SparseFrameBatch
from beamops.coders import ArrayRecordCoder
from beamops.testing import dense_batches, matcher, small_scan
from transforms.com_partial import com_partial


def records() -> list[object]:
    sim = small_scan()
    sparse = sim.batch(0, 12).with_origin({"source": "hdf5", "path": "/x.h5", "rows": (0, 12)})
    partial = com_partial().process(sparse)
    header = FrameHeader(scan_number=3, scan_shape=(2, 3), frame_shape=(4, 4), total_frames=6)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return [
        sparse,
        dense_batches(sim, 5)[1],
        partial,
        dataclasses.replace(partial, frame_numbers=None),
        ComPartial(header, *(np.zeros(0, t) for t in (np.uint32, np.float64, np.float64, np.int64))),
        ComMap(header, x, -x, frames_seen=5, positions_seen=4, final=True, complete=False),
        Image(header, "bright_field", np.ones((2, 3), np.uint64), units="counts", frames_seen=6),
    ]


def same(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            if not (isinstance(vb, np.ndarray) and va.dtype == vb.dtype and np.array_equal(va, vb)):
                return False
        elif va != vb:
            return False
    return True


@pytest.mark.parametrize("record", records(), ids=lambda r: type(r).__name__)
def test_round_trip_keeps_every_field_dtype_and_shape(record):
    coder = registry.get_coder(type(record))
    assert isinstance(coder, ArrayRecordCoder)
    decoded = coder.decode(coder.encode(record))
    assert same(decoded, record)
    for f in dataclasses.fields(decoded):
        value = getattr(decoded, f.name)
        if isinstance(value, np.ndarray) and value.size:
            assert value.ctypes.data % value.dtype.alignment == 0, f"{f.name} is not aligned"
            assert not value.flags.writeable, "decoded arrays are read-only views, like Arrow's"


@pytest.mark.parametrize("record", records(), ids=lambda r: type(r).__name__)
def test_estimated_size_is_the_encoded_size_less_padding_and_small_fields(record, monkeypatch):
    coder = registry.get_coder(type(record))
    encoded = len(coder.encode(record))
    monkeypatch.setattr(coder, "encode", None)  # Beam's default estimate encodes: this one must not
    estimate = coder.estimate_size(record)
    arrays = sum(1 for f in dataclasses.fields(record) if isinstance(getattr(record, f.name), np.ndarray))
    assert encoded - 7 * arrays - 400 <= estimate <= encoded


def test_non_contiguous_arrays_are_encoded_in_c_order():
    header = FrameHeader(scan_number=1, scan_shape=(3, 2), frame_shape=(4, 4))
    x = np.arange(6, dtype=np.float32).reshape(2, 3).T  # Fortran order
    m = ComMap(header, x, x, frames_seen=6, positions_seen=6, final=True, complete=True)
    decoded = ArrayRecordCoder(ComMap).decode(ArrayRecordCoder(ComMap).encode(m))
    assert np.array_equal(decoded.x, x) and decoded.x.flags.c_contiguous


def test_object_arrays_are_refused_with_the_field_name():
    header = FrameHeader(scan_number=1, scan_shape=(1, 1), frame_shape=(4, 4))
    bad = Image(header, "x", np.array([object()], dtype=object))
    with pytest.raises(TypeError, match=r"Image\.data"):
        ArrayRecordCoder(Image).encode(bad)


def test_only_dataclasses_with_a_header_get_this_coder():
    with pytest.raises(TypeError, match="header"):
        ArrayRecordCoder(dict)


def test_a_keyed_shuffle_of_partials_uses_it_and_keeps_them_equal():
    partials = [com_partial().process(b) for b in small_scan().batches(12)]
    key_coder = registry.get_coder(beam.typehints.Tuple[int, ComPartial])
    assert "ArrayRecordCoder[ComPartial]" in repr(key_coder)

    def check(got):
        got = sorted(got, key=lambda p: int(p.frame_numbers[0]))
        assert len(got) == len(partials) and all(same(g, p) for g, p in zip(got, partials, strict=True))

    with BeamTestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:  # not Prism: it downloads
        shuffled = (
            p
            | beam.Create([(1, x) for x in partials]).with_output_types(tuple[int, ComPartial])
            | beam.GroupByKey()
            | beam.FlatMap(lambda kv: kv[1]).with_output_types(ComPartial)
        )
        assert_that(shuffled, matcher(check))


@pytest.mark.parametrize("kind", [SparseFrameBatch, DenseFrameBatch])
def test_frame_batches_are_registered(kind):
    assert registry.get_coder(kind) == ArrayRecordCoder(kind)
