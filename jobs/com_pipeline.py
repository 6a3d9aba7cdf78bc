"""Center-of-mass pipeline: frames -> com_partial -> com_reduce -> Kafka and/or files.

    python -m jobs.com_pipeline                      # built-in simulated scan, writes out/
    python -m jobs.com_pipeline --scan_rows 256 --scan_cols 256 --events_per_frame 500
    python -m jobs.com_pipeline --bootstrap_servers 127.0.0.1:9092 --input_topic frames \\
        --output_topic com --group_id com-live --start committed --stop never --streaming
    python -m jobs.com_pipeline --help

Without ``--bootstrap_servers`` the frames come from the built-in simulated
scan and the maps go to files. With it they come from ``--input_topic`` and
the maps go to ``--output_topic`` and/or to files under ``--out_dir``.
Dead letters go to ``--dead_letter_topic`` or to ``<out_dir>/dead_letters/``.

Without ``--runner`` the job runs on Beam's in-process batch engine (the
DirectRunner's FnApiRunner), named explicitly so that it never tries to
download Prism. Any other Beam pipeline option is passed through to Beam.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beamops import OperatorParameterError
from beamops.io.files import files_like, writable_dir
from beamops.io.kafka import (
    ensure_topic,
    read_kafka_frames,
    refuse_missing_topics,
    write_com_maps_kafka,
    write_dead_letters_kafka,
)
from beamops.io.kafka_config import KafkaClientConfig, KafkaUnavailableError, never_stops
from beamops.options import add_kafka_arguments, add_operator_arguments, operator_params
from beamops.runner import DEFAULT_RUNNER, run, runs_here, setup_logging
from beamops.scan_reduce import ScanTooLargeError
from beamops.spec import output_files
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.simulated_scan import simulated_scan
from transforms.write_com_map import write_com_map
from transforms.write_dead_letters import write_dead_letters

OPERATORS = (simulated_scan, com_partial, com_reduce, write_com_map)
SIMULATED_SCAN_OPTIONS = frozenset(simulated_scan.Params.model_fields)  # the source a Kafka read replaces
DEFAULT_OUT_DIR = "out"
PROG = "python -m jobs.com_pipeline"
KAFKA_OPTIONS = add_kafka_arguments(argparse.ArgumentParser(), live=True)  # the ones that need a broker
log = logging.getLogger("jobs.com_pipeline")


class ComPipelineOptions(PipelineOptions):
    """The job's options: one per parameter of its operators, plus Kafka input and output."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add_kafka_arguments(parser, live=True)
        add_operator_arguments(parser, OPERATORS)


def kafka_client(values: dict[str, Any]) -> KafkaClientConfig:
    client = KafkaClientConfig.load(
        values["bootstrap_servers"], values.get("kafka_config_file"), values["kafka_config"]
    )
    client.check()
    return client


def check_topics(pipeline: beam.Pipeline, client: KafkaClientConfig, input_topic: str, outputs: list[str]) -> None:
    """Refuse, before the job runs, ``outputs`` Kafka does not have (else they fail after the input was read;
    none to check when --create_topics made them) and an input topic it does not have (else the running
    job fails with a worker's traceback)."""
    checks = [(outputs, "", "; pass --create_topics to create the job's output topics"),
              ([input_topic], "", "; check --input_topic (the topic the frames are published to)")]  # fmt: skip
    try:
        refuse_missing_topics(client, checks)
    except KafkaUnavailableError as exc:
        if runs_here(pipeline):
            raise
        # A cluster's workers may reach brokers this machine cannot.
        log.warning("could not check the topics from here: %s", exc)


def warn_earlier_maps(folder: Path) -> None:
    """Name the final maps an earlier run left in ``folder``: this run's map of the same scan number replaces
    one, and a rerun with other parameters would otherwise lose the earlier result without a word."""
    earlier = files_like(folder, output_files(write_com_map.Params)["out_dir"].glob)
    if earlier:
        log.warning(
            "%s already holds COM maps (%s): this run replaces those of the scans it writes again; "
            "give another --out_dir to keep them",
            folder,
            earlier,
        )


def check_simulated_scan_fits(source: simulated_scan, reduce: com_reduce) -> None:
    """Refuse, before it runs, a simulated scan that ``reduce`` would refuse (more than max_state_mb): it
    would refuse it only once every frame was made, and a mistyped --scan_rows 100000 takes hours and the
    machine's memory first, without a line of output."""
    try:
        reduce.check_fits(source.planned_scan())
    except ScanTooLargeError as exc:
        scan = source.params
        raise OperatorParameterError(f"--scan_rows {scan.scan_rows} --scan_cols {scan.scan_cols}: {exc}") from None


def build(pipeline: beam.Pipeline, values: dict[str, Any]) -> None:
    """Wire source -> com_partial -> com_reduce -> sinks with the given option values."""
    from_kafka = bool(values.get("bootstrap_servers"))
    out_dir = values.get("out_dir") or DEFAULT_OUT_DIR
    kafka_only = [f"--{name}" for name in KAFKA_OPTIONS if values.get(name)]
    if kafka_only and not from_kafka:
        # Else the job would quietly run on the simulated scan, and its map could pass for real data.
        verb = "needs" if len(kafka_only) == 1 else "need"
        raise OperatorParameterError(f"{', '.join(kafka_only)} {verb} --bootstrap_servers (the Kafka brokers)")
    # Every operator's parameters are checked before anything else is said or done.
    partial = com_partial(operator_params(values, com_partial))
    reduce = com_reduce(operator_params(values, com_reduce))
    file_writer = write_com_map(operator_params(values, write_com_map))
    if from_kafka:
        simulated = [f"--{name}" for name in operator_params(values, simulated_scan)]
        if simulated:
            # Else they would be dropped without a word, and the user believe the read used them.
            raise OperatorParameterError(
                f"{', '.join(simulated)} set the built-in simulated scan, which a Kafka read does not use"
            )
        if not values.get("input_topic"):
            raise OperatorParameterError("--bootstrap_servers needs --input_topic")
        if not values.get("output_topic") and not values.get("out_dir"):
            raise OperatorParameterError("--bootstrap_servers needs --output_topic or --out_dir for the maps")
        if values["input_topic"] in (values.get("output_topic"), values.get("dead_letter_topic")):
            raise OperatorParameterError(f"--input_topic {values['input_topic']!r} cannot also be an output topic")
        client = kafka_client(values)
        outputs = [t for t in (values.get("output_topic"), values.get("dead_letter_topic")) if t]
        # The input first: a mistyped --input_topic must not leave output topics behind.
        check_topics(pipeline, client, values["input_topic"], [] if values.get("create_topics") else outputs)
        if values.get("create_topics"):
            for topic in outputs:
                ensure_topic(client, topic)
        read_settings = ("start", "stop", "wait_past_end", "commit_offsets")
        source = read_kafka_frames(
            {
                "topic": values["input_topic"],
                "group_id": values.get("group_id"),
                **{k: values[k] for k in read_settings if values.get(k) is not None},
            },
            client=client,
        )
    else:
        source = simulated_scan(operator_params(values, simulated_scan))
        check_simulated_scan_fits(source, reduce)
    maps_to_files = not from_kafka or bool(values.get("out_dir"))
    letters_to_kafka = from_kafka and bool(values.get("dead_letter_topic"))
    if (maps_to_files or not letters_to_kafka) and runs_here(pipeline):
        # Its workers are this process: a directory they cannot write fails now, not after the input was read.
        folder = writable_dir(out_dir)
        if maps_to_files:
            warn_earlier_maps(folder)
    elif not letters_to_kafka and not Path(out_dir).is_absolute():
        # A worker that cannot write it fails its bundle on the first dead letter, and Flink restarts the job
        # on the same message for ever.
        log.warning(
            "dead letters go to %r, relative to each worker's working directory: give --dead_letter_topic, or an "
            "absolute --out_dir the workers can write",
            str(Path(out_dir) / "dead_letters"),
        )
    frames = pipeline | source
    maps = frames | partial | reduce
    dead_letters = [maps.dead_letter]
    results = []  # what the sinks wrote: a bounded read commits its offsets once all of it is complete
    if from_kafka and values.get("output_topic"):
        sent = maps.com_map | write_com_maps_kafka(client=client, topic=values["output_topic"])
        dead_letters.append(sent.dead_letter)
        results.append(sent.written)
    if maps_to_files:
        written = maps.com_map | file_writer
        written.main | "LogWritten" >> beam.Map(lambda path: log.info("wrote %s", path))
        dead_letters.append(written.dead_letter)
        results.append(written.main)
    all_dead = dead_letters | "AllDeadLetters" >> beam.Flatten()
    if letters_to_kafka:
        results.append((all_dead | write_dead_letters_kafka(client=client, topic=values["dead_letter_topic"])).main)
    else:
        results.append((all_dead | write_dead_letters(out_dir=out_dir)).main)
    if from_kafka:
        source.commit_after(*results)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Center-of-mass map of 4D-STEM scans, from a simulated scan or a Kafka topic.",
        epilog=(
            "Any Beam pipeline option is also accepted and passed to Beam, e.g. --runner "
            f"(default here: {DEFAULT_RUNNER}, the DirectRunner's in-process engine), --streaming, "
            "--direct_num_workers."
        ),
    )
    ComPipelineOptions._add_argparse_args(parser)
    known, beam_args = parser.parse_known_args(argv)
    return vars(known), beam_args


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    values, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    bounded = not values.get("bootstrap_servers") or not never_stops(values.get("stop") or "latest")
    return run(values, beam_args, build, prog=PROG, bounded=bounded)


if __name__ == "__main__":
    sys.exit(main())
