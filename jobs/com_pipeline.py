"""Center-of-mass pipeline: frames -> com_partial -> com_reduce -> files.

    python -m jobs.com_pipeline                      # built-in simulated scan, writes out/
    python -m jobs.com_pipeline --scan_rows 256 --scan_cols 256 --events_per_frame 500
    python -m jobs.com_pipeline --help

Without ``--runner`` the job runs on Beam's in-process batch engine (the
DirectRunner's FnApiRunner), named explicitly so that it never tries to
download Prism. Any other Beam pipeline option is passed through to Beam.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beamops import OperatorParameterError
from beamops.options import add_operator_arguments, operator_params
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.simulated_scan import simulated_scan
from transforms.write_com_map import write_com_map
from transforms.write_dead_letters import write_dead_letters

OPERATORS = (simulated_scan, com_partial, com_reduce, write_com_map)
DEFAULT_RUNNER = "FnApiRunner"
log = logging.getLogger("jobs.com_pipeline")


class ComPipelineOptions(PipelineOptions):
    """The job's options: one per parameter of its operators."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add_operator_arguments(parser, OPERATORS)


def build(pipeline: beam.Pipeline, values: dict[str, Any]) -> None:
    """Wire source -> com_partial -> com_reduce -> sinks with the given parameter values."""
    frames = pipeline | simulated_scan(operator_params(values, simulated_scan))
    maps = frames | com_partial(operator_params(values, com_partial)) | com_reduce(operator_params(values, com_reduce))
    written = maps | write_com_map(operator_params(values, write_com_map))
    written.main | "LogWritten" >> beam.Map(lambda path: log.info("wrote %s", path))
    written.dead_letter | write_dead_letters(out_dir=values.get("out_dir") or "out")


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.com_pipeline",
        description="Center-of-mass map of 4D-STEM scans; writes scan_<N>_com.npz and .png per scan.",
        epilog=(
            "Any Beam pipeline option is also accepted and passed to Beam, e.g. --runner "
            f"(default here: {DEFAULT_RUNNER}, the DirectRunner's in-process engine) or --direct_num_workers."
        ),
    )
    ComPipelineOptions._add_argparse_args(parser)
    known, beam_args = parser.parse_known_args(argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        beam_args = [f"--runner={DEFAULT_RUNNER}", *beam_args]
    return vars(known), beam_args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    values, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    try:
        build(pipeline, values)
    except OperatorParameterError as exc:
        print(f"python -m jobs.com_pipeline: error: {exc}", file=sys.stderr)
        return 2
    log.info("running on %s", pipeline.options.get_all_options()["runner"])
    result = pipeline.run()
    result.wait_until_finish()
    log.info("done in %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
