"""Beam coders for beamops' batch and result types: numpy arrays as raw bytes, not pickles.

Elements cross a coder wherever a runner moves them between stages: at the
keyed shuffle in front of every per-scan reduction, and between the Python
worker and Flink. Beam's default for these dataclasses pickles each numpy
array (about 37 us to encode and decode a 1000-frame ComPartial here);
:class:`ArrayRecordCoder` writes the header JSON, each array's dtype, shape
and bytes, and pickles only the few small fields left (about 20 us), and
decodes arrays as read-only views into the encoded bytes, as Arrow decoding
does.

Layout (little-endian): the header JSON (u32 length first); then one record
per array field in declaration order: a tag byte (0 = None, 1 = array), and
for an array its dtype string (u8 length first), ndim (u8), shape (u64 each),
padding to 8 bytes, its C-order bytes; then a pickle of the remaining fields.
The bytes are meant for runners, not storage: files and Kafka use the
documented Arrow IPC format (``to_bytes``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
import struct
import typing
from typing import Any

import numpy as np
from apache_beam import coders

from beamops.frames import DenseFrameBatch, FrameHeader, SparseFrameBatch
from beamops.results import ComMap, ComPartial, Image

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_NONE, _ARRAY = 0, 1
_NONE_TAG = _U8.pack(_NONE)
_PADDING = [b"\0" * n for n in range(8)]


class ArrayRecordCoder(coders.Coder):
    """Coder for a frozen dataclass with a ``header: FrameHeader``, numpy array fields and small other fields."""

    def __init__(self, record_type: type) -> None:
        if not (
            dataclasses.is_dataclass(record_type) and any(f.name == "header" for f in dataclasses.fields(record_type))
        ):
            raise TypeError(f"{record_type!r} is not a dataclass with a header field")
        self._type = record_type
        self._arrays, self._others = _array_fields(record_type)

    @classmethod
    def from_type_hint(cls, typehint: Any, registry: Any) -> ArrayRecordCoder:
        return cls(typehint)

    def encode(self, value: Any) -> bytes:
        self._check_type(value)
        header = _header_json(value.header)
        parts: list[Any] = [_U32.pack(len(header)), header]
        size = _U32.size + len(header)
        for name in self._arrays:
            array = getattr(value, name)
            if array is None:
                parts.append(_NONE_TAG)
                size += 1
                continue
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            if array.dtype.hasobject:
                raise TypeError(f"{self._type.__name__}.{name}: cannot encode an array of Python objects")
            packer, dtype = _array_meta(array.dtype.str, array.ndim)
            meta = packer.pack(_ARRAY, len(dtype), dtype, array.ndim, *array.shape)
            size += len(meta)
            pad = -size % 8  # aligned arrays: numba compiles one specialisation, not an unaligned second one
            parts += [meta, _PADDING[pad], array.data.cast("B") if array.size else b""]
            size += pad + array.nbytes
        parts.append(pickle.dumps(tuple(getattr(value, name) for name in self._others), pickle.HIGHEST_PROTOCOL))
        return b"".join(parts)

    def decode(self, encoded: bytes) -> Any:
        view = memoryview(encoded)
        (length,) = _U32.unpack_from(view, 0)
        offset = _U32.size + length
        fields: dict[str, Any] = {"header": FrameHeader.from_json(bytes(view[_U32.size : offset]))}
        for name in self._arrays:
            tag = view[offset]
            offset += 1
            if tag == _NONE:
                fields[name] = None
                continue
            dtype_len = view[offset]
            dtype = _dtype(bytes(view[offset + 1 : offset + 1 + dtype_len]))
            offset += 1 + dtype_len
            ndim = view[offset]
            shape = _shape_struct(ndim).unpack_from(view, offset + 1)
            offset += 1 + 8 * ndim
            offset += -offset % 8
            count = math.prod(shape)
            fields[name] = np.frombuffer(encoded, dtype, count, offset).reshape(shape)
            offset += count * dtype.itemsize
        fields.update(zip(self._others, pickle.loads(view[offset:]), strict=True))
        return self._type(**fields)

    def estimate_size(self, value: Any) -> int:
        """The size encode() writes, less the padding and the pickled small fields, without encoding.

        Beam sizes sampled elements for its output counters; by default it encodes them to count.
        """
        self._check_type(value)
        size = _U32.size + len(_header_json(value.header))
        for name in self._arrays:
            array = getattr(value, name)
            size += 1 if array is None else 3 + len(array.dtype.str) + 8 * array.ndim + array.nbytes
        return size

    def _check_type(self, value: Any) -> None:
        # Else a step that emits the wrong type fails deep in here, on an attribute it happens to lack.
        if not isinstance(value, self._type):
            raise TypeError(
                f"{self!r} got a {type(value).__name__}: a step emitted a type its output port does not declare "
                f"(it takes {self._type.__name__})"
            )

    def is_deterministic(self) -> bool:
        return False  # values only; never a key

    def to_type_hint(self) -> type:
        return self._type

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._type is self._type

    def __hash__(self) -> int:
        return hash((type(self), self._type))

    def __repr__(self) -> str:
        return f"ArrayRecordCoder[{self._type.__name__}]"


@functools.cache
def _array_fields(record_type: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(numpy array fields, other fields except the header) of ``record_type``, from its annotations."""
    hints = typing.get_type_hints(record_type)
    arrays, others = [], []
    for f in dataclasses.fields(record_type):
        if f.name == "header":
            continue
        hint = hints[f.name]
        (arrays if hint is np.ndarray or np.ndarray in typing.get_args(hint) else others).append(f.name)
    return tuple(arrays), tuple(others)


@functools.lru_cache(maxsize=256)
def _array_meta(dtype_str: str, ndim: int) -> tuple[struct.Struct, bytes]:
    """(packer of an array record's tag, dtype and shape; the dtype string) for arrays of this dtype and ndim."""
    dtype = dtype_str.encode()
    return struct.Struct(f"<BB{len(dtype)}sB{ndim}Q"), dtype


@functools.lru_cache(maxsize=256)
def _dtype(raw: bytes) -> np.dtype:
    return np.dtype(raw.decode())


@functools.lru_cache(maxsize=64)
def _shape_struct(ndim: int) -> struct.Struct:
    return struct.Struct(f"<{ndim}Q")


@functools.lru_cache(maxsize=1024)
def _header_json(header: FrameHeader) -> bytes:
    # every batch of a scan has an equal header: serialise it once
    return header.to_json()


for _record_type in (SparseFrameBatch, DenseFrameBatch, ComPartial, ComMap, Image):
    coders.registry.register_coder(_record_type, ArrayRecordCoder)
