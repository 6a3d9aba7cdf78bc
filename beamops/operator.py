"""Operators: Beam PTransforms that carry an interactEM-compatible spec.

Two ways to write one:

* :func:`operator` turns a function ``batch, params -> result`` into an
  operator class (the common case: one batch in, one result out);
* subclass :class:`Operator` and implement :meth:`Operator.build` for
  stateful or multi-output operators.

Either way the parameters are one pydantic model (a subclass of
:class:`OperatorParams`); the spec and ``operator.json`` are derived from it.
Applying an operator returns :class:`OperatorOutputs`: one PCollection per
output port plus ``dead_letter``. Operators chain (``frames | A() | B()``);
each one forwards the dead letters of the operators before it. A dead letter
names the operator (``operator``) and the instance (``instance``: the label it
was applied with, ``"label" >> A()``, else the class name), so two instances of
one operator can be told apart.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import logging
import re
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.pipeline import PipelineVisitor
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from beamops.deadletter import DeadLetter
from beamops.ports import check_connection, port_type_name, register_port_type
from beamops.provenance import Provenance, Step, stamp
from beamops.spec import (
    OperatorSpec,
    ParallelConfig,
    ParallelType,
    PortSpec,
    TagSpec,
    parameters_from_model,
    stable_operator_id,
)

DEAD_LETTER = "dead_letter"
METRICS_NAMESPACE = "beamops"
_log = logging.getLogger("beamops.deadletter")
DEFAULT_IMAGE = "beamops/worker-pool"

register_port_type(DeadLetter, DEAD_LETTER)


# Beam keeps event time as int64 microseconds and a timer or window ends at an element's time plus a
# duration: a duration beyond this (about 31 years) could only be a mistake, and one beyond about
# 290,000 years overflows while the job runs, failing it, instead of when the pipeline is built.
LONGEST_DURATION_S = 1e9


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name that ``name`` is most likely a typo of, if any."""
    # A typo scores above 0.7 against the name meant (crop-radius: crop_radius 0.92, sauce:
    # source 0.73); difflib's default cutoff, 0.6, also pairs names that only share a word
    # (state_backend: max_state_mb 0.62), and a wrong suggestion misleads more than none.
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``name`` looks like a typo of a known name ``x``, else ""."""
    match = closest_name(name, known)
    return f" (did you mean {match!r}?)" if match else ""


class OperatorParams(BaseModel):
    """Base of every parameter model: unknown names are errors, values are frozen, and no float
    parameter is infinite or NaN."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1 for an int or float: a YAML `true` or a flag given to the wrong
        # parameter would pass as a number.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = typing.get_args(annotation) or (annotation,)
            if bool not in kinds and any(kind in (int, float) for kind in kinds):
                raise ValueError(f"{value} is a bool, not a number")
        return value


class NoParams(OperatorParams):
    """For operators without parameters."""


class OperatorParameterError(ValueError):
    """An unknown or invalid operator parameter, caught when the pipeline is built."""


class OperatorDefinitionError(TypeError):
    """An operator class is declared wrongly (found at import time)."""


class WorkerEnvironmentError(RuntimeError):
    """What the worker lacks (a GPU, a writable directory), not what is wrong with an element.

    Operators raise it instead of sending the element to dead letters: the bundle fails, the
    runner retries it and, if the cause stays, the job fails and says why. A dead letter would
    hold a good element, and every other element would follow it there.
    """


@dataclass(frozen=True)
class Port:
    """A typed input or output. ``type`` must be a registered port type."""

    type: type
    description: str = ""
    title: str | None = None


_PCOLLECTION_ATTRIBUTES = frozenset({"pipeline", "element_type", "is_bounded", "producer", "tag"})


class OperatorOutputs(dict):
    """The PCollections an operator produced, by port name, plus ``dead_letter``.

    ``outputs.main`` is the only non-dead-letter output; ``outputs.com_map`` is
    the output named ``com_map``.
    """

    def __getattr__(self, name: str) -> pvalue.PCollection:
        if name == "main":  # the property raised AttributeError: say why, not "no output named 'main'"
            raise AttributeError(self._ambiguous())
        try:
            return self[name]
        except KeyError:
            # Beam asking for a PCollection's attribute: the outputs were applied to a plain Beam transform.
            plain = name in _PCOLLECTION_ATTRIBUTES or hasattr(pvalue.PCollection, name)
            ports = sorted(k for k in self if k != DEAD_LETTER)
            hint = f"; apply Beam transforms to one output (outputs[{ports[0]!r}])" if plain and ports else ""
            raise AttributeError(f"no output named {name!r}; outputs are {sorted(self)}{hint}") from None

    @property
    def main(self) -> pvalue.PCollection:
        names = [k for k in self if k != DEAD_LETTER]
        if len(names) != 1:
            raise AttributeError(self._ambiguous())
        return self[names[0]]

    def _ambiguous(self) -> str:
        return f"'main' is ambiguous for outputs {sorted(k for k in self if k != DEAD_LETTER)}; pick one by name"


class OperatorMetrics:
    """Beam metrics in the ``beamops`` namespace, shared by all operator DoFns."""

    # A bad stream can send every element to dead letters: log the first at once, then one line per
    # interval (per DoFn instance) with how many followed.
    LOG_EVERY_S: ClassVar[float] = 30.0

    def __init__(self, operator: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.operator = operator
        self._clock = clock
        self.batches = Metrics.counter(METRICS_NAMESPACE, "batches")
        self.frames_in = Metrics.counter(METRICS_NAMESPACE, "frames_in")
        self.frames_out = Metrics.counter(METRICS_NAMESPACE, "frames_out")
        self.errors = Metrics.counter(METRICS_NAMESPACE, "errors")
        self.latency_us = Metrics.distribution(METRICS_NAMESPACE, "batch_latency_us")
        self.duplicate_frames = Metrics.counter(METRICS_NAMESPACE, "duplicate_frames")
        self._logged_at = -float("inf")
        self._unlogged = 0

    def dead_letter(self, letter: DeadLetter) -> DeadLetter:
        """Count ``letter`` as an error and log it (at most one line per LOG_EVERY_S); return it."""
        self.errors.inc()
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= self.LOG_EVERY_S:
            where = f" ({' '.join(f'{k}={v}' for k, v in letter.origin.items())})" if letter.origin else ""
            if self._unlogged == 1:
                what = f"an element{where} went to dead letters"
            else:
                what = f"{self._unlogged} more elements went to dead letters, the latest{where}"
            _log.warning("%s: %s: %s", self.operator, what, letter.error)
            self._logged_at, self._unlogged = now, 0
        return letter

    def to_dead_letters(self, element: Any, exc: Exception) -> pvalue.TaggedOutput:
        """``element``, which failed with ``exc``, as a dead letter on its way out (counted and logged).

        A WorkerEnvironmentError is raised again instead: the worker is at fault, not the element.
        """
        if isinstance(exc, WorkerEnvironmentError):
            raise exc
        letter = self.dead_letter(DeadLetter.from_exception(self.operator, element, exc))
        return pvalue.TaggedOutput(DEAD_LETTER, letter)

    def skipped_redeliveries(self, log: logging.Logger | InstanceLogger, scan: int, frames: int, done: str) -> None:
        """Count ``frames`` of ``scan`` skipped because they were already ``done`` ("reduced", "written")
        and say so in the operator's ``log``: Kafka is at-least-once, so a restart redelivers frames."""
        if frames:
            self.duplicate_frames.inc(frames)
            # stacklevel: the record names the operator's line that called this, not this one
            log.warning(
                "scan %d: skipped %d frames already %s (delivered again, or another run published under the "
                "same scan number)",
                scan, frames, done, stacklevel=2,
            )  # fmt: skip

    def observe(self, element: Any, started: float) -> None:
        self.batches.inc()
        # A counter exists for the runner (Flink's metrics) once it is updated: at 0 from the first
        # element, an alert on errors can be set up before the first error.
        self.errors.inc(0)
        self.frames_in.inc(_frames(element))
        self.latency_us.update(int((time.perf_counter() - started) * 1e6))


class InstanceLogger(logging.LoggerAdapter):
    """The logger of an operator's module, whose lines start with the operator instance's label.

    The logger's name says which operator; a pipeline may apply one operator twice (two com_reduce on
    different crops), and only the label tells their lines apart. Records also carry it as ``instance``.
    """

    def __init__(self, module: str, instance: str) -> None:
        super().__init__(logging.getLogger(module), {"instance": instance})

    def log(self, level: int, msg: str, *args: Any, stacklevel: int = 1, **kwargs: Any) -> None:
        # The label as an argument, not in the format string: a label may hold a '%'. One frame further
        # up, a record's line and function are the operator's, not this method's.
        super().log(level, "%s: " + msg, self.extra["instance"], *args, stacklevel=stacklevel + 1, **kwargs)


def _frames(element: Any) -> int:
    """Frames carried by an element: a batch's n_frames, else 1."""
    return int(getattr(element, "n_frames", 1))


_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Operator(beam.PTransform):
    """Base class of every operator.

    Subclasses declare, as class attributes:

    * ``name``: catalog name, lowercase with underscores;
    * ``title`` and ``description``: for people;
    * ``Params``: the pydantic parameter model (default: no parameters);
    * ``inputs`` / ``outputs``: port name -> :class:`Port`;
    * optionally ``tags``, ``parallel``, ``operator_id``, ``image``.

    and implement :meth:`build`, which receives the main input PCollection (or
    the pipeline root for a source) and returns a PCollection per output port
    and one for ``dead_letter``. While it builds, ``self.provenance`` is what made
    the main input (:class:`~beamops.provenance.Provenance`): a sink writes it with its results.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[OperatorParams]] = NoParams
    inputs: ClassVar[Mapping[str, Port]] = {}
    outputs: ClassVar[Mapping[str, Port]] = {}
    tags: ClassVar[tuple[TagSpec, ...]] = ()
    parallel: ClassVar[ParallelType] = ParallelType.NONE
    operator_id: ClassVar[uuid.UUID | None] = None
    image: ClassVar[str] = DEFAULT_IMAGE

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or "name" not in cls.__dict__:
            return  # an intermediate base class
        where = f"operator class {cls.__qualname__}"
        if not _NAME.match(cls.name):
            raise OperatorDefinitionError(f"{where}: name {cls.name!r} must be lowercase letters, digits, '_'")
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, OperatorParams)):
            raise OperatorDefinitionError(f"{where}: Params must subclass beamops.OperatorParams")
        if len(cls.inputs) > 1:
            raise OperatorDefinitionError(f"{where}: operators take at most one input port")
        for port_name in [*cls.inputs, *cls.outputs]:
            if port_name == DEAD_LETTER or not _NAME.match(port_name):
                raise OperatorDefinitionError(f"{where}: bad port name {port_name!r}")
        try:
            cls.spec()
        except Exception as exc:
            raise OperatorDefinitionError(f"{where}: cannot derive its spec: {exc}") from exc
        if all(not f.is_required() for f in cls.Params.model_fields.values()):
            # Each default passes its field's check (validate_default), but a model validator or a
            # NaN would otherwise reject them only when someone builds the operator.
            try:
                cls.validate_params()
            except OperatorParameterError as exc:
                raise OperatorDefinitionError(f"{where}: its parameters' defaults are invalid: {exc}") from exc

    def __init__(self, params: OperatorParams | Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.params = self.validate_params(params, kwargs)

    def default_label(self) -> str:
        return type(self).__name__

    # --- parameters and spec ------------------------------------------------

    @classmethod
    def validate_params(
        cls, params: OperatorParams | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> OperatorParams:
        """Validated parameters, or an OperatorParameterError naming what is wrong."""
        if isinstance(params, cls.Params):
            values: dict[str, Any] = params.model_dump()
        elif params is None:
            values = {}
        elif isinstance(params, Mapping):
            values = dict(params)
        else:
            raise OperatorParameterError(
                f"operator {cls.name!r}: parameters must be a {cls.Params.__name__} or a mapping, got {type(params)}"
            )
        values.update(overrides or {})
        known = sorted(cls.Params.model_fields)
        unknown = sorted(set(values) - set(known))
        if unknown:
            named = ", ".join(repr(name) + did_you_mean(name, known) for name in unknown)
            raise OperatorParameterError(
                f"operator {cls.name!r}: unknown parameter(s) {named}; known parameters: {known or 'none'}"
            )
        try:
            return cls.Params.model_validate(values)
        except ValidationError as exc:
            reasons = "; ".join(
                f"parameter {'.'.join(str(p) for p in err['loc'])!r}: {err['msg']} (got {err['input']!r})"
                if err["loc"]
                else err["msg"].removeprefix("Value error, ")  # a rule on several parameters: it names them
                for err in exc.errors()
            )
            raise OperatorParameterError(f"operator {cls.name!r}: {reasons}") from None

    @classmethod
    def spec(cls) -> OperatorSpec:
        """The interactEM-compatible spec, derived from the class declaration."""

        def ports(declared: Mapping[str, Port]) -> list[PortSpec] | None:
            return [
                PortSpec(
                    name=name,
                    label=port.title or name.replace("_", " ").capitalize(),
                    description=port.description,
                    type=port_type_name(port.type),
                )
                for name, port in declared.items()
            ] or None

        return OperatorSpec(
            id=cls.operator_id or stable_operator_id(cls.name),
            label=cls.title,
            description=cls.description,
            image=cls.image,
            inputs=ports(cls.inputs),
            outputs=ports(cls.outputs),
            parameters=parameters_from_model(cls.Params) or None,
            tags=list(cls.tags) or None,
            parallel_config=ParallelConfig(type=cls.parallel),
        )

    # --- building the pipeline ------------------------------------------------

    def build(self, main: pvalue.PValue) -> Mapping[str, pvalue.PCollection]:
        raise NotImplementedError

    def expand(self, pvalueish: Any) -> OperatorOutputs:
        main, upstream_dead = self._main_input(pvalueish)
        self.provenance = self._provenance(main)
        built = dict(self.build(main))
        expected = {*self.outputs, DEAD_LETTER}
        if set(built) != expected:
            raise OperatorDefinitionError(
                f"operator {self.name!r}: build() returned outputs {sorted(built)}, declared {sorted(expected)}"
            )
        made_here = Provenance(
            (*self.provenance.steps, Step(self.label, self.name, self.params.model_dump(mode="json"))),
            self.provenance.traced,
        )
        for port_name, port in self.outputs.items():
            built[port_name].element_type = port.type
            built[port_name].beamops_port = f"{self.label}.{port_name}"
            stamp(built[port_name], made_here)
        # Here, not in each DoFn, so every operator's letters say which instance made them: most DoFns
        # know only the catalog name, shared by every instance of the operator.
        built[DEAD_LETTER] = built[DEAD_LETTER] | "NameInstance" >> beam.Map(_with_instance, self.label)
        if upstream_dead is not None:
            built[DEAD_LETTER] = (upstream_dead, built[DEAD_LETTER]) | "WithUpstreamDeadLetters" >> beam.Flatten()
        built[DEAD_LETTER].element_type = DeadLetter
        if not (self.inputs and all(p.type is DeadLetter for p in self.inputs.values())):
            # A dead-letter sink's own failures cannot go to a dead-letter sink: not checked.
            built[DEAD_LETTER].beamops_dead_letters_of = self.label  # see dead_letters_going_nowhere
        return OperatorOutputs(built)

    def _provenance(self, main: pvalue.PValue) -> Provenance:
        """What made the main input (nothing, for a source): see :mod:`beamops.provenance`."""
        return Provenance.of(main) if self.inputs else Provenance()

    def _main_input(self, pvalueish: Any) -> tuple[pvalue.PValue, pvalue.PCollection | None]:
        if not self.inputs:
            if not isinstance(pvalueish, pvalue.PBegin):
                raise TypeError(f"operator {self.name!r} is a source: apply it to the pipeline, not to a PCollection")
            return pvalueish, None
        upstream_dead = None
        if isinstance(pvalueish, Mapping):
            upstream_dead = pvalueish.get(DEAD_LETTER)
            if getattr(upstream_dead, "beamops_carried_on_by", None) is not None:
                upstream_dead = None  # one branch carries them on: two would write each letter twice
            elif upstream_dead is not None:
                upstream_dead.beamops_carried_on_by = self.label
            candidates = {k: v for k, v in pvalueish.items() if k != DEAD_LETTER}
            if len(candidates) != 1:
                raise TypeError(
                    f"operator {self.name!r}: upstream has outputs {sorted(candidates)}; "
                    f"apply it to one of them by name"
                )
            (main,) = candidates.values()
        else:
            main = pvalueish
        if not isinstance(main, pvalue.PCollection):
            raise TypeError(f"operator {self.name!r}: expected a PCollection, got {type(main).__name__}")
        ((port_name, port),) = self.inputs.items()
        upstream = getattr(main, "beamops_port", None) or (main.producer.full_label if main.producer else "input")
        check_connection(upstream, main.element_type, f"{self.label}.{port_name}", port.type)
        return main, upstream_dead


def dead_letters_going_nowhere(pipeline: beam.Pipeline) -> list[pvalue.PCollection]:
    """The ``dead_letter`` outputs that nothing reads (their letters would be lost); each one's
    ``beamops_dead_letters_of`` is the label of its operator.

    An operator applied to another's outputs carries that one's dead letters on in its own (the first
    such branch, when several are applied to the same outputs); one applied to a single named port
    (``outputs.frames``) does not, so the dead letters of the operator that port came from must be
    collected by hand (flatten them into the dead-letter sink).
    """
    read: set[int] = set()
    tagged: list[pvalue.PCollection] = []

    class Visitor(PipelineVisitor):
        def visit_transform(self, applied: Any) -> None:
            read.update(id(p) for p in (*applied.inputs, *applied.side_inputs))
            tagged.extend(p for p in applied.outputs.values() if hasattr(p, "beamops_dead_letters_of"))

    pipeline.visit(Visitor())
    return [p for p in tagged if id(p) not in read]


def _with_instance(letter: DeadLetter, instance: str) -> DeadLetter:
    """``letter`` naming ``instance``, unless an operator applied inside this one named itself."""
    return letter if letter.instance is not None else replace(letter, instance=instance)


class BatchOperator(Operator):
    """An operator made by :func:`operator`: one batch in; one result, several or none out, as its
    return annotation says."""

    fn: ClassVar[Callable[..., Any]]
    #: What ``fn`` returns, from its annotation: several results (an iterable), and None allowed.
    result: ClassVar[_ResultShape]
    #: ``fn`` takes a keyword-only ``provenance`` (a sink that writes it with its results).
    takes_provenance: ClassVar[bool] = False

    def process(self, batch: Any, provenance: Provenance | None = None) -> Any:
        """Run the kernel on one batch outside Beam (offline use, notebooks, tests); ``provenance``
        for a kernel that takes it (default: an untraced one)."""
        return type(self).fn(batch, self.params, **self._kernel_kwargs(provenance or Provenance(traced=False)))

    def _kernel_kwargs(self, provenance: Provenance) -> dict[str, Any]:
        return {"provenance": provenance} if self.takes_provenance else {}

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        ((out_name, _),) = self.outputs.items()
        fn = _BatchFnDoFn(type(self), self.params, self._kernel_kwargs(self.provenance))
        results = main | "Process" >> beam.ParDo(fn).with_outputs(DEAD_LETTER, main=out_name)
        return {out_name: results[out_name], DEAD_LETTER: results[DEAD_LETTER]}


class _BatchFnDoFn(beam.DoFn):
    def __init__(self, operator_cls: type[BatchOperator], params: OperatorParams, kwargs: dict[str, Any]) -> None:
        self._operator_cls = operator_cls
        self._params = params
        self._kwargs = kwargs

    def setup(self) -> None:
        self._fn = self._operator_cls.fn
        self._name = self._operator_cls.name
        self._result = self._operator_cls.result
        self._metrics = OperatorMetrics(self._name)

    def process(self, element: Any) -> Iterator[Any]:
        started = time.perf_counter()
        try:
            # A generator runs only when iterated: drained here, its errors become dead letters too.
            items = self._result.items(self._fn(element, self._params, **self._kwargs))
        except Exception as exc:  # the element goes to dead letters; the stream goes on
            yield self._metrics.to_dead_letters(element, exc)
            return
        finally:
            self._metrics.observe(element, started)
        for item in items:
            self._metrics.frames_out.inc(_frames(item))
            yield item


def operator(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    input_name: str = "in",
    output_name: str = "out",
    input_description: str = "",
    output_description: str = "",
    tags: tuple[TagSpec, ...] = (),
    parallel: ParallelType | str = ParallelType.EMBARRASSING,
    operator_id: uuid.UUID | None = None,
) -> Any:
    """Make an operator class from ``fn(batch: In, params: P) -> Out | None``.

    A sink may add a keyword-only ``provenance: Provenance``: it then gets what made its input
    (operators and parameters, see :mod:`beamops.provenance`), to write next to its results.

    The input and output port types come from ``fn``'s annotations, the
    parameter model from the annotation of its second argument, the description
    from its docstring. ``-> Out`` emits one result per batch; ``-> Out | None``
    emits nothing for a batch when ``fn`` returns None; ``-> Iterator[Out]``
    (``Iterable``, ``Generator``, ``list``) emits each item. An exception, or a
    result that is not what the annotation says, sends the batch to dead letters.
    """

    def wrap(func: Callable[..., Any]) -> type[BatchOperator]:
        try:
            hints = typing.get_type_hints(func)
        except NameError as exc:
            raise OperatorDefinitionError(
                f"{func.__qualname__}: cannot resolve its annotations ({exc}); define parameter models at module level"
            ) from exc
        signature = inspect.signature(func).parameters
        takes_provenance = "provenance" in signature and signature["provenance"].kind is inspect.Parameter.KEYWORD_ONLY
        arg_names = [a for a in signature if not (takes_provenance and a == "provenance")]
        if not 1 <= len(arg_names) <= 2:
            raise OperatorDefinitionError(
                f"{func.__qualname__}: expected fn(batch, params) or fn(batch), and optionally a keyword-only "
                "provenance: Provenance"
            )
        missing = [a for a in [*arg_names, "return"] if a not in hints]
        if missing:
            raise OperatorDefinitionError(f"{func.__qualname__}: annotate {missing} (port types come from them)")
        params_model = hints[arg_names[1]] if len(arg_names) == 2 else NoParams
        result = _ResultShape.of(hints["return"], output_name)
        out_type = result.type
        op_name = name or func.__name__
        doc = inspect.getdoc(func) or ""
        attrs = {
            "name": op_name,
            "title": title or op_name.replace("_", " ").capitalize(),
            "description": description or doc.split("\n\n")[0].replace("\n", " "),
            "Params": params_model,
            "inputs": {input_name: Port(hints[arg_names[0]], input_description)},
            "outputs": {output_name: Port(out_type, output_description)},
            "tags": tuple(tags),
            "parallel": ParallelType(parallel),
            "operator_id": operator_id,
            "fn": staticmethod(func if len(arg_names) == 2 else lambda batch, _params, **kw: func(batch, **kw)),
            "result": result,
            "takes_provenance": takes_provenance,
            "__module__": func.__module__,
            "__doc__": func.__doc__,
            "__qualname__": func.__qualname__,
        }
        return typing.cast(type[BatchOperator], type(func.__name__, (BatchOperator,), attrs))

    return wrap(fn) if fn is not None else wrap


def _as_written(annotation: Any) -> str:
    """An annotation as its author wrote it: ``Iterator[SparseFrameBatch] | None``, without module paths."""
    if annotation is type(None):
        return "None"
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_as_written(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_as_written(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


# Annotations of a kernel that emits several results: each item of what it returns goes out.
_MANY = (collections.abc.Iterator, collections.abc.Iterable, collections.abc.Generator, list)


@dataclass(frozen=True)
class _ResultShape:
    """What a kernel's return annotation promises: ``X``, ``X | None``, ``Iterator[X]`` (or ``Iterable``,
    ``Generator``, ``list``), or one of those ``| None``. Checked for every batch: a kernel that forgets its
    ``return`` or returns the wrong type sends the batch to dead letters, instead of dropping it unseen
    or failing the job in a coder."""

    type: Any
    many: bool
    optional: bool
    annotation: str
    port: str

    @classmethod
    def of(cls, annotation: Any, port: str) -> _ResultShape:
        written = _as_written(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = type(None) in typing.get_args(annotation) and len(args) == 1
        if optional:
            annotation = args[0]
        many = typing.get_origin(annotation) in _MANY and bool(typing.get_args(annotation))
        if many:  # a bare Iterator is left as it is: the spec refuses it as a port type
            annotation = typing.get_args(annotation)[0]
        return cls(annotation, many, optional, written, port)

    def items(self, result: Any) -> list[Any]:
        """The results to emit for one batch, checked against the annotation (TypeError if they differ)."""
        if result is None:
            if self.optional:
                return []
            raise TypeError(
                f"returned None, but its annotation is -> {self.annotation}: return a result, or "
                f"annotate -> {self.annotation} | None to emit nothing for some batches"
            )
        # self.type is a class: the operator's spec accepts only registered port types
        items = list(result) if self.many and not isinstance(result, self.type) else [result]
        for item in items:
            if not isinstance(item, self.type):
                hint = "; annotate -> Iterator[...] to emit several" if isinstance(item, list | tuple) else ""
                raise TypeError(
                    f"returned a {type(item).__name__} for port {self.port!r}, which carries "
                    f"{self.type.__name__} (-> {self.annotation}){hint}"
                )
        return items
