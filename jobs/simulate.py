"""Publish simulated (or recorded) 4D-STEM scans to a Kafka topic, like a detector would.

    python -m jobs.simulate --bootstrap_servers 127.0.0.1:9092 --topic frames
    python -m jobs.simulate --topic frames --scan_rows 256 --scan_cols 256 --rate 87000 --n_scans 3
    python -m jobs.simulate --topic frames --hdf5 scan_15_electrons.h5 --create_topic --partitions 8
    python -m jobs.simulate --help

Each batch of frames becomes one message (Arrow IPC, key = scan number), sent by an idempotent
producer (beamops.io.publish.FramePublisher). Simulated scans come from
beamops.simulate.ScanSimulation; --hdf5 publishes a stempy electron-counted file instead (its
shapes), once per scan number. Scans are numbered from --first_scan_number, else from the number
the file stores, else, as a detector counts, from one after the largest scan number among the
newest messages of the topic's partitions (1 for an empty topic): a reduce skips the frames of a
scan number it has reduced as frames delivered twice, so a second run must not reuse one.

Progress goes to stderr (a bar on a terminal, else a log line every few seconds); the summary
goes to stdout. Exit status: 0 when every message was delivered, 1 when delivery failed, 2 for bad
arguments (a topic that does not exist among them) or a bad input file, 130 when interrupted (143 for
SIGTERM, which also delivers what is queued first).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

from beamops.frames import SparseFrameBatch
from beamops.io.hdf5 import StempyFormatError, check_scan_positions, read_stempy_hdf5
from beamops.io.kafka import closest_topic, ensure_topic, newest_scan_number, topic_names
from beamops.io.kafka_config import KafkaClientConfig, KafkaUnavailableError
from beamops.io.publish import PARTITIONERS, FramePublisher, PublishError, PublishStats, TopicNotFoundError
from beamops.options import add_kafka_client_arguments
from beamops.runner import describe_unknown, stop_signals, stopped_by_words
from beamops.simulate import ScanSimulation

PROG = "python -m jobs.simulate"
BEHIND = 0.5  # a run with more of its frames late than this says it could not keep up with --rate
SLOW = 0.8  # a run whose frames went out slower than this part of --rate (the broker's doing) says so,
SLOW_AFTER_S = 1.0  # if it lasted this long: a shorter one's rate is mostly the wait for its last acknowledgement
log = logging.getLogger("jobs.simulate")
_UNSET = object()  # marks a simulated-scan option the command line did not give


class Progress:
    """A one-line progress bar redrawn with \\r on a terminal; periodic log lines otherwise.

    It counts the frames the broker acknowledged, and shows those still queued: while the broker is
    away, the publisher keeps queueing (up to librdkafka's local limit) and the count stops.
    """

    def __init__(
        self,
        total_frames: int,
        *,
        stream: TextIO | None = None,
        mode: str = "auto",
        log_every_s: float = 5.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.total = total_frames
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.every_s = 0.1 if mode == "bar" else log_every_s
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._stats: PublishStats | None = None
        self._width = 0

    def update(self, stats: PublishStats) -> None:
        self._stats = stats
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._show(now)

    def _line(self, now: float) -> str:
        # The publisher's own clock (first publish on), as the summary line's rate: not the set-up before it.
        publishing = self._stats.elapsed_s if self._stats else 0.0
        elapsed = max(publishing if publishing > 0 else now - self._start, 1e-9)
        delivered = self._stats.delivered_frames if self._stats else 0
        queued = self._stats.frames - delivered if self._stats else 0
        delivered_bytes = self._stats.delivered_bytes if self._stats else 0
        rate = delivered / elapsed
        fraction = delivered / self.total if self.total else 1.0
        eta = (self.total - delivered) / rate if rate > 0 else float("inf")
        eta_text = "--:--" if eta == float("inf") else f"{int(eta // 60):02d}:{int(eta % 60):02d}"
        return (
            f"{delivered:,}/{self.total:,} frames delivered {fraction:6.1%}  {queued:,} queued  "
            f"{rate:,.0f} frames/s  {delivered_bytes / 1e6 / elapsed:.1f} MB/s  ETA {eta_text}"
        )

    def _show(self, now: float) -> None:
        if self.mode == "bar":
            width = 30
            done = self._stats.delivered_frames if self._stats else 0
            filled = int(width * min(done / self.total, 1.0)) if self.total else width
            bar = "#" * filled + "." * (width - filled)
            line = f"[{bar}] {self._line(now)}"
            self.stream.write(f"\r{line:<{self._width}}")
            self._width = max(self._width, len(line))
            self.stream.flush()
        elif self.mode == "log":
            log.info("progress: %s", self._line(now))

    def close(self, stats: PublishStats | None = None) -> None:
        """The last line (bar or log), with ``stats`` once every message is delivered (or the run stopped)."""
        if stats is not None:
            self._stats = stats
        self._show(self._clock())
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish simulated or recorded 4D-STEM scans to Kafka as Arrow-encoded sparse frame batches.",
        formatter_class=_DefaultsHelp,
    )
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument("--bootstrap_servers", default="127.0.0.1:9092", help="Kafka bootstrap servers.")
    kafka.add_argument("--topic", required=True, help="Topic to publish to.")
    kafka.add_argument(
        "--partitioner",
        choices=PARTITIONERS,
        default="round-robin",
        help="round-robin: spread every scan over all partitions; by-scan: one partition per scan.",
    )
    add_kafka_client_arguments(kafka)
    kafka.add_argument("--create_topic", action="store_true", help="Create the topic if it does not exist.")
    kafka.add_argument("--partitions", type=int, default=4, help="Partitions of a topic --create_topic creates.")
    kafka.add_argument(
        "--replication_factor", type=int, default=-1, help="Replication of a created topic (-1: broker default)."
    )

    scan = parser.add_argument_group("scan (simulated unless --hdf5)")
    simulated = [
        scan.add_argument("--scan_rows", type=int, default=64, help="Scan positions along y (rows)."),
        scan.add_argument("--scan_cols", type=int, default=64, help="Scan positions along x (columns)."),
        scan.add_argument("--frame_rows", type=int, default=576, help="Detector rows, px."),
        scan.add_argument("--frame_cols", type=int, default=576, help="Detector columns, px."),
        scan.add_argument("--events_per_frame", type=float, default=50.0, help="Mean (Poisson) electrons per frame."),
        scan.add_argument("--frames_per_position", type=int, default=1, help="Frames recorded at each scan position."),
        scan.add_argument("--disc_radius", type=float, default=20.0, help="Bright-field disc radius, px."),
        scan.add_argument("--shift_amplitude", type=float, default=8.0, help="Largest COM shift, px."),
        scan.add_argument(
            "--seed",
            type=int,
            default=0,
            help="Random seed: the same seed and --batch_size publish the same frames (each batch has its own).",
        ),
    ]
    scan.add_argument(
        "--hdf5",
        metavar="FILE",
        help="Publish this stempy electron-counted file instead; its shapes are the file's, its scan number the "
        "file's (if stored) unless --first_scan_number is given.",
    )

    run = parser.add_argument_group("publishing")
    run.add_argument("--batch_size", type=int, default=1000, help="Frames per message.")
    run.add_argument("--n_scans", type=int, default=1, help="Scans to publish, one after the other.")
    run.add_argument(
        "--first_scan_number",
        type=int,
        help="Scan number of the first scan; the next ones count up. Default: the number a --hdf5 file stores, "
        "else one after the newest scan in the topic (1 if it is empty).",
    )
    run.add_argument("--rate", type=float, default=0.0, help="Target frames/s (0: as fast as possible).")
    run.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "off"),
        default="auto",
        help="auto: a bar when stderr is a terminal, else a log line every few seconds.",
    )
    # Defaults of the simulated scan's options are filled in after parsing, so that one given with --hdf5 is
    # seen: else it would be dropped without a word and the user believe the file was published with it.
    args, unknown = parser.parse_known_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in simulated}))
    if unknown:  # as the jobs say it: a mistyped --scan-rows names --scan_rows
        known = [option for action in parser._actions for option in action.option_strings]
        parser.error(f"unrecognized arguments: {' '.join(describe_unknown(unknown, known))}")
    given = [a.option_strings[0] for a in simulated if getattr(args, a.dest) is not _UNSET]
    if args.hdf5 and given:
        parser.error(f"{', '.join(given)}: --hdf5 publishes the file's scan; the simulated scan's options do not apply")
    for action in simulated:
        if getattr(args, action.dest) is _UNSET:
            setattr(args, action.dest, action.default)
    at_least_one = ("batch_size", "n_scans", "partitions", "scan_rows", "scan_cols", "frame_rows", "frame_cols")
    for name in (*at_least_one, "frames_per_position"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.events_per_frame < math.inf:
        parser.error(f"--events_per_frame must be a finite number >= 0, got {args.events_per_frame}")
    if args.first_scan_number is not None and args.first_scan_number < 0:
        parser.error("--first_scan_number must be >= 0")
    if not (args.rate == 0 or 1 <= args.rate < math.inf):  # NaN fails both
        parser.error(f"--rate must be 0 (as fast as possible) or a number of frames/s from 1 up, got {args.rate}")
    return args


@dataclass(frozen=True)
class _Scans:
    """What a run publishes, checked before anything is sent; its scans are numbered once the topic is known."""

    frames_each: int  # frames of one scan
    stored_number: int | None  # the scan number a --hdf5 file stores
    batches_of: Callable[[int], Iterator[SparseFrameBatch]]  # scan number -> its batches


def _scans(args: argparse.Namespace) -> _Scans:
    """Checks the parameters or the file."""
    if args.hdf5:
        info = check_scan_positions(args.hdf5)  # the whole file is publishable, or nothing is sent
        log.info(
            "%s: stempy v%d, scan shape %dx%d, frame shape %dx%d, %d frames, scan number %s",
            args.hdf5, info.version, *info.scan_shape, *info.frame_shape, info.n_frames,
            "not stored" if info.scan_number is None else info.scan_number,
        )  # fmt: skip
        return _Scans(
            info.n_frames,
            info.scan_number,
            lambda n: read_stempy_hdf5(args.hdf5, args.batch_size, scan_number=n),
        )
    sim = ScanSimulation(
        scan_shape=(args.scan_rows, args.scan_cols),
        frame_shape=(args.frame_rows, args.frame_cols),
        events_per_frame=args.events_per_frame,
        frames_per_position=args.frames_per_position,
        disc_radius=args.disc_radius,
        shift_amplitude=args.shift_amplitude,
        seed=args.seed,
    )
    return _Scans(sim.n_frames, None, lambda n: replace(sim, scan_number=n).batches(args.batch_size))


def first_scan_number(args: argparse.Namespace, scans: _Scans, newest: int | None) -> int:
    """--first_scan_number, else the number a --hdf5 file stores, else one after ``newest`` (the largest
    scan number among the newest messages of the topic; None: an empty topic), as a detector counts its
    scans. A number the topic may already hold is said: a reduce takes frames of a scan it has reduced for
    ones delivered again and skips them."""
    first = next((n for n in (args.first_scan_number, scans.stored_number) if n is not None), None)
    if first is None:
        return 1 if newest is None else newest + 1
    if newest is not None and first <= newest:
        log.warning(
            "topic %r already holds scans up to %d: scan %d published again is skipped by a reduce that "
            "reduced it (as frames delivered twice); give --first_scan_number %d for a new scan",
            args.topic, newest, first, newest + 1,
        )  # fmt: skip
    return first


def _closest_topic(client: KafkaClientConfig, topic: str) -> str:
    """`` (did you mean 'x'?)`` for a topic Kafka has whose name is close to ``topic``, else ""."""
    try:
        return closest_topic(topic, topic_names(client))
    except KafkaUnavailableError:
        return ""


def _not_in_full(last: SparseFrameBatch | None, queued: bool) -> str:
    """Which scan an interrupted run did not publish in full: that of the ``last`` batch it came to, unless
    that batch was ``queued`` and ends its scan."""
    if last is None:
        return ""
    total = last.header.total_frames
    if queued and total is not None and int(last.frame_numbers[-1]) + 1 >= total:
        return ""
    return f"; scan {last.header.scan_number} was not published in full"


def _error(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        client = KafkaClientConfig.load(args.bootstrap_servers, args.kafka_config_file, args.kafka_config)
        client.check()
        scans = _scans(args)
    except (OSError, ValueError) as exc:  # StempyFormatError is a ValueError
        return _error(str(exc), 2)

    progress = Progress(scans.frames_each * args.n_scans, mode=args.progress)
    if args.create_topic:
        try:
            ensure_topic(client, args.topic, args.partitions, args.replication_factor)
        except RuntimeError as exc:
            return _error(str(exc), 1)
    # Said first: an unreachable broker is otherwise silence until the timeout.
    log.info("asking Kafka at %s for topic %r's partitions", args.bootstrap_servers, args.topic)
    with stop_signals() as stopped_by:  # SIGTERM as Ctrl-C: what is queued is still delivered
        return _publish(args, client, scans, progress, stopped_by)


def _publish(
    args: argparse.Namespace,
    client: KafkaClientConfig,
    scans: _Scans,
    progress: Progress,
    stopped_by: Callable[[], int],
) -> int:
    """Publish the scans; the exit status."""
    publisher: FramePublisher | None = None
    publishing: SparseFrameBatch | None = None  # the batch the run came to, and whether the publisher took it
    queued = False
    total = scans.frames_each * args.n_scans
    try:
        # Leaving the block flushes: on success it waits for every delivery and raises on a failure; after an
        # error or Ctrl-C it still delivers what is queued (for up to 10 s).
        with FramePublisher(client, args.topic, partitioner=args.partitioner, rate=args.rate or None) as publisher:
            first = first_scan_number(args, scans, newest_scan_number(client, args.topic))
            numbers = range(first, first + args.n_scans)
            log.info(
                "publishing %d frames (scan%s %s) to %r (%d partitions, %s) on %s, %s",
                total,
                "s" if len(numbers) > 1 else "",
                f"{first}-{numbers[-1]}" if len(numbers) > 1 else first,
                args.topic,
                len(publisher.partition_ids),
                args.partitioner,
                args.bootstrap_servers,
                f"{args.rate:,.0f} frames/s" if args.rate else "as fast as possible",
            )
            for batch in (b for n in numbers for b in scans.batches_of(n)):
                publishing, queued = batch, False
                publisher.publish(batch)
                queued = True
                progress.update(publisher.stats())
    except (KeyboardInterrupt, PublishError, StempyFormatError, KafkaUnavailableError) as exc:
        stopped_at = publisher.stats() if publisher is not None else None
        if publisher is not None:  # else nothing was published: no progress to show
            progress.close(stopped_at)
        if isinstance(exc, KeyboardInterrupt):
            signum = stopped_by() or signal.SIGINT
            how = stopped_by_words(signum)
            if stopped_at is None:
                log.error("%s before publishing anything", how)
            else:
                log.error("%s after %s%s", how, stopped_at.describe(), _not_in_full(publishing, queued))
            return 128 + signum
        if isinstance(exc, StempyFormatError):
            return _error(str(exc), 2)
        if isinstance(exc, TopicNotFoundError):  # a bad --topic, as for the jobs
            return _error(f"{exc}{_closest_topic(client, args.topic)}; create it or pass --create_topic", 2)
        return _error(str(exc), 1)
    assert publisher is not None
    stats = publisher.stats()
    progress.close(stats)
    print(
        f"published {stats.frames} frames in {stats.batches} batches to {args.topic!r}: "
        f"{stats.bytes / 1e6:.1f} MB in {stats.elapsed_s:.2f} s, {stats.frames_per_s:,.0f} frames/s"
        f"{f' (target {args.rate:,.0f})' if args.rate else ''}",
        flush=True,
    )
    slow = stats.elapsed_s >= SLOW_AFTER_S and stats.frames_per_s < SLOW * args.rate
    if args.rate and stats.late_frames <= BEHIND * stats.frames and slow:
        log.warning(
            "the frames went out at %s frames/s, below --rate %s: the broker acknowledged them more slowly "
            "(a new broker's first publish also waits for its producer id)",
            f"{stats.frames_per_s:,.0f}", f"{args.rate:,.0f}",
        )  # fmt: skip
    if args.rate and stats.late_frames > BEHIND * stats.frames:
        log.warning(
            "%.0f%% of the frames were ready only after --rate %s frames/s had them due: this process could "
            "not make and send frames faster here; for more, run several simulators (--first_scan_number) "
            "at once%s",
            100 * stats.late_frames / stats.frames, f"{args.rate:,.0f}",
            "" if args.hdf5 else ", or fewer events per frame",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
