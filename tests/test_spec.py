"""OperatorSpec: interactEM operator.json compatibility and specs derived from pydantic parameter models."""

from __future__ import annotations

import enum
import importlib
import inspect
import json
import math
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
from pydantic import BaseModel, Field, ValidationError

import transforms
from beamops import Operator, OperatorParams
from beamops.spec import Mount, OperatorSpec, ParameterSpec, ParameterType, parameters_from_model
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce

# ../shared beside the clone, as the project's checkout and CI lay it out
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "interactem-operators"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _spec_dict(**overrides: Any) -> dict[str, Any]:
    """A minimal valid interactEM operator.json, as a dict."""
    base: dict[str, Any] = {
        "id": "12345678-1234-1234-1234-1234567890ab",
        "image": "example/image",
        "label": "Example",
        "description": "An example operator",
        "parameters": [],
    }
    base.update(overrides)
    return base


def _param(name: str = "p", type: str = "int", default: Any = "1", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "label": name.capitalize(),
        "description": f"the {name}",
        "type": type,
        "default": default,
        "required": False,
        **extra,
    }


# --- interactEM fixtures ---------------------------------------------------


def test_fixture_directory_is_not_empty() -> None:
    # Guards the parametrized tests below against silently running on nothing.
    assert len(FIXTURE_FILES) >= 10, FIXTURE_FILES


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_loads_validates_and_round_trips(path: Path) -> None:
    original = json.loads(path.read_text())
    spec = OperatorSpec.load(path)

    assert str(spec.id) == original["id"]
    assert spec.label == original["label"]
    assert [p.name for p in spec.parameters or []] == [p["name"] for p in original.get("parameters") or []]

    exported = spec.to_json()
    again = OperatorSpec.model_validate_json(exported)
    assert again == spec
    # Exporting is stable: a second round trip gives the same text.
    assert again.to_json() == exported

    # Nothing the fixture says is lost on export; only defaults change, to their typed values.
    dumped = json.loads(exported)
    assert set(dumped) == set(original)
    for key in ("inputs", "outputs", "tags", "parallel_config"):
        assert dumped.get(key) == original.get(key), key
    for got, want in zip(dumped.get("parameters") or [], original.get("parameters") or [], strict=True):
        assert set(got) == set(want)
        assert {k: v for k, v in got.items() if k != "default"} == {k: v for k, v in want.items() if k != "default"}
        assert str(got["default"]).lower() == str(want["default"]).lower() or float(got["default"]) == float(
            want["default"]
        )


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_fixture_defaults_have_their_declared_python_type(path: Path) -> None:
    expected_type = {"int": int, "float": float, "bool": bool, "str": str, "mount": str, "str-enum": str}
    for p in OperatorSpec.load(path).parameters or []:
        if p.default is None:
            continue
        assert type(p.default) is expected_type[p.type.value], (p.name, p.type, p.default)
        if p.type is ParameterType.STR_ENUM:
            assert p.default in (p.options or [])


@pytest.mark.parametrize(
    ("fixture", "name", "expected"),
    [
        ("center-of-mass-partial.json", "crop_to_x", 255),
        ("center-of-mass-partial.json", "init_center_y", 255),
        ("center-of-mass-reduce.json", "emit_every", 50),
        ("data-replay.json", "scan_num", 0),
        ("dpc.json", "flip", True),
        ("dpc.json", "theta", -9.0),
        ("dpc.json", "reg", 0.1),
        ("electron-count.json", "xray_threshold", 2000.0),
        ("data-replay.json", "raw_data_dir", "~/ncem_raw_data"),
        ("sparse-frame-image-converter.json", "colormap", "viridis"),
    ],
)
def test_fixture_string_defaults_are_coerced(fixture: str, name: str, expected: Any) -> None:
    assert isinstance(_fixture(fixture)["parameters"][0]["default"], str)  # the fixtures really hold strings
    params = {p.name: p for p in OperatorSpec.load(FIXTURES / fixture).parameters or []}
    assert params[name].default == expected
    assert type(params[name].default) is type(expected)


def test_fixture_mount_and_enum_types() -> None:
    replay = {p.name: p for p in OperatorSpec.load(FIXTURES / "data-replay.json").parameters or []}
    assert replay["raw_data_dir"].type is ParameterType.MOUNT
    converter = {p.name: p for p in OperatorSpec.load(FIXTURES / "sparse-frame-image-converter.json").parameters or []}
    assert converter["colormap"].type is ParameterType.STR_ENUM
    assert converter["colormap"].options == ["viridis", "plasma", "inferno", "magma", "cividis"]


# --- coercion of string defaults ---------------------------------------------


@pytest.mark.parametrize(
    ("type_", "raw", "expected"),
    [
        ("int", "255", 255),
        ("int", " 7 ", 7),
        ("int", "-3", -3),
        ("int", 4.0, 4),
        ("float", "-9", -9.0),
        ("float", "2000.0", 2000.0),
        ("float", "0.1", 0.1),
        ("float", 3, 3.0),
        ("bool", "true", True),
        ("bool", "True", True),
        ("bool", "false", False),
        ("bool", "0", False),
        ("bool", True, True),
        ("str", "abc", "abc"),
        ("mount", "~/data", "~/data"),
    ],
)
def test_parameter_default_is_coerced_to_declared_type(type_: str, raw: Any, expected: Any) -> None:
    p = ParameterSpec.model_validate(_param(type=type_, default=raw))
    assert p.default == expected
    assert type(p.default) is type(expected)


def test_missing_default_stays_none() -> None:
    raw = _param(type="int")
    del raw["default"]
    assert ParameterSpec.model_validate(raw).default is None


@pytest.mark.parametrize(
    ("type_", "raw"),
    [
        ("int", "abc"),
        ("int", "2.5"),
        ("int", 2.5),
        ("int", True),
        ("float", "fast"),
        ("float", False),
        ("bool", "maybe"),
        ("str", 5),
        ("mount", 5),
    ],
)
def test_bad_default_is_an_error_naming_the_parameter(type_: str, raw: Any) -> None:
    with pytest.raises(ValidationError, match=r"parameter 'bad_value'.*default") as info:
        ParameterSpec.model_validate(_param("bad_value", type=type_, default=raw))
    assert repr(raw) in str(info.value)


def test_bad_int_default_inside_an_operator_spec_names_the_parameter() -> None:
    doc = _spec_dict(parameters=[_param("good"), _param("threshold", type="int", default="abc")])
    with pytest.raises(ValidationError, match=r"parameter 'threshold': default 'abc' is not a valid int"):
        OperatorSpec.model_validate(doc)


def test_str_enum_default_outside_its_options_is_an_error() -> None:
    doc = _spec_dict(parameters=[_param("colormap", type="str-enum", default="jet", options=["viridis", "plasma"])])
    with pytest.raises(ValidationError, match=r"parameter 'colormap'.*'jet'.*options") as info:
        OperatorSpec.model_validate(doc)
    assert "viridis" in str(info.value)


def test_str_enum_default_inside_its_options_is_fine() -> None:
    p = ParameterSpec.model_validate(_param("mode", type="str-enum", default="b", options=["a", "b"]))
    assert p.default == "b"
    assert p.options == ["a", "b"]


@pytest.mark.parametrize("options", [None, []], ids=["missing", "empty"])
def test_str_enum_without_options_is_an_error(options: list[str] | None) -> None:
    raw = _param("mode", type="str-enum", default="a")
    if options is not None:
        raw["options"] = options
    with pytest.raises(ValidationError, match=r"parameter 'mode'.*options"):
        ParameterSpec.model_validate(raw)


def test_options_on_a_non_enum_parameter_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"parameter 'count'.*options"):
        ParameterSpec.model_validate(_param("count", type="int", default="1", options=["1", "2"]))


def test_unknown_parameter_type_is_an_error() -> None:
    with pytest.raises(ValidationError, match="type"):
        ParameterSpec.model_validate(_param("p", type="complex", default="1"))


def test_default_outside_declared_bounds_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"parameter 'n'"):
        ParameterSpec.model_validate(_param("n", type="int", default="5", minimum=6))
    with pytest.raises(ValidationError, match=r"parameter 'n'"):
        ParameterSpec.model_validate(_param("n", type="float", default="5", maximum=4.5))
    assert ParameterSpec.model_validate(_param("n", type="int", default="5", minimum=5, maximum=5)).default == 5


def test_duplicate_parameter_names_are_an_error() -> None:
    doc = _spec_dict(parameters=[_param("a"), _param("b"), _param("a", type="float", default="1.5")])
    with pytest.raises(ValidationError, match=r"duplicate parameter names.*'a'") as info:
        OperatorSpec.model_validate(doc)
    assert "'b'" not in str(info.value)


def test_unknown_top_level_key_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"colour") as info:
        OperatorSpec.model_validate(_spec_dict(colour="blue"))
    assert "extra" in str(info.value).lower()


def test_unknown_parameter_key_is_an_error() -> None:
    with pytest.raises(ValidationError, match=r"units"):
        OperatorSpec.model_validate(_spec_dict(parameters=[_param("p", units="px")]))


def test_invalid_id_is_an_error() -> None:
    with pytest.raises(ValidationError, match="id"):
        OperatorSpec.model_validate(_spec_dict(id="not-a-uuid"))


def test_every_fixture_rejects_an_added_unknown_key(tmp_path: Path) -> None:
    # The same document with one extra key must fail: extra keys are not silently dropped.
    for path in FIXTURE_FILES:
        doc = json.loads(path.read_text())
        doc["unexpected_key"] = 1
        bad = tmp_path / path.name
        bad.write_text(json.dumps(doc))
        with pytest.raises(ValidationError, match="unexpected_key"):
            OperatorSpec.load(bad)


# --- specs derived from pydantic parameter models -------------------------


_EXPECTED_KIND = {int: "int", float: "float", bool: "bool", str: "str"}


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, annotation
        return args[0]
    return annotation


def _check_against_model(params: list[ParameterSpec], model: type[BaseModel]) -> None:
    """The derived parameter list says exactly what the pydantic model says."""
    fields = model.model_fields
    assert [p.name for p in params] == list(fields)
    for p in params:
        info = fields[p.name]
        where = f"{model.__name__}.{p.name}"
        assert p.description == (info.description or ""), where
        if info.title:
            assert p.label == info.title, where
        assert p.required == info.is_required(), where
        if info.is_required():
            assert p.default is None, where
        else:
            want = info.get_default(call_default_factory=True)
            want = want.value if isinstance(want, enum.Enum) else want
            assert p.default == want and type(p.default) is type(want), (where, p.default, want)

        base = _unwrap_optional(info.annotation)
        if typing.get_origin(base) is Literal:
            assert p.type is ParameterType.STR_ENUM, where
            assert p.options == [str(a) for a in typing.get_args(base)], where
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            assert p.type is ParameterType.STR_ENUM, where
            assert p.options == [str(m.value) for m in base], where
        elif any(type(m).__name__ == "_MountMarker" for m in info.metadata):
            assert p.type is ParameterType.MOUNT, where
        else:
            assert p.type.value == _EXPECTED_KIND[base], where
            assert p.options is None, where

        ge = [m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)]
        le = [m.le for m in info.metadata if isinstance(m, annotated_types.Le)]
        gt = [m.gt for m in info.metadata if isinstance(m, annotated_types.Gt)]
        lt = [m.lt for m in info.metadata if isinstance(m, annotated_types.Lt)]
        assert p.minimum == (ge[0] if ge else None), where
        assert p.maximum == (le[0] if le else None), where
        # A strict bound must not be published as an inclusive one (gt=0 does not allow 0).
        assert p.exclusive_minimum == (gt[0] if gt else None), where
        assert p.exclusive_maximum == (lt[0] if lt else None), where


@pytest.mark.parametrize("op", [com_partial, com_reduce], ids=lambda op: op.name)
def test_derived_spec_matches_the_params_model(op: type[Operator]) -> None:
    spec = op.spec()
    assert spec.parameters, "an operator with parameters must publish them"
    _check_against_model(spec.parameters, op.Params)


def test_com_partial_spec_details() -> None:
    spec = com_partial.spec()
    params = {p.name: p for p in spec.parameters or []}
    assert list(params) == ["init_center_x", "init_center_y", "crop_to_x", "crop_to_y", "crop_radius", "device"]
    crop = [p for name, p in params.items() if name != "device"]
    assert all(p.type is ParameterType.FLOAT and p.default is None and not p.required for p in crop)
    device = params["device"]
    assert (device.type, device.options, device.default) == (ParameterType.STR_ENUM, ["cpu", "cuda", "auto"], "auto")
    for name in ("crop_to_x", "crop_to_y", "crop_radius"):
        assert params[name].minimum == 0
    assert params["init_center_x"].minimum is None
    # interactEM-mirroring names say which axis they mean (DESIGN.md section 5).
    assert "column" in params["init_center_x"].description
    assert "row" in params["init_center_y"].description
    assert [(p.name, p.type) for p in spec.inputs or []] == [("in", "sparse_frames")]
    assert [(p.name, p.type) for p in spec.outputs or []] == [("com_partial", "com_partial")]
    assert spec.parallel_config is not None and spec.parallel_config.type.value == "embarrassing"


def test_com_reduce_spec_details() -> None:
    spec = com_reduce.spec()
    params = {p.name: p for p in spec.parameters or []}
    assert params["emit_every"].type is ParameterType.INT
    assert params["emit_every"].default == 10_000
    assert params["emit_every"].minimum == 0
    assert params["timeout_s"].type is ParameterType.FLOAT
    assert params["timeout_s"].default == 300.0
    assert params["replace_nans"].type is ParameterType.BOOL
    assert params["replace_nans"].default is False
    assert [(p.name, p.type) for p in spec.inputs or []] == [("in", "com_partial")]
    assert [(p.name, p.type) for p in spec.outputs or []] == [("com_map", "com_map")]
    # com_reduce keeps keyed state: it must not claim to be embarrassingly parallel.
    assert spec.parallel_config is None or spec.parallel_config.type.value == "none"


def test_operator_id_is_stable_and_distinct() -> None:
    assert com_partial.spec().id == com_partial.spec().id
    assert com_partial.spec().id != com_reduce.spec().id


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class _ExampleParams(OperatorParams):
    count: int = Field(3, ge=1, le=10, title="Count", description="How many.")
    scale: float = Field(1.5, gt=0, lt=100, description="A strictly positive scale.")
    enabled: bool = Field(True, description="On or off.")
    label: str = Field("x", description="Free text.")
    mode: Literal["fast", "exact"] = Field("exact", description="Which algorithm.")
    maybe_mode: Literal["a", "b"] | None = Field(None, description="Optional choice.")
    colour: Colour = Field(Colour.GREEN, description="An enum.")
    data_dir: Mount = Field("/data", description="A directory to mount.")
    needed: int = Field(description="A required parameter.")


def test_parameters_from_an_example_model() -> None:
    params = parameters_from_model(_ExampleParams)
    _check_against_model(params, _ExampleParams)
    by_name = {p.name: p for p in params}
    assert by_name["mode"].type is ParameterType.STR_ENUM
    assert by_name["mode"].options == ["fast", "exact"]
    assert by_name["mode"].default == "exact"
    assert by_name["maybe_mode"].options == ["a", "b"]
    assert by_name["maybe_mode"].default is None
    assert by_name["colour"].default == "green"
    assert by_name["data_dir"].type is ParameterType.MOUNT
    assert by_name["data_dir"].default == "/data"
    assert by_name["needed"].required is True
    assert by_name["count"].label == "Count"
    assert (by_name["count"].minimum, by_name["count"].maximum) == (1, 10)
    assert by_name["label"].label == "Label"  # derived from the name when there is no title


def test_example_model_spec_round_trips_through_json() -> None:
    params = parameters_from_model(_ExampleParams)
    doc = _spec_dict(parameters=[p.model_dump(mode="json", exclude_none=True) for p in params])
    spec = OperatorSpec.model_validate(doc)
    assert spec.parameters == params
    exported = OperatorSpec.model_validate_json(spec.to_json())
    assert exported == spec.exported() and exported.exported() == exported
    by_name = {p.name: p for p in exported.parameters or []}
    # interactEM needs a default of the parameter's own type: "" stands for unset
    assert (by_name["maybe_mode"].default, by_name["maybe_mode"].options) == ("", ["", "a", "b"])
    assert (by_name["needed"].type, by_name["needed"].default, by_name["needed"].required) == (
        ParameterType.STR,
        "",
        True,
    )
    assert by_name["colour"] == next(p for p in params if p.name == "colour")  # a default is kept as it is


def test_optional_mount_parameter_is_a_mount() -> None:
    class OptionalMountParams(OperatorParams):
        data_dir: Mount | None = Field(None, description="Unset: no mount.")

    (p,) = parameters_from_model(OptionalMountParams)
    assert p.type is ParameterType.MOUNT
    assert p.default is None


def test_unsupported_parameter_type_is_an_error() -> None:
    class BadParams(OperatorParams):
        values: list[int] = Field(default_factory=list)

    with pytest.raises(TypeError, match="no interactEM equivalent"):
        parameters_from_model(BadParams)


def _catalog() -> list[type[Operator]]:
    found: dict[str, type[Operator]] = {}
    for info in pkgutil.iter_modules(transforms.__path__):
        module = importlib.import_module(f"transforms.{info.name}")
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Operator)
                and obj.__module__ == module.__name__
                and "name" in obj.__dict__
            ):
                found[obj.name] = obj
    return [found[k] for k in sorted(found)]


CATALOG = _catalog()


def test_catalog_holds_the_com_chain() -> None:
    names = {op.name for op in CATALOG}
    assert {"com_partial", "com_reduce"} <= names, names


@pytest.mark.parametrize("op", CATALOG, ids=lambda op: op.name)
def test_exported_json_of_every_operator_validates(op: type[Operator]) -> None:
    spec = op.spec()
    exported = spec.to_json()
    loaded = OperatorSpec.model_validate_json(exported)
    assert loaded == spec.exported()
    assert loaded.to_json() == exported
    assert loaded.label and loaded.description
    _check_against_model(spec.parameters or [], op.Params)
    _check_interactem_accepts(json.loads(exported))
    for p in loaded.parameters or []:
        if isinstance(p.default, float):
            assert math.isfinite(p.default)


def _check_interactem_accepts(doc: dict[str, Any]) -> None:
    """The rules interactEM's own models (core/models/spec.py) put on an operator.json beyond ours:
    every parameter has a default, of its type (a str-enum's among its options); a trigger has at
    least a name and a label."""
    types_of = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "mount": (str,)}
    for p in doc.get("parameters") or []:
        assert "default" in p, p["name"]
        if p["type"] == "str-enum":
            assert p["default"] in p["options"], p["name"]
        else:
            assert isinstance(p["default"], types_of[p["type"]]), p["name"]
            assert p["type"] == "bool" or not isinstance(p["default"], bool), p["name"]
    for t in doc.get("triggers") or []:
        assert {"name", "label"} <= set(t), t


def test_a_trigger_in_interactems_current_form_loads() -> None:
    # interactEM's triggers have an optional description and a mode (single: once; drain: until drained).
    doc = _spec_dict(triggers=[{"name": "read_now", "label": "Read now", "mode": "drain"}])
    (trigger,) = OperatorSpec.model_validate(doc).triggers or []
    assert (trigger.mode, trigger.description) == ("drain", None)
    assert json.loads(OperatorSpec.model_validate(doc).to_json())["triggers"] == doc["triggers"]
    with pytest.raises(ValidationError, match="mode"):
        OperatorSpec.model_validate(_spec_dict(triggers=[{"name": "r", "label": "R", "mode": "sometimes"}]))
