"""Operator specifications, compatible with interactEM's ``operator.json``.

An :class:`OperatorSpec` loads any interactEM spec: interactEM writes every
default as a string ("255", "true", "-9"), and those are coerced to the
parameter's declared type. beamops adds optional fields that interactEM
ignores: ``minimum``/``maximum`` and ``exclusive_minimum``/``exclusive_maximum``
bounds on numeric parameters.

In a beamops spec an optional parameter may be unset by default (``default``
None). interactEM requires every parameter to carry a default of its type, so
:meth:`OperatorSpec.to_json` writes such a parameter as a string parameter
whose default ``""`` means unset (a number has no value for "unset"); see
:meth:`OperatorSpec.exported`.

beamops operators never write a spec by hand: :func:`parameters_from_model`
derives the parameter list from the operator's pydantic parameter model.
"""

from __future__ import annotations

import enum
import json
import types
import typing
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic.fields import FieldInfo

# Operators without an explicit id get a stable UUID derived from their name.
BEAMOPS_NAMESPACE = uuid.UUID("6f1c2a52-9a55-4d43-9c53-5b0a3c1e7f21")


class ParameterType(enum.StrEnum):
    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    MOUNT = "mount"
    STR_ENUM = "str-enum"


class ParallelType(enum.StrEnum):
    NONE = "none"
    EMBARRASSING = "embarrassing"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortSpec(_Model):
    """An input or output port. ``type`` is a registered port type name."""

    name: str
    label: str
    description: str
    type: str


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce_value(kind: ParameterType, value: Any, name: str) -> Any:
    """Coerce ``value`` (often a string from interactEM) to ``kind``."""
    if value is None:
        return None
    try:
        if kind is ParameterType.INT:
            if isinstance(value, bool):
                raise ValueError("a bool is not an int")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{value} is not a whole number")
                return int(value)
            return int(str(value).strip())
        if kind is ParameterType.FLOAT:
            if isinstance(value, bool):
                raise ValueError("a bool is not a float")
            return float(str(value).strip()) if isinstance(value, str) else float(value)
        if kind is ParameterType.BOOL:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(f"{value!r} is not one of {sorted(_TRUE | _FALSE)}")
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value
    except ValueError as exc:
        raise ValueError(f"parameter {name!r}: default {value!r} is not a valid {kind.value}: {exc}") from exc


class ParameterSpec(_Model):
    """One operator parameter, as interactEM describes it."""

    name: str
    label: str
    description: str
    type: ParameterType
    default: Any = None
    required: bool
    options: list[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None

    @model_validator(mode="after")
    def _coerce_and_check(self) -> ParameterSpec:
        self.default = coerce_value(self.type, self.default, self.name)
        if self.type is ParameterType.STR_ENUM:
            if not self.options:
                raise ValueError(f"parameter {self.name!r}: a str-enum needs a non-empty 'options' list")
            if self.default is not None and self.default not in self.options:
                raise ValueError(
                    f"parameter {self.name!r}: default {self.default!r} is not one of its options {self.options}"
                )
        elif self.options is not None:
            raise ValueError(f"parameter {self.name!r}: only str-enum parameters take 'options'")
        if self.default is not None and self.type in (ParameterType.INT, ParameterType.FLOAT):
            for bound, ok in (
                (self.minimum, lambda b: self.default >= b),
                (self.maximum, lambda b: self.default <= b),
                (self.exclusive_minimum, lambda b: self.default > b),
                (self.exclusive_maximum, lambda b: self.default < b),
            ):
                if bound is not None and not ok(bound):
                    raise ValueError(f"parameter {self.name!r}: default {self.default} is outside its bounds")
        return self


class TagSpec(_Model):
    value: str
    description: str | None = None


class ParallelConfig(_Model):
    type: ParallelType = ParallelType.NONE


class TriggerMode(enum.StrEnum):
    """How interactEM invokes a trigger: once, or on each item until the operator drains."""

    SINGLE = "single"
    DRAIN = "drain"


class TriggerSpec(_Model):
    """An action a user can fire on a running operator (for example 'reset')."""

    name: str
    label: str
    description: str | None = None
    mode: TriggerMode = TriggerMode.SINGLE


class OperatorSpec(_Model):
    """What an operator is, what it consumes and produces, and its parameters."""

    id: uuid.UUID
    label: str
    description: str
    image: str
    inputs: list[PortSpec] | None = None
    outputs: list[PortSpec] | None = None
    parameters: list[ParameterSpec] | None = None
    tags: list[TagSpec] | None = None
    parallel_config: ParallelConfig | None = None
    triggers: list[TriggerSpec] | None = None

    @field_validator("parameters")
    @classmethod
    def _unique_parameter_names(cls, params: list[ParameterSpec] | None) -> list[ParameterSpec] | None:
        names = [p.name for p in params or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate parameter names: {dupes}")
        return params

    def exported(self) -> OperatorSpec:
        """This spec as interactEM loads it: every parameter has a default of its type. A parameter
        unset by default (or required) gets the default "" for unset: a str-enum gains the option "",
        and a number or bool becomes a string parameter, since it has no value for unset."""
        parameters = [p if p.default is not None else _unset_for_interactem(p) for p in self.parameters or []]
        return self.model_copy(update={"parameters": parameters}) if self.parameters else self

    def to_json(self) -> str:
        """The operator.json of :meth:`exported`."""
        return json.dumps(self.exported().model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> OperatorSpec:
        return cls.model_validate_json(Path(path).read_text())


def _unset_for_interactem(param: ParameterSpec) -> ParameterSpec:
    if param.type is ParameterType.STR_ENUM:  # interactEM's default must be one of the options
        return param.model_copy(update={"default": "", "options": ["", *(param.options or [])]})
    if param.type in (ParameterType.STR, ParameterType.MOUNT):
        return param.model_copy(update={"default": ""})
    bounds = dict.fromkeys(("minimum", "maximum", "exclusive_minimum", "exclusive_maximum"))
    return param.model_copy(update={"type": ParameterType.STR, "default": "", **bounds})


# --- deriving parameter specs from pydantic models -------------------------


class _MountMarker:
    """Marks a str parameter as a directory to mount (interactEM's 'mount' type)."""


Mount = Annotated[str, _MountMarker()]


class OutputFiles:
    """Marks a Mount parameter as the directory an operator writes its files into; ``names`` says how they
    are named, for people.

    Two instances of one such operator that write into the same directory overwrite each other's files,
    which a pipeline definition refuses. ``named_by_image``: the names follow the input image's name,
    which the upstream operator's parameters give (an ``image_names`` attribute); writers fed images of
    different names do not collide, and without ``image_names`` the check cannot tell and lets them be.

    ``glob`` matches its final files, so that a run can say first which ones an earlier run left there.

        out_dir: Annotated[Mount, OutputFiles("scan_<N>.h5", glob="scan_*.h5")] = Field("out")
    """

    def __init__(self, names: str, *, glob: str, named_by_image: bool = False) -> None:
        self.names = names
        self.glob = glob
        self.named_by_image = named_by_image


def output_files(model: type[BaseModel]) -> dict[str, OutputFiles]:
    """The parameters of ``model`` that are directories its operator writes files into."""
    found = {}
    for name, info in model.model_fields.items():
        for marker in _metadata(info):
            if isinstance(marker, OutputFiles):
                found[name] = marker
    return found


_SCALARS: dict[Any, ParameterType] = {
    bool: ParameterType.BOOL,
    int: ParameterType.INT,
    float: ParameterType.FLOAT,
    str: ParameterType.STR,
}


def _strip_optional(annotation: Any) -> tuple[Any, list[Any]]:
    """The type under ``Optional``/``Annotated`` wrappers, and the Annotated metadata met on the way."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
        raise TypeError(f"unsupported union parameter type {annotation!r}")
    if origin is Annotated:
        inner, *metadata = typing.get_args(annotation)
        base, more = _strip_optional(inner)
        return base, [*metadata, *more]
    return annotation, []


def _parameter_type(annotation: Any) -> tuple[ParameterType, list[str] | None]:
    base, _ = _strip_optional(annotation)
    if typing.get_origin(base) is Literal:
        options = list(typing.get_args(base))
        if not all(isinstance(o, str) for o in options):
            raise TypeError(f"Literal parameter options must be strings (a str-enum), got {options!r}")
        return ParameterType.STR_ENUM, options
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return ParameterType.STR_ENUM, [str(m.value) for m in base]
    if base in _SCALARS:
        return _SCALARS[base], None
    raise TypeError(f"parameter type {annotation!r} has no interactEM equivalent (use str, int, float, bool, Literal)")


def _metadata(info: FieldInfo) -> list[Any]:
    """Field metadata, including what sits in an Annotated under Optional (``Mount | None``)."""
    found = [*info.metadata, *_strip_optional(info.annotation)[1]]
    return [*found, *(m for f in found if isinstance(f, FieldInfo) for m in f.metadata)]


def _bounds(info: FieldInfo) -> dict[str, float]:
    """minimum / maximum / exclusive_minimum / exclusive_maximum from Field(ge=, le=, gt=, lt=)."""
    bounds = {}
    for m in _metadata(info):
        if isinstance(m, annotated_types.Ge):
            bounds["minimum"] = m.ge
        elif isinstance(m, annotated_types.Gt):
            bounds["exclusive_minimum"] = m.gt
        elif isinstance(m, annotated_types.Le):
            bounds["maximum"] = m.le
        elif isinstance(m, annotated_types.Lt):
            bounds["exclusive_maximum"] = m.lt
    return bounds


def parameters_from_model(model: type[BaseModel]) -> list[ParameterSpec]:
    """The interactEM parameter list of a pydantic parameter model."""
    specs = []
    for name, info in model.model_fields.items():
        kind, options = _parameter_type(info.annotation)
        if any(isinstance(m, _MountMarker) for m in _metadata(info)):
            kind = ParameterType.MOUNT
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if isinstance(default, enum.Enum):
            default = default.value
        specs.append(
            ParameterSpec(
                name=name,
                label=info.title or name.replace("_", " ").capitalize(),
                description=info.description or "",
                type=kind,
                default=default,
                required=info.is_required(),
                options=options,
                **_bounds(info),
            )
        )
    return specs


def stable_operator_id(name: str) -> uuid.UUID:
    return uuid.uuid5(BEAMOPS_NAMESPACE, f"beamops/{name}")
