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


def add_kafka_arguments(parser: Any, *, live: bool) -> list[str]:
    """Kafka input/output options of a job; ``live=False`` (replay) has no consumer group. Returns the
    names of those that need ``--bootstrap_servers``."""
    from beamops.io.kafka import ReadFromKafkaParams

    fields = ReadFromKafkaParams.model_fields
    group = parser.add_argument_group(
        "Kafka (without --bootstrap_servers the job uses the simulated source)" if live else "Kafka"
    )
    group.add_argument("--bootstrap_servers", help="Kafka brokers, host:port[,host:port...]")
    group.add_argument("--input_topic", help=fields["topic"].description)
    group.add_argument("--output_topic", help="Topic for ComMaps (progressive and final), key = scan number.")
    group.add_argument(
        "--dead_letter_topic", help="Topic for dead letters; without it they go to <out_dir>/dead_letters/."
    )
    if live:
        group.add_argument("--group_id", help=fields["group_id"].description)
        group.add_argument("--start", help=fields["start"].description)
        group.add_argument("--stop", help=fields["stop"].description)
    else:  # no group to start from, and a range that ends: ReadFromKafkaParams' texts less those positions
        group.add_argument(
            "--start",
            help="Inclusive start (required): earliest | latest | offset:N | offset:P=N,... | timestamp:T (ms, or "
            "ISO-8601: UTC if no zone).",
        )
        group.add_argument(
            "--stop", help="Exclusive end: latest | offset:N | offset:P=N,... | timestamp:T (a time that has passed)."
        )
    group.add_argument(
        "--create_topics",
        action="store_true",
        help="Create --output_topic and --dead_letter_topic (1 partition) if they do not exist.",
    )
    add_kafka_client_arguments(group)
    return [action.dest for action in group._group_actions if action.dest != "bootstrap_servers"]


def add_kafka_client_arguments(group: Any) -> None:
    """``--kafka_config_file`` and ``--kafka_config KEY=VALUE ...``: any librdkafka setting, for every job."""
    group.add_argument(
        "--kafka_config_file", help="librdkafka settings: a properties file (key=value lines) or a JSON object."
    )
    group.add_argument(
        "--kafka_config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="librdkafka settings overriding the file, e.g. security.protocol=SASL_SSL linger.ms=20 (repeatable).",
    )
