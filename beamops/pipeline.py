"""Pipeline definitions: operators, their parameters and the connections between their ports, in YAML.

A definition names operator *instances* (an id per use of a catalog operator)
and connects each one's input to a named output port of another instance::

    name: com                            # required
    description: center of mass maps     # optional
    kafka:                               # only needed by Kafka operators
      bootstrap_servers: 127.0.0.1:9092
      # config_file: client.properties   # optional: librdkafka key=value lines or a JSON object
      settings: {client.id: beamops}     # optional: override the file's settings
      create_topics: false               # optional: create the Kafka sinks' topics before running
    dead_letters:                        # optional; this is the default
      operator: write_dead_letters
      params: {out_dir: out}
    operators:
      source:                            # instance id: a letter, then letters, digits, '_' or '-'
        operator: simulated_scan         # catalog name (beamops operators list)
        params: {scan_rows: 64, scan_cols: 64}
      partial:
        operator: com_partial
        input: source.frames             # <instance>.<output port>; '<instance>' alone if it has one output
      reduce:
        operator: com_reduce
        input: partial.com_partial
      maps:
        operator: write_com_map          # sinks are operators too
        input: reduce.com_map
        params: {out_dir: out}

Sources are the operators without an input port; they take no ``input``, every
other operator needs one. Operators take at most one input, so an instance
names only the upstream port; one output may feed any number of instances.

Dead letters are not connected by hand: every instance's ``dead_letter``
output (and every source's) is flattened into one stream that goes to the one
``dead_letters`` sink, any operator whose input takes dead letters:
``write_dead_letters`` (files under ``<out_dir>/dead_letters/``, the default,
into ``out``) or ``write_dead_letters_kafka`` (``params: {topic: ...}``, with a
``kafka:`` section). Operators that talk to Kafka (those whose constructor
takes a ``client``) get it from the ``kafka:`` section. Relative paths
(``config_file``, ``out_dir``...) are relative to the current directory, as on
the command line.

:func:`load_pipeline` checks a file without running anything: its YAML and
keys (:class:`PipelineSpec`), each operator name, each instance's parameters
(with the operator's own ``validate_params``), each input's instance and port,
the port types at both ends of each connection (``beamops.ports``), cycles,
sources with an input and other operators without one, Kafka operators
without ``kafka:``, and two writers of one kind whose files would overwrite each
other's in one directory. It reports every error it finds, each as ``FILE:LINE:
message``, in a :class:`PipelineDefinitionError`. :meth:`PipelineDefinition.build`
then adds the operators to a Beam pipeline, each applied to its upstream's
named output and labelled with its instance id.

``overrides`` (``beamops pipeline run FILE --set ID.PARAM=VALUE``) replace
parameters of an instance (or of ``dead_letters``); VALUE is read as YAML.

Plain scalars, keys and values, are read as YAML 1.2 reads them (null,
true/false, numbers, else text), not as PyYAML's YAML 1.1: ``10:50`` stays text
(not 650), ``0123`` is 123, ``no`` is the text "no" (a bool parameter still
takes it as false; an instance may be called ``on``), a date stays text.
``kafka.settings`` values keep the text as written.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from beamops.deadletter import DeadLetter
from beamops.frames import FrameHeader
from beamops.io.files import files_like
from beamops.io.kafka_config import KafkaClientConfig, is_secret
from beamops.operator import (
    DEAD_LETTER,
    Operator,
    OperatorOutputs,
    OperatorParameterError,
    OperatorParams,
    did_you_mean,
)
from beamops.ports import PortTypeError, check_connection, port_type
from beamops.runner import runs_here
from beamops.scan_reduce import PlansItsScans, ScanReduceOperator, ScanTooLargeError
from beamops.spec import output_files

log = logging.getLogger("beamops.pipeline")
DEAD_LETTERS = "dead_letters"  # the section, the --set target and the Beam label of the dead-letter sink
DEFAULT_DEAD_LETTER_SINK = "write_dead_letters"
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_ID_RULE = "a letter, then letters, digits, '_' or '-' (a '.' names a port)"

YamlPath = tuple[Any, ...]
_M = typing.TypeVar("_M", bound=BaseModel)


# --- errors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where a value comes from: a file and line, or a ``--set`` override (no line)."""

    source: str
    line: int | None = None
    order: int = 0  # of a --set among the overrides, to report them in the order given

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class PipelineError:
    where: Location
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class PipelineDefinitionError(ValueError):
    """A pipeline definition is wrong; ``errors`` lists every problem found, in file order."""

    def __init__(self, errors: Iterable[PipelineError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.where.line is None, e.where.line or 0, e.where.order))
        super().__init__("\n".join(str(e) for e in self.errors))


# --- the schema -----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value  # `params:` with nothing after it


class KafkaSection(_Model):
    """The Kafka client of every Kafka operator of the pipeline."""

    bootstrap_servers: str = Field(min_length=1, description="Kafka brokers, host:port[,host:port...].")
    config_file: str | None = Field(None, description="librdkafka settings: key=value lines or a JSON object.")
    settings: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="librdkafka settings; override the file's."
    )
    create_topics: bool = Field(False, description="Create the topics of the Kafka sinks (1 partition) if missing.")

    @field_validator("settings", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> Any:
        return _none_is_empty(value)

    def file_settings(self) -> dict[str, str]:
        """The settings of ``config_file`` (none without one)."""
        return dict(KafkaClientConfig.load(self.bootstrap_servers, self.config_file).settings)

    def client(self) -> KafkaClientConfig:
        text = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in self.settings.items()}
        return KafkaClientConfig(self.bootstrap_servers, {**self.file_settings(), **text})


class InstanceSpec(_Model):
    """One use of a catalog operator."""

    operator: str = Field(description="Catalog name of the operator (beamops operators list).")
    params: dict[str, Any] = Field(default_factory=dict, description="Its parameters; unset ones take defaults.")
    input: str | None = Field(
        None, description="'<instance>.<port>' (or '<instance>' when it has one output); omitted for sources."
    )

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        return _none_is_empty(value)


class DeadLetterSpec(_Model):
    """The one sink of every dead letter of the pipeline."""

    operator: str = Field(DEFAULT_DEAD_LETTER_SINK, description="An operator whose input takes dead letters.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its parameters (write_dead_letters: out_dir).")

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> Any:
        return _none_is_empty(value)


class _Header(_Model):
    name: str = Field(min_length=1, description="Name of the pipeline.")
    description: str = ""
    kafka: KafkaSection | None = Field(None, description="The Kafka client of the Kafka operators.")
    dead_letters: DeadLetterSpec = Field(
        default_factory=DeadLetterSpec, description="Where all dead letters go (default: write_dead_letters to out)."
    )
    operators: dict[str, Any] = Field(min_length=1)

    @field_validator("dead_letters", mode="before")
    @classmethod
    def _dead_letters(cls, value: Any) -> Any:
        return _none_is_empty(value)


class PipelineSpec(_Header):
    """A pipeline definition file, as parsed (before the operators are checked)."""

    operators: dict[str, InstanceSpec] = Field(min_length=1, description="Instance id -> operator instance.")


# --- YAML with line numbers -----------------------------------------------------------------------


def _compose(text: str, source: str) -> tuple[Any, dict[YamlPath, int], list[PipelineError]]:
    """The document as plain Python values, the line (1-based) of every mapping key and list item, and
    the duplicate keys (the first one is kept). Invalid YAML raises PipelineDefinitionError."""
    loader = yaml.SafeLoader(text)
    lines: dict[YamlPath, int] = {}
    errors: list[PipelineError] = []
    try:
        node = loader.get_single_node()
        if node is None:
            raise PipelineDefinitionError([PipelineError(Location(source, 1), "empty file: expected a mapping")])
        lines[()] = node.start_mark.line + 1
        value = _construct(loader, node, (), lines, errors, source, set())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(str(s) for s in (exc.context, exc.problem) if s) or str(exc)
        where = Location(source, mark.line + 1 if mark else None)
        raise PipelineDefinitionError([PipelineError(where, f"invalid YAML: {what}")]) from None
    finally:
        loader.dispose()
    return value, lines, errors


def _yaml_value(text: str) -> Any:
    """One ``--set`` value, read as the file's values are (YAML 1.2 scalars)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _construct(loader, node, (), {}, [], "--set", set())
    finally:
        loader.dispose()


def _construct(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: YamlPath,
    lines: dict[YamlPath, int],
    errors: list[PipelineError],
    source: str,
    active: set[int],
) -> Any:
    if id(node) in active:
        raise yaml.MarkedYAMLError(problem="recursive alias", problem_mark=node.start_mark)
    if isinstance(node, yaml.MappingNode):
        active.add(id(node))
        loader.flatten_mapping(node)  # merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(loader, key_node)
            if not isinstance(key, str | int | float | bool | None):
                raise yaml.MarkedYAMLError(problem="a mapping key must be a scalar", problem_mark=key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in out:
                first = lines[(*path, key)]
                errors.append(PipelineError(Location(source, line), f"duplicate key {key!r} (first at line {first})"))
                continue
            lines[(*path, key)] = line
            out[key] = _construct(loader, value_node, (*path, key), lines, errors, source, active)
        active.discard(id(node))
        return out
    if isinstance(node, yaml.SequenceNode):
        active.add(id(node))
        items = []
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            items.append(_construct(loader, item, (*path, i), lines, errors, source, active))
        active.discard(id(node))
        return items
    if path[:2] == ("kafka", "settings") and len(path) == 3 and isinstance(node, yaml.ScalarNode):
        # librdkafka takes every setting as text, and YAML 1.1 would change it first (0123 -> 83,
        # 12:30:45 -> 45045, 0x1F -> 31, yes -> True, a date -> a date): keep the text as written.
        return node.value
    return _scalar(loader, node)


def _as_written(key: Any) -> str:
    """A mapping key as the YAML had it: an id may be read as a number, a bool or null."""
    return "null" if key is None else str(key).lower() if isinstance(key, bool) else str(key)


def _scalar(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """A key or a value: a plain scalar as YAML 1.2 reads it, anything else (quoted, tagged) as PyYAML does."""
    if isinstance(node, yaml.ScalarNode) and node.style is None:
        return _core_scalar(node.value)
    return loader.construct_object(node, deep=True)


# YAML 1.2's core schema for plain scalars. PyYAML resolves YAML 1.1's, where 10:50 is 650 (base 60),
# 0123 is 83, yes/no/on/off are booleans and 2024-01-31 is a date: an operator parameter written so
# would reach the operator changed, or fail with a value the user never wrote.
_CORE_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_CORE_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_CORE_INT = re.compile(r"[-+]?[0-9]+")
_CORE_OCTAL = re.compile(r"0o[0-7]+")
_CORE_HEX = re.compile(r"0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_CORE_SPECIAL_FLOAT = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def _core_scalar(text: str) -> Any:
    """A plain scalar as YAML 1.2's core schema reads it: null, bool, int (decimal, 0o, 0x), float or text."""
    if text in _CORE_NULL:
        return None
    if text in _CORE_BOOL:
        return _CORE_BOOL[text]
    if _CORE_INT.fullmatch(text):
        return int(text)
    if _CORE_OCTAL.fullmatch(text) or _CORE_HEX.fullmatch(text):
        return int(text, 0)
    if _CORE_FLOAT.fullmatch(text):
        return float(text)
    special = _CORE_SPECIAL_FLOAT.get(text.lower())
    return special if special is not None else text


# --- the checked pipeline -------------------------------------------------------------------------


def needs_kafka_client(op: type[Operator]) -> bool:
    """Kafka operators take a ``client`` (KafkaClientConfig) besides their parameters."""
    return "client" in inspect.signature(op.__init__).parameters


@dataclass(frozen=True)
class Instance:
    """An operator instance, checked: its class, its validated parameters, its upstream (instance, port)."""

    id: str
    operator: type[Operator]
    params: OperatorParams
    input: tuple[str, str] | None = None

    def transform(self, client: KafkaClientConfig | None) -> Operator:
        if needs_kafka_client(self.operator):
            assert client is not None  # checked by load_pipeline
            return self.operator(self.params, client=client)
        return self.operator(self.params)


@dataclass(frozen=True)
class PipelineDefinition:
    """A checked pipeline definition, ready to build into a Beam pipeline."""

    name: str
    source: str
    spec: PipelineSpec
    instances: dict[str, Instance]  # in build order: every upstream before its downstreams
    dead_letters: Instance
    kafka: KafkaClientConfig | None = None
    create_topics: bool = False
    connections: list[tuple[str, str]] = field(default_factory=list)  # ("up.port", "id.in")

    def build(self, pipeline: beam.Pipeline) -> dict[str, OperatorOutputs]:
        """Add every instance to ``pipeline``; returns each one's outputs by instance id (and 'dead_letters')."""
        # The sources' topics first: a mistyped one must not leave the sinks' topics behind.
        if self.kafka is not None and runs_here(pipeline):
            self._require_topics()
        if self.create_topics:
            self._create_topics()
        if runs_here(pipeline):  # a cluster's workers write into their own file systems
            self._warn_earlier_files()
        else:
            self._warn_relative_folders()
        outputs: dict[str, OperatorOutputs] = {}
        sources = {}
        for inst in self.instances.values():
            op = inst.transform(self.kafka)
            if inst.input is None:
                outputs[inst.id] = pipeline | inst.id >> op
                sources[inst.id] = op
            else:
                upstream, port = inst.input
                outputs[inst.id] = outputs[upstream][port] | inst.id >> op
            if output_files(inst.operator.Params):
                outputs[inst.id].main | f"{inst.id}.LogWritten" >> beam.Map(_log_written, inst.id)
        dead = tuple(out[DEAD_LETTER] for out in outputs.values())
        all_dead = dead | f"{DEAD_LETTERS}.all" >> beam.Flatten()
        all_dead.element_type = DeadLetter
        outputs[DEAD_LETTERS] = all_dead | DEAD_LETTERS >> self.dead_letters.transform(self.kafka)
        for name, source in sources.items():
            if hasattr(source, "commit_after"):  # a source that commits its reads (Kafka) once they are written
                source.commit_after(*self._results_of(name, outputs))
        return outputs

    def _warn_relative_folders(self) -> None:
        """Name the folders, written on a cluster's workers, that each worker finds in its own working
        directory: one it cannot write fails its bundle (the dead letters' on the first element that goes
        there), and Flink restarts the job on the same input for ever."""
        for inst in [*self.instances.values(), self.dead_letters]:
            params = list(output_files(inst.operator.Params))
            if not params and hasattr(inst.params, "out_dir"):  # write_dead_letters' folder
                params = ["out_dir"]
            for param in params:
                folder = str(getattr(inst.params, param))
                if not Path(folder).expanduser().is_absolute():
                    log.warning(
                        "%s writes to %r, relative to each worker's working directory: give %s.%s an absolute "
                        "folder the workers can write",
                        inst.id, folder, inst.id, param,
                    )  # fmt: skip

    def _warn_earlier_files(self) -> None:
        """Name the files an earlier run left where a writer writes: this run replaces those of the scans it
        writes again (or, for a writer that does not replace files, sends those scans to dead letters)."""
        for inst in self.instances.values():
            for param, files in output_files(inst.operator.Params).items():
                folder = Path(getattr(inst.params, param)).expanduser()
                earlier = files_like(folder, files.glob)
                if not earlier:
                    continue
                if getattr(inst.params, "overwrite", True):
                    fate = "this run replaces those of the scans it writes again"
                else:
                    fate = f"a scan written again goes to dead letters (set {inst.id}.overwrite: true to replace it)"
                log.warning(
                    "%s: %s already holds files it writes (%s): %s; to keep them, give %s another %s",
                    inst.id, folder, earlier, fate, inst.id, param,
                )  # fmt: skip

    def _results_of(self, source: str, outputs: dict[str, OperatorOutputs]) -> list[beam.PCollection]:
        """What the sinks downstream of ``source`` wrote: the outputs of its branch no instance reads,
        and the dead-letter sink's if the pipeline has no other source (whose dead letters it also waits on)."""
        downstream, consumed = {source}, set()
        for inst in self.instances.values():  # in build order: every upstream before its downstreams
            if inst.input is not None:
                consumed.add(inst.input)
                if inst.input[0] in downstream:
                    downstream.add(inst.id)
        results = [
            pc
            for name in downstream
            for port, pc in outputs[name].items()
            if port != DEAD_LETTER and (name, port) not in consumed
        ]
        if all(inst.input is not None for inst in self.instances.values() if inst.id != source):
            results += list(outputs[DEAD_LETTERS].values())
        return results

    def _kafka_topics(self) -> list[tuple[Instance, str]]:
        """(instance, its topic) of every instance that reads or writes Kafka."""
        instances = [*self.instances.values(), self.dead_letters]
        topics = [(i, getattr(i.params, "topic", None)) for i in instances if needs_kafka_client(i.operator)]
        return [(i, topic) for i, topic in topics if topic]

    def _create_topics(self) -> None:
        from beamops.io.kafka import ensure_topic

        assert self.kafka is not None  # create_topics is a setting of the kafka section
        for inst, topic in self._kafka_topics():
            if inst.operator.inputs:  # a sink's
                ensure_topic(self.kafka, topic)

    def _require_topics(self) -> None:
        """OperatorParameterError naming the instance whose topic Kafka does not have: else a source fails
        in a worker with a traceback, and a sink after the input was read. KafkaUnavailableError if Kafka
        does not answer. Only for a pipeline that runs here: a cluster's workers may see other brokers."""
        from beamops.io.kafka import refuse_missing_topics

        assert self.kafka is not None
        create = "; set create_topics: true in the kafka section to create it"
        checks = [
            ([topic], f"{self.source}: {inst.id}: ", create if inst.operator.inputs else "")
            for inst, topic in self._kafka_topics()
            if not (self.create_topics and inst.operator.inputs)  # the sinks' topics are made next
        ]
        refuse_missing_topics(self.kafka, checks)

    def summary(self) -> str:
        sources = [i.id for i in self.instances.values() if i.input is None]
        consumed = {i.input[0] for i in self.instances.values() if i.input}
        sinks = [i.id for i in self.instances.values() if i.id not in consumed]
        return (
            f"{self.source}: pipeline {self.name!r} is valid: {_count(len(self.instances), 'operator')}, "
            f"{_count(len(self.connections), 'connection')}; sources {', '.join(sources)}; "
            f"ends {', '.join(sinks)}; dead letters -> {self.dead_letters.operator.name}"
        )


def _log_written(path: str, instance: str) -> None:
    log.info("%s: wrote %s", instance, path)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- loading and checking -------------------------------------------------------------------------


def load_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> PipelineDefinition:
    """Read and check a definition file; PipelineDefinitionError lists every problem as FILE:LINE: message."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineDefinitionError([PipelineError(Location(source), f"cannot read: {exc}")]) from None
    return parse_pipeline(text, source, overrides)


def parse_pipeline(text: str, source: str = "<string>", overrides: Iterable[str] = ()) -> PipelineDefinition:
    """As :func:`load_pipeline`, from the text of a definition."""
    document, lines, errors = _compose(text, source)
    checker = _Checker(source, lines)
    checker.errors.extend(errors)
    return checker.check(document, list(overrides))


def validate_pipeline(path: str | Path, overrides: Iterable[str] = ()) -> list[PipelineError]:
    """Every problem of a definition file; empty when it is valid."""
    try:
        load_pipeline(path, overrides)
    except PipelineDefinitionError as exc:
        return exc.errors
    return []


def _submodel(model: type[BaseModel], loc: YamlPath) -> type[BaseModel] | None:
    """The pydantic model that holds the key at the end of ``loc`` (for 'allowed keys' hints)."""
    for key in loc[:-1]:
        info = model.model_fields.get(key) if isinstance(key, str) else None
        if info is None:
            return None
        candidates = [info.annotation]
        if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):
            candidates = list(typing.get_args(info.annotation))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _dotted(loc: YamlPath) -> str:
    return ".".join(str(k) for k in loc) or "(top level)"


class _Checker:
    def __init__(self, source: str, lines: dict[YamlPath, int]) -> None:
        self.source = source
        self.lines: dict[YamlPath, Location] = {k: Location(source, v) for k, v in lines.items()}
        self.errors: list[PipelineError] = []

    def at(self, path: YamlPath) -> Location:
        """The location of ``path``, else of its nearest enclosing key."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return Location(self.source)

    def error(self, path: YamlPath | Location, message: str) -> None:
        where = path if isinstance(path, Location) else self.at(path)
        self.errors.append(PipelineError(where, message))

    def schema_errors(self, exc: ValidationError, model: type[BaseModel], prefix: YamlPath) -> None:
        for err in exc.errors():
            loc = tuple(err["loc"])
            full = (*prefix, *loc)
            if err["type"] == "extra_forbidden":
                holder = _submodel(model, loc)
                allowed = f"; allowed: {', '.join(holder.model_fields)}" if holder else ""
                where = _dotted(full[:-1]) if len(full) > 1 else "the top level"
                self.error(full, f"unknown key {loc[-1]!r} in {where}{allowed}")
            elif err["type"] == "missing":
                where = _dotted(full[:-1]) if len(full) > 1 else "the top level"
                self.error(full, f"missing key {loc[-1]!r} in {where}")
            elif any(isinstance(part, str) and is_secret(part) for part in full):
                self.error(full, f"{_dotted(full)}: {err['msg']}")  # never the secret's value
            else:
                self.error(full, f"{_dotted(full)}: {err['msg']} (got {err['input']!r})")

    # --- overrides --------------------------------------------------------------------------------

    def apply_overrides(self, document: dict[str, Any], overrides: list[str]) -> None:
        operators = document.get("operators")
        for order, text in enumerate(overrides):
            where = Location(f"--set {text}", order=order)
            target, sep, raw = text.partition("=")
            instance, dot, param = target.strip().partition(".")
            if not (sep and dot and instance and param):
                self.error(where, "expected --set ID.PARAM=VALUE (an instance id or 'dead_letters', a parameter)")
                continue
            if instance == DEAD_LETTERS:
                if document.get(DEAD_LETTERS) is None:
                    document[DEAD_LETTERS] = {}
                section = document[DEAD_LETTERS]
                path: YamlPath = (DEAD_LETTERS,)
            elif isinstance(operators, dict) and instance in operators:
                section = operators[instance]
                path = ("operators", instance)
            else:
                known = sorted(map(_as_written, operators)) if isinstance(operators, dict) else []
                self.error(
                    where,
                    f"no instance {instance!r}{did_you_mean(instance, known)}; instances: {', '.join(known) or 'none'}",
                )
                continue
            if not isinstance(section, dict):
                continue  # reported as a schema error
            if section.get("params") is None:
                section["params"] = {}
            if not isinstance(section["params"], dict):
                continue
            try:
                section["params"][param] = _yaml_value(raw)
            except yaml.YAMLError as exc:
                self.error(where, f"VALUE is not valid YAML: {exc}")
                continue
            self.lines[(*path, "params", param)] = where

    # --- the checks ---------------------------------------------------------------------------------

    def check(self, document: Any, overrides: list[str]) -> PipelineDefinition:
        if not isinstance(document, dict):
            self.error((), f"expected a mapping with name, operators, ...; got {type(document).__name__}")
            raise PipelineDefinitionError(self.errors)
        self.apply_overrides(document, overrides)
        try:
            header: _Header | None = _Header.model_validate(document)
        except ValidationError as exc:
            self.schema_errors(exc, _Header, ())
            header = None
        # Each section alone too, so that one bad section does not hide the errors of the others.
        raw_operators = document.get("operators")
        specs: dict[str, InstanceSpec] = {}
        if isinstance(raw_operators, dict):
            for inst_id, raw in raw_operators.items():
                try:
                    specs[inst_id] = InstanceSpec.model_validate(raw)
                except ValidationError as exc:
                    self.schema_errors(exc, InstanceSpec, ("operators", inst_id))
        kafka = _quietly(KafkaSection, document.get("kafka"))
        has_kafka = document.get("kafka") is not None
        kafka_client = self.check_kafka(kafka)
        dead_spec = _quietly(DeadLetterSpec, document.get(DEAD_LETTERS) or {})
        catalog = _catalog()

        # each instance alone: id, operator, parameters, Kafka
        ops: dict[str, type[Operator] | None] = {}
        params: dict[str, OperatorParams | None] = {}
        for inst_id, spec in specs.items():
            path = ("operators", inst_id)
            if isinstance(inst_id, bool) or inst_id is None:  # a quoted 'true' would do
                written = _as_written(inst_id)
                self.error(path, f"instance id {written} is not text to YAML: quote it ('{written}')")
            elif not isinstance(inst_id, str) or not _ID.match(inst_id):
                self.error(path, f"instance id {inst_id!r}: {_ID_RULE}")
            elif inst_id == DEAD_LETTERS:
                self.error(path, f"instance id {DEAD_LETTERS!r} is reserved for the dead-letter sink")
            ops[inst_id], params[inst_id] = self.check_operator(path, spec.operator, spec.params, catalog, has_kafka)
        dead_op, dead_params = None, None
        if dead_spec is not None:
            dead_op, dead_params = self.check_operator(
                (DEAD_LETTERS,), dead_spec.operator, dead_spec.params, catalog, has_kafka
            )
            if dead_op is not None:
                self.check_dead_letter_sink(dead_op)

        # connections
        inputs: dict[str, tuple[str, str]] = {}
        connections: list[tuple[str, str]] = []
        for inst_id, spec in specs.items():
            op = ops[inst_id]
            if op is None:
                continue
            path = ("operators", inst_id)
            if not op.inputs:
                if spec.input is not None:
                    self.error(
                        (*path, "input"),
                        f"{inst_id}: operator {op.name!r} is a source (it has no input port); remove 'input'",
                    )
                continue
            ((in_port, in_spec),) = [(p.name, p) for p in op.spec().inputs or []]
            if spec.input is None:
                self.error(
                    path,
                    f"{inst_id}: operator {op.name!r} needs an input: add 'input: <instance>.<port>' "
                    f"(its port {in_port!r} takes {in_spec.type})",
                )
                continue
            declared = raw_operators if isinstance(raw_operators, dict) else {}
            resolved = self.check_input(inst_id, spec.input, specs, ops, declared)
            if resolved is None:
                continue
            upstream, port = resolved
            inputs[inst_id] = resolved
            connections.append((f"{upstream}.{port}", f"{inst_id}.{in_port}"))
            up_op = ops[upstream]
            assert up_op is not None
            produced = {p.name: p.type for p in up_op.spec().outputs or []}[port]
            try:
                check_connection(
                    f"{upstream}.{port}", port_type(produced), f"{inst_id}.{in_port}", port_type(in_spec.type)
                )
            except PortTypeError as exc:
                self.error((*path, "input"), str(exc))
        order = self.check_cycles(list(specs), inputs)

        if self.errors or header is None or dead_op is None or dead_params is None or (has_kafka and not kafka_client):
            raise PipelineDefinitionError(self.errors)
        instances = {}
        for inst_id in order:
            op, p = ops[inst_id], params[inst_id]
            assert op is not None and p is not None
            instances[inst_id] = Instance(inst_id, op, p, inputs.get(inst_id))
        self.check_planned_scans(instances)
        self.check_output_dirs(instances)
        if self.errors:
            raise PipelineDefinitionError(self.errors)
        return PipelineDefinition(
            name=header.name,
            source=self.source,
            spec=PipelineSpec.model_validate({**header.model_dump(), "operators": specs}),
            instances=instances,
            dead_letters=Instance(DEAD_LETTERS, dead_op, dead_params),
            kafka=kafka_client,
            create_topics=bool(header.kafka and header.kafka.create_topics),
            connections=connections,
        )

    def check_planned_scans(self, instances: Mapping[str, Instance]) -> None:
        """A source that plans its scans (a simulator, a file) is asked for them before anything runs: a file
        it cannot read is an error now, not a dead letter and exit 0. A per-scan reduction refuses those scans
        when they need more state than its max_state_mb: else every frame would be made first, for hours.

        The planned header is the source's: no operator of the catalog changes a scan's shape or frame
        count, which most of the state follows (bin_frames shrinks the frames, so diffraction_sum after it
        needs less than this checks)."""
        planned: dict[str, FrameHeader] = {}
        for inst in instances.values():
            if inst.input is None and issubclass(inst.operator, PlansItsScans):
                try:  # a file it cannot read, say: one line now rather than a dead letter and exit 0
                    planned[inst.id] = inst.operator(inst.params).planned_scan()
                except (OSError, ValueError) as exc:
                    self.error(("operators", inst.id, "params"), f"{inst.id}: {exc}")
        for inst in instances.values():
            if not issubclass(inst.operator, ScanReduceOperator):
                continue
            root = inst
            while root.input is not None:
                root = instances[root.input[0]]
            if root.id not in planned:
                continue
            try:
                inst.operator(inst.params).check_fits(planned[root.id])
            except ScanTooLargeError as exc:
                self.error(("operators", root.id, "params"), f"{inst.id}: {root.id}'s {exc}")

    def check_output_dirs(self, instances: Mapping[str, Instance]) -> None:
        """Two writers of one kind into one directory would overwrite each other's files, silently: refused.
        Writers whose file names follow the input image's name (write_image) collide only when their
        upstreams make images of a same name (their parameters' ``image_names``); an upstream that does not
        declare them (a plugin's) may make any name, so its writer shares a directory with no other."""
        writers: dict[tuple[Any, ...], list[tuple[str, set[str] | None]]] = {}
        for inst in instances.values():
            for param, files in output_files(inst.operator.Params).items():
                folder = Path(getattr(inst.params, param)).expanduser().resolve()
                names: set[str] | None = None  # None: every file name may be the other's
                if files.named_by_image and inst.input is not None:
                    made = getattr(instances[inst.input[0]].params, "image_names", None)
                    names = None if made is None else set(made)
                # One operator per key: its writers all name their files by image (sets) or none do (None).
                earlier = writers.setdefault((inst.operator.name, param, folder), [])
                for first, first_names in earlier:
                    shared = None if names is None or first_names is None else names & first_names
                    if shared is None or shared:
                        detail = f" ({', '.join(sorted(shared))})" if shared else ""
                        self.error(
                            ("operators", inst.id, "params", param),
                            f"{inst.id}: writes {files.names}{detail} into {folder}, as {first} does: each would "
                            f"overwrite the other's files; give one of them another {param}",
                        )
                        break
                earlier.append((inst.id, names))

    def check_kafka(self, kafka: KafkaSection | None) -> KafkaClientConfig | None:
        if kafka is None:
            return None
        try:
            kafka.file_settings()
        except (OSError, ValueError) as exc:
            self.error(("kafka", "config_file"), f"kafka.config_file: {exc}")
            return None
        try:
            client = kafka.client()
            client.check()  # what librdkafka refuses (a name it does not know, a bad value), before any run
            return client
        except ValueError as exc:
            self.error(("kafka", "settings"), f"kafka.settings: {exc}")
        return None

    def check_operator(
        self,
        path: YamlPath,
        name: str,
        values: Mapping[str, Any],
        catalog: dict[str, type[Operator]],
        has_kafka: bool,
    ) -> tuple[type[Operator] | None, OperatorParams | None]:
        label = path[-1]
        op = catalog.get(name)
        if op is None:
            self.error(
                (*path, "operator"),
                f"{label}: unknown operator {name!r}{did_you_mean(name, catalog)}; known: {', '.join(catalog)}",
            )
            return None, None
        if needs_kafka_client(op) and not has_kafka:
            self.error(
                (*path, "operator"),
                f"{label}: operator {name!r} talks to Kafka: add a top-level 'kafka:' section with bootstrap_servers",
            )
        try:
            return op, op.validate_params(values)
        except OperatorParameterError as exc:
            self.error(self.offending_param(path, op, values), f"{label}: {exc}")
        known = {k: v for k, v in values.items() if k in op.Params.model_fields}
        if len(known) < len(values):  # the unknown names hid the values: check those too
            try:
                op.validate_params(known)
            except OperatorParameterError as exc:
                self.error(self.offending_param(path, op, known), f"{label}: {exc}")
        return op, None

    def offending_param(self, path: YamlPath, op: type[Operator], values: Mapping[str, Any]) -> YamlPath:
        """The path of the first parameter the operator rejects (its 'params' key if none is to blame)."""
        unknown = [k for k in values if k not in op.Params.model_fields]
        if unknown:
            return (*path, "params", unknown[0])
        try:
            op.Params.model_validate(dict(values))
        except ValidationError as exc:
            for err in exc.errors():
                if err["loc"] and err["loc"][0] in values:
                    return (*path, "params", err["loc"][0])
        return (*path, "params") if (*path, "params") in self.lines else (*path, "operator")

    def check_dead_letter_sink(self, op: type[Operator]) -> None:
        ports = op.spec().inputs or []
        where = (DEAD_LETTERS, "operator")
        if not ports:
            self.error(where, f"{DEAD_LETTERS}: operator {op.name!r} is a source; the sink needs an input")
            return
        try:
            port = ports[0]
            check_connection("the dead letters", DeadLetter, f"{DEAD_LETTERS}.{port.name}", port_type(port.type))
        except PortTypeError as exc:
            self.error(where, f"{DEAD_LETTERS}: {exc}")

    def check_input(
        self,
        inst_id: str,
        text: str,
        specs: dict[str, InstanceSpec],
        ops: dict[str, type[Operator] | None],
        declared: Mapping[Any, Any],
    ) -> tuple[str, str] | None:
        path = ("operators", inst_id, "input")
        upstream, dot, port = text.strip().partition(".")
        if upstream not in specs:
            if upstream in map(_as_written, declared):
                return None  # an instance with errors of its own (a number as its id, too), which say why
            ids = [_as_written(k) for k in specs]
            self.error(
                path,
                f"{inst_id}: input {text!r}: no instance {upstream!r}{did_you_mean(upstream, ids)}; "
                f"instances: {', '.join(ids)}",
            )
            return None
        up_op = ops[upstream]
        if up_op is None:
            return None  # its own error says why
        outputs = [p.name for p in up_op.spec().outputs or []]
        if not dot:
            if len(outputs) != 1:
                self.error(path, f"{inst_id}: input {text!r}: name the port, one of {', '.join(outputs) or '(none)'}")
                return None
            return upstream, outputs[0]
        if port == DEAD_LETTER:
            self.error(
                path,
                f"{inst_id}: input {text!r}: dead letters are not connected by hand; "
                f"all of them go to the '{DEAD_LETTERS}:' sink",
            )
            return None
        if port not in outputs:
            self.error(
                path,
                f"{inst_id}: input {text!r}: {upstream} ({up_op.name}) has no output port {port!r}; "
                f"its outputs: {', '.join(outputs) or '(none)'}",
            )
            return None
        return upstream, port

    def check_cycles(self, ids: list[str], inputs: dict[str, tuple[str, str]]) -> list[str]:
        """Build order (upstreams first, else file order); reports each cycle once."""
        order: list[str] = []
        done: set[str] = set()
        in_cycle: set[str] = set()
        for start in ids:
            chain: list[str] = []
            node: str | None = start
            while node is not None and node not in done and node not in chain:
                chain.append(node)
                node = inputs[node][0] if node in inputs else None
            if node is not None and node in chain:  # a new cycle
                cycle = chain[chain.index(node) :]
                first = min(cycle, key=ids.index)
                rotated = cycle[cycle.index(first) :] + cycle[: cycle.index(first)]
                # chain runs downstream -> upstream; show the data flow
                flow = [first, *reversed(rotated[1:]), first]
                self.error(("operators", first, "input"), f"cycle: {' -> '.join(flow)}")
                in_cycle.update(cycle)
            for item in reversed(chain):
                done.add(item)
                if item not in in_cycle:
                    order.append(item)
        return order


def _quietly(model: type[_M], value: Any) -> _M | None:
    """``value`` validated, or None (its errors are reported with the whole document's)."""
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _catalog() -> dict[str, type[Operator]]:
    from beamops.registry import discover

    return discover()
