"""Command-line options derived from operator parameter models.

A job exposes each of its operators' parameters as ``--name`` with the type,
default and description of the pydantic field, so the parameters are still
declared once. Values are validated by the operators when the pipeline is
built, so a bad value fails before anything runs, naming the operator.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from beamops.operator import Operator
from beamops.spec import ParameterType, parameters_from_model


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_CONVERTERS = {
    ParameterType.INT: int,
    ParameterType.FLOAT: float,
    ParameterType.BOOL: parse_bool,
    ParameterType.STR: str,
    ParameterType.MOUNT: str,
    ParameterType.STR_ENUM: str,
}


def add_operator_arguments(parser: Any, operators: Iterable[type[Operator]]) -> None:
    """Add ``--<parameter>`` for every parameter of ``operators`` (names must not clash)."""
    seen: dict[str, str] = {}
    for op in operators:
        group = (
            parser.add_argument_group(f"{op.name} ({op.title})") if hasattr(parser, "add_argument_group") else parser
        )
        for p in parameters_from_model(op.Params):
            if p.name in seen:
                raise ValueError(f"parameter --{p.name} of {op.name} clashes with the one of {seen[p.name]}")
            seen[p.name] = op.name
            default = "unset" if p.default is None else p.default
            group.add_argument(
                f"--{p.name}",
                dest=p.name,
                type=_CONVERTERS[p.type],
                choices=p.options,
                default=None,
                help=f"{p.description} [{p.type.value}; default: {default}]",
            )


def operator_params(values: dict[str, Any], op: type[Operator]) -> dict[str, Any]:
    """The parameters of ``op`` that were given on the command line."""
    return {name: values[name] for name in op.Params.model_fields if values.get(name) is not None}
