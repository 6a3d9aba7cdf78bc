"""Replay: reprocess a range of a frames topic into a separate output.

    python -m jobs.replay --bootstrap_servers 127.0.0.1:9092 --input_topic frames \\
        --start offset:0 --stop latest --output_topic com-replay [--crop_radius 30 ...]
    python -m jobs.replay ... --start timestamp:2026-11-23T10:00:00Z --stop timestamp:2026-11-23T11:00:00Z \\
        --out_dir replay/

The range is given by offsets (``offset:N`` or per partition ``offset:0=N,1=M``)
or timestamps; the stop is exclusive and must be bounded. Operator parameters
may differ from the live run's. A replay never joins, reads or moves a
consumer group: it reads with a throw-away group and commits nothing, so the
live job's position is untouched. Its output must be a topic other than the
input, or a directory, that no live job writes to: an output whose newest maps'
provenance (``beamops-provenance`` header, ``.npz`` key) names a read with a
consumer group or one that never stops is refused. On the same range with the same parameters, a replay writes
byte-identical ComMaps to those of the live run: the reduction sums integers
exactly, so the order in which partitions are read does not matter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam

from beamops import OperatorParameterError
from beamops.io.kafka import live_reads, live_writers_of
from beamops.io.kafka_config import KafkaClientConfig, KafkaUnavailableError, never_stops
from beamops.options import add_kafka_arguments, add_operator_arguments
from beamops.runner import run, runs_here, setup_logging
from jobs import com_pipeline
from transforms.write_com_map import map_provenances

PROG = "python -m jobs.replay"
log = logging.getLogger("jobs.replay")


def build(pipeline: beam.Pipeline, values: dict[str, Any]) -> None:
    for required in ("bootstrap_servers", "input_topic", "start", "stop"):
        if not values.get(required):
            raise OperatorParameterError(f"a replay needs --{required}")
    if values["start"].strip() == "committed":
        raise OperatorParameterError("a replay has no consumer group: start from offsets or a timestamp")
    if never_stops(values["stop"]):
        raise OperatorParameterError("a replay needs a bounded --stop (latest, offset:..., timestamp:...)")
    if values.get("output_topic") == values["input_topic"]:
        raise OperatorParameterError("--output_topic must differ from --input_topic")
    if values.get("output_topic"):
        refuse_a_live_jobs_topic(pipeline, values["output_topic"], com_pipeline.kafka_client(values))
    if values.get("out_dir"):
        refuse_a_live_jobs_folder(Path(values["out_dir"]).expanduser())
    # A replay reads what the topic holds: it never waits for offsets to be written.
    com_pipeline.build(pipeline, {**values, "group_id": None, "wait_past_end": False, "commit_offsets": False})


def refuse_a_live_jobs_topic(pipeline: beam.Pipeline, topic: str, client: KafkaClientConfig) -> None:
    """Refuse an output topic whose newest maps a live job wrote (their provenance names a read with a
    consumer group, or one that never stops): the replay's maps would be mixed with the live job's, two
    maps of one scan number from different reads, for every consumer of that topic."""
    try:
        reads = live_writers_of(client, topic)
    except KafkaUnavailableError as exc:
        if runs_here(pipeline):
            raise
        log.warning("could not check what writes to --output_topic %r from here: %s", topic, exc)
        return
    _refuse_live_output(f"--output_topic {topic!r}", reads)


def refuse_a_live_jobs_folder(folder: Path) -> None:
    """Refuse an --out_dir whose newest maps a live job wrote: the replay would replace the live job's maps
    of the same scans (this machine's view of the folder: on a cluster, the launcher's)."""
    reads = {read for made in map_provenances(folder) for read in live_reads(made)}
    _refuse_live_output(f"--out_dir {str(folder)!r}", reads)


def _refuse_live_output(output: str, live: set[str]) -> None:
    if live:
        flag = output.split(" ", 1)[0]
        raise OperatorParameterError(
            f"{output} holds the maps of a live job ({', '.join(sorted(live))}): a replay writes to an output "
            f"of its own; give another {flag}"
        )


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reprocess a range of a frames topic into a separate topic or directory, without a consumer group.",
        epilog="Beam pipeline options (--runner, ...) are passed to Beam, as for jobs.com_pipeline.",
    )
    add_kafka_arguments(parser, live=False)
    add_operator_arguments(parser, com_pipeline.OPERATORS[1:])
    parser.add_argument("--group_id", help=argparse.SUPPRESS)
    known, beam_args = parser.parse_known_args(argv)
    if known.group_id is not None:
        parser.error("a replay never uses a consumer group; --group_id is not accepted")
    # Beam would take them for options of jobs.com_pipeline (imported here) and drop them.
    simulated = [a for a in beam_args if a.split("=", 1)[0].removeprefix("--") in com_pipeline.SIMULATED_SCAN_OPTIONS]
    if simulated:
        parser.error(f"{', '.join(simulated)}: a replay reads Kafka; the simulated scan's options do not apply")
    return vars(known), beam_args


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    values, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    return run(values, beam_args, build, prog=PROG, bounded=True)  # a replay's stop is bounded


if __name__ == "__main__":
    sys.exit(main())
