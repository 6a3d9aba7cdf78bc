"""The ``beamops`` command.

beamops operators list
beamops operators show NAME [--json]
beamops operators export DIR
beamops operator new NAME [--dir DIR]
beamops pipeline validate FILE [--set ID.PARAM=VALUE]...
beamops pipeline run FILE [--set ID.PARAM=VALUE]... [BEAM_OPTION]...
beamops provenance FILE... [--json]
beamops maps [FOLDER_OR_NPZ...] [--bootstrap_servers B --topic T] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beamops import __version__
from beamops.operator import Operator
from beamops.options import add_kafka_client_arguments
from beamops.registry import (
    BUILTIN_DIR,
    BUILTIN_PACKAGE,
    ENTRY_POINT_GROUP,
    CatalogError,
    UnknownOperatorError,
    discover,
    get,
)
from beamops.spec import OperatorSpec, PortSpec


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    return "\n".join(s.rstrip() for s in out)


def _ports(ports: list[PortSpec] | None) -> str:
    return ", ".join(f"{p.name}:{p.type}" for p in ports or []) or "-"


def cmd_list(_: argparse.Namespace) -> int:
    rows = []
    for name, op in discover().items():
        spec = op.spec()
        rows.append([name, _ports(spec.inputs), _ports(spec.outputs), str(len(spec.parameters or [])), spec.label])
    print(_table(rows, ["NAME", "INPUTS", "OUTPUTS", "PARAMS", "TITLE"]))
    return 0


def _describe(op: type[Operator]) -> str:
    spec = op.spec()
    lines = [
        f"{op.name}: {spec.label}",
        f"  id:          {spec.id}",
        f"  module:      {op.__module__}",
        f"  parallel:    {spec.parallel_config.type.value if spec.parallel_config else 'none'}",
        *textwrap.wrap(spec.description, 100, initial_indent="  ", subsequent_indent="  "),
        "",
        "ports:",
    ]
    for direction, ports in (("in ", spec.inputs), ("out", spec.outputs)):
        for p in ports or []:
            lines.append(f"  {direction} {p.name} ({p.type}): {p.description}")
    lines.append("  out dead_letter (dead_letter): elements that failed, with their bytes and the error")
    lines += ["", "parameters:"]
    rows = []
    for p in spec.parameters or []:
        allowed = ", ".join(p.options) if p.options else ""
        low = f"{p.minimum:g} <= " if p.minimum is not None else ""
        low = f"{p.exclusive_minimum:g} < " if p.exclusive_minimum is not None else low
        high = f" <= {p.maximum:g}" if p.maximum is not None else ""
        high = f" < {p.exclusive_maximum:g}" if p.exclusive_maximum is not None else high
        if low or high:
            allowed = f"{low}x{high}"
        default = "(required)" if p.required else ("unset" if p.default is None else str(p.default))
        rows.append([p.name, p.type.value, default, allowed, p.description])
    lines.append(
        textwrap.indent(_table(rows, ["NAME", "TYPE", "DEFAULT", "ALLOWED", "DESCRIPTION"]), "  ") if rows else "  none"
    )
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    op = get(args.name)
    print(op.spec().to_json() if args.json else _describe(op), end="" if args.json else "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    ops = discover()
    for name, op in ops.items():
        path = out / name / "operator.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(op.spec().to_json())
        except OSError as exc:
            print(f"beamops: cannot write {path}: {exc}", file=sys.stderr)
            return 1
        OperatorSpec.load(path)  # what we write must load under the same model
        print(path)
    print(f"exported {len(ops)} operators to {out}", file=sys.stderr)
    return 0


def cmd_operator_new(args: argparse.Namespace) -> int:
    from beamops.templates import new_operator

    if args.dir is None and Path(BUILTIN_PACKAGE).resolve() != BUILTIN_DIR:
        # Only beamops' own repository has transforms/; elsewhere a package of that name hides beamops' catalog.
        print("beamops: give --dir, the package directory for your operators (e.g. --dir src/myops)", file=sys.stderr)
        return 2
    try:
        made = new_operator(args.name, Path(args.dir or BUILTIN_PACKAGE), Path(args.tests_dir), args.import_path)
    except (ValueError, FileExistsError) as exc:
        print(f"beamops: {exc}", file=sys.stderr)
        return 2
    for path in (made.module, made.spec, made.test, made.project):
        if path is not None:
            print(path)
    if made.project is not None:
        print(
            f"{made.project} is a new project with {made.module_name} as an operator entry point: pipelines and "
            "`beamops operators` find it once the project is installed: pip install -e .",
            file=sys.stderr,
        )
    elif not made.module.resolve().is_relative_to(BUILTIN_DIR):
        print(
            f"pipelines and `beamops operators` find it once your pyproject.toml has\n"
            f'  [project.entry-points."{ENTRY_POINT_GROUP}"]\n'
            f'  {args.name} = "{made.module_name}"\n'
            f"and the project is (re)installed: pip install -e .",
            file=sys.stderr,
        )
    if _importable(made.module_name, made.module):
        print(f"run its test: python -m pytest {made.test}", file=sys.stderr)
    else:  # a src/ layout, say: the test imports the installed package
        print(
            f"run its test after `pip install -e .` ({made.module_name} is not importable from here): "
            f"python -m pytest {made.test}",
            file=sys.stderr,
        )
    return 0


def _importable(module_name: str, module: Path) -> bool:
    """Whether ``python -m pytest`` run here imports ``module_name`` from ``module``: from the current directory
    (which it puts on sys.path), or installed."""
    here = Path.cwd().joinpath(*module_name.split(".")).with_suffix(".py")
    if here.resolve() == module.resolve():
        return True
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:  # its package is missing or fails to import: the test cannot import it either
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve() == module.resolve()


def cmd_kafka(args: argparse.Namespace) -> int:
    from beamops.services import kafka_broker  # lazy: keeps `beamops operators` fast

    if args.action == "up":
        return kafka_broker.up(args.port, args.data_dir, timeout=args.timeout)
    if args.action == "down":
        return kafka_broker.down(args.port, timeout=args.timeout)
    return kafka_broker.status(args.port, as_json=args.json)


def cmd_flink(args: argparse.Namespace) -> int:
    from beamops.services import flink_cluster  # lazy: keeps `beamops operators` fast

    if args.action == "up":
        return flink_cluster.up(args.port, timeout=args.timeout)
    if args.action == "down":
        return flink_cluster.down(args.port, timeout=args.timeout)
    return flink_cluster.status(args.port, as_json=args.json)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from beamops.pipeline import PipelineDefinitionError, load_pipeline  # lazy: keeps `beamops operators` fast

    overrides = list(args.set or [])
    beam_args: list[str] = []
    if args.action == "run":
        # Everything after FILE: --set ID.PARAM=VALUE for us, the rest for Beam.
        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--set", action="append", default=[])
        more, beam_args = extra.parse_known_args(args.beam_args)
        overrides += more.set
        if {"-h", "--help"} & set(beam_args):  # after FILE it would be Beam's, which knows nothing of this command
            build_parser().parse_args(["pipeline", "run", "--help"])  # prints the help and exits 0
    try:
        definition = load_pipeline(args.file, overrides)
    except PipelineDefinitionError as exc:
        print(exc, file=sys.stderr)
        n = len(exc.errors)
        print(f"beamops: {args.file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    if args.action == "validate":
        print(definition.summary())
        return 0
    from beamops.runner import beam_option_names, run, setup_logging

    for arg in beam_args:  # an operator's parameter given as a job's option: say how a pipeline file takes it
        name, _, value = arg.removeprefix("--").partition("=")
        owners = [i.id for i in definition.instances.values() if name in i.operator.Params.model_fields]
        if arg.startswith("--") and owners and name not in beam_option_names():
            print(
                f"beamops pipeline run: error: {arg} is a parameter of {', '.join(owners)}: in a pipeline run, give "
                f"it as --set {owners[0]}.{name}={value or 'VALUE'}",
                file=sys.stderr,
            )
            return 2

    setup_logging()
    bounded = not any(getattr(inst.params, "unbounded", False) for inst in definition.instances.values())
    prog = "beamops pipeline run"
    return run({}, beam_args, lambda p, _: definition.build(p), prog=prog, bounded=bounded, name=definition.name)


def cmd_provenance(args: argparse.Namespace) -> int:
    from beamops.provenance import read_provenance

    status, shown = 0, 0
    for path in args.files:
        try:
            made = read_provenance(path)
        except ValueError as exc:
            print(f"beamops: {exc}", file=sys.stderr)
            status = 2
            continue
        if args.json:
            print(json.dumps({"path": path, "provenance": made.to_dict()}, sort_keys=True))
        else:
            print(("\n" if shown else "") + f"{path}: {made.describe()}")
        shown += 1
    return status


def cmd_maps(args: argparse.Namespace) -> int:
    """The newest COM map of each scan in folders (or .npz files) and/or an output topic, with its counters."""
    from transforms.write_com_map import MAP_FILES, describe_map, map_counters

    if bool(args.bootstrap_servers) != bool(args.topic):
        print("beamops: maps: --bootstrap_servers and --topic go together", file=sys.stderr)
        return 2
    if not args.paths and not args.topic:
        print("beamops: maps: give folders or .npz files, or --bootstrap_servers and --topic", file=sys.stderr)
        return 2
    found: list[dict[str, Any]] = []
    status = 0
    for given in map(Path, args.paths):
        if not given.exists():
            print(f"beamops: maps: {given}: no such file or folder", file=sys.stderr)
            status = 2
            continue
        files = sorted(given.glob(MAP_FILES)) if given.is_dir() else [given]
        if not files:
            print(f"beamops: maps: no COM maps ({MAP_FILES}) in {given}", file=sys.stderr)
            status = 2
        for path in files:
            try:
                found.append({**map_counters(path), "where": str(path)})
            except ValueError as exc:
                print(f"beamops: maps: {exc}", file=sys.stderr)
                status = 2
    if args.topic:
        try:
            found += _maps_in_topic(args)
        except (ValueError, RuntimeError) as exc:  # no such topic, no answer, bad settings
            print(f"beamops: maps: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ValueError) else 1
    for counters in sorted(found, key=lambda c: (c["scan"], c["where"])):
        print(json.dumps(counters, sort_keys=True) if args.json else describe_map(counters))
    return status


def _maps_in_topic(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The newest map of each scan in ``args.topic`` (maps of a scan share a key, so a partition, in order)."""
    from beamops import ComMap
    from beamops.io.kafka import messages_in
    from beamops.io.kafka_config import KafkaClientConfig

    client = KafkaClientConfig.load(args.bootstrap_servers, args.kafka_config_file, args.kafka_config)
    client.check()
    newest: dict[int, dict[str, Any]] = {}
    for msg in messages_in(client, args.topic):
        try:
            counters = ComMap.from_bytes(msg.value()).counters()
        except ValueError:  # not a map (a topic shared with other messages): not ours to describe
            continue
        newest[counters["scan"]] = {**counters, "where": f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"}
    return list(newest.values())


def _pipeline_parser(sub: Any) -> None:
    """``beamops pipeline validate|run FILE``: pipeline definitions in YAML (see beamops.pipeline)."""
    actions = sub.add_parser("pipeline", help="pipeline definitions (YAML): check and run them").add_subparsers(
        dest="action", required=True
    )
    validate = actions.add_parser(
        "validate",
        help="check operators, parameters, connections and port types; exit 2 with FILE:LINE: errors",
    )
    run = actions.add_parser(
        "run",
        help="build and run it (default runner FnApiRunner; --runner=FlinkRunner gets the job defaults)",
        description=(
            "Build and run a pipeline definition. Options after FILE other than --set go to Beam, e.g. "
            "--runner=FlinkRunner (with the Flink defaults of jobs.com_pipeline), --streaming, "
            "--direct_num_workers=4. Without --runner: FnApiRunner, Beam's in-process engine."
        ),
    )
    for action in (validate, run):
        action.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="ID.PARAM=VALUE",
            help="override a parameter of instance ID (or of dead_letters); VALUE is YAML (repeatable)",
        )
        action.add_argument("file", metavar="FILE", help="pipeline definition (YAML)")
        action.set_defaults(func=cmd_pipeline)
    run.add_argument("beam_args", nargs=argparse.REMAINDER, metavar="BEAM_OPTION", help="Beam pipeline options")


def tcp_port(text: str) -> int:
    """A TCP port to listen on, 1..65535."""
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {text!r}")
    return port


def _service_parser(sub: Any, name: str, help_text: str, port: int, func: Any, start_timeout: float) -> Any:
    """``beamops NAME up|down|status [--port]`` for a local server."""
    actions = sub.add_parser(name, help=help_text).add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start it and wait until it serves")
    down = actions.add_parser("down", help="stop it (SIGTERM to its recorded PIDs)")
    status = actions.add_parser("status", help="is it running; exit status 3 when not")
    status.add_argument("--json", action="store_true", help="print the status as one JSON object")
    for action, timeout in ((up, start_timeout), (down, 30.0), (status, None)):
        action.add_argument("--port", type=tcp_port, default=port, help=f"port on 127.0.0.1 (default {port})")
        if timeout is not None:
            action.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})")
        action.set_defaults(func=func)
    return up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beamops", description="beamops: streaming operators for detector data")
    parser.add_argument("--version", action="version", version=f"beamops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    ops = sub.add_parser("operators", help="the operator catalog").add_subparsers(dest="action", required=True)
    ops.add_parser("list", help="table of all operators").set_defaults(func=cmd_list)
    show = ops.add_parser("show", help="one operator: spec, ports, parameters")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print its operator.json instead")
    show.set_defaults(func=cmd_show)
    export = ops.add_parser("export", help="write DIR/<name>/operator.json for every operator")
    export.add_argument("dir")
    export.set_defaults(func=cmd_export)
    _pipeline_parser(sub)
    made = sub.add_parser(
        "provenance", help="which operators, with which parameters, made a written result (.npz, .png, .h5)"
    )
    made.add_argument("files", nargs="+", metavar="FILE")
    made.add_argument("--json", action="store_true", help='one line of JSON per file: {"path": ..., "provenance": ...}')
    made.set_defaults(func=cmd_provenance)

    maps = sub.add_parser(
        "maps",
        help="the newest COM map of each scan, with its counters, in folders or .npz files and/or an output topic",
    )
    maps.add_argument("paths", nargs="*", metavar="FOLDER_OR_NPZ", help="folders of write_com_map, or its .npz files")
    maps.add_argument("--bootstrap_servers", help="Kafka brokers of --topic")
    maps.add_argument("--topic", help="an output topic of write_com_maps_kafka, read from its start; joins no group")
    add_kafka_client_arguments(maps)
    maps.add_argument("--json", action="store_true", help="one line of JSON per map")
    maps.set_defaults(func=cmd_maps)

    single = sub.add_parser("operator", help="write a new operator").add_subparsers(dest="action", required=True)
    new = single.add_parser("new", help="a working operator module, its operator.json and its test")
    new.add_argument("name", help="catalog name: lowercase letters, digits, '_'")
    new.add_argument(
        "--dir",
        help="package directory for the module, e.g. src/myops (required but in beamops' repository: transforms)",
    )
    new.add_argument("--tests-dir", default="tests", help="directory for its test (default tests)")
    new.add_argument("--import-path", help="the package's import path (default: --dir with dots)")
    new.set_defaults(func=cmd_operator_new)

    kafka_up = _service_parser(sub, "kafka", "a local single-node Kafka broker on 127.0.0.1", 9092, cmd_kafka, 60.0)
    kafka_up.add_argument(
        "--data-dir", help="where the broker keeps its data (default: ~/.cache/beamops/run/kafka-PORT)"
    )
    _service_parser(
        sub, "flink", "a local Flink 1.20 cluster (1 JobManager, 1 TaskManager, 2 slots) on 127.0.0.1", 8081,
        cmd_flink, 120.0,
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except (UnknownOperatorError, CatalogError) as exc:
        print(f"beamops: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `beamops operators list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
