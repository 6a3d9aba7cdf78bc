"""Port types: the registered Python types that flow between operators.

A port's type in ``operator.json`` is the registered name; in a pipeline it is
the Python class, checked when the pipeline is built.
"""

from __future__ import annotations

from beamops.frames import DenseFrameBatch, SparseFrameBatch
from beamops.results import ComMap, ComPartial, Image


class PortTypeError(TypeError):
    """Two ports with incompatible types were connected."""


_BY_NAME: dict[str, type] = {}
_BY_TYPE: dict[type, str] = {}


def register_port_type(cls: type, name: str) -> type:
    """Make ``cls`` usable as a port type under ``name`` (its operator.json type)."""
    if _BY_NAME.get(name, cls) is not cls:
        raise ValueError(f"port type name {name!r} is already registered for {_BY_NAME[name].__qualname__}")
    _BY_NAME[name] = cls
    _BY_TYPE[cls] = name
    return cls


def port_type_name(cls: type) -> str:
    try:
        return _BY_TYPE[cls]
    except KeyError:
        raise PortTypeError(
            f"{cls!r} is not a registered port type; call beamops.register_port_type({cls.__name__}, 'name')"
        ) from None


def port_type(name: str) -> type:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise PortTypeError(f"unknown port type {name!r}; known: {sorted(_BY_NAME)}") from None


def check_connection(upstream: str, produced: type | None, downstream: str, expected: type) -> None:
    """Raise PortTypeError unless ``produced`` may flow into a port of type ``expected``.

    ``produced`` is None when the upstream PCollection declares no type; that
    connection is allowed, and Beam checks the elements at run time.
    """
    if produced is None or not isinstance(produced, type):
        return
    if not issubclass(produced, expected):
        raise PortTypeError(
            f"cannot connect {upstream} (produces {_describe(produced)}) "
            f"to {downstream} (expects {_describe(expected)})"
        )


def _describe(cls: type) -> str:
    name = _BY_TYPE.get(cls)
    return f"{cls.__name__} [{name}]" if name else cls.__name__


register_port_type(SparseFrameBatch, "sparse_frames")
register_port_type(DenseFrameBatch, "dense_frames")
register_port_type(ComPartial, "com_partial")
register_port_type(ComMap, "com_map")
register_port_type(Image, "image")
register_port_type(bytes, "bytes")
register_port_type(str, "path")
