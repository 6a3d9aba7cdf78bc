"""Beam overhead: decode -> com_partial -> com_reduce on FnApiRunner vs the same loop without Beam.

    python -m bench.pipeline_overhead            # 16 scans of 256x256, Poisson 50 events/frame, 1000-frame batches
    python -m bench.pipeline_overhead --quick    # 4 scans of 256x256, 3 rounds (< 1 minute)

Inputs are pre-encoded batches: the bytes of ``SparseFrameBatch.to_bytes()``.

* **bare loop**: ``decode_batch`` + ``com_partial().process`` + ``ScanAccumulator.add``
  / ``com_map`` (emitting the same progressive and final maps as com_reduce),
  over the same bytes, in this process, timed at the start and the end of
  every round (below), so that it meets the same neighbours as the pipeline.
* **Beam, Create(indices)**: ``beam.Create`` holds message indices and a Map
  looks the bytes up in this process's memory (possible because FnApiRunner
  runs the worker in-process), then ``decode_sparse_frames()`` |
  ``com_partial()`` | ``com_reduce()`` on ``--runner=FnApiRunner`` (the
  DirectRunner's engine, in-process, one worker). It runs on the first quarter,
  half, three quarters and all of the scans, in rounds (every size once per
  round, so a noisy neighbour slows every size alike).
* **Beam, Create(bytes)** (info): the same pipeline over ``beam.Create(messages)``.
  Beam pickles and bz2-compresses whatever ``Create`` holds into the pipeline
  proto and back, at about 1 s per MB here, so this variant only gets the
  first scan(s) (``--bytes-scans``): it shows why the other variant exists.
* **empty pipeline**: the same shape over ``Create([])``: Beam's fixed start-up
  and tear-down cost.

Both Create variants pass ``reshuffle=False``. By default ``Create`` of more
than one element adds a ``Reshuffle`` (a keyed shuffle, so that a runner can
spread the elements over workers), which costs about 50 us per message here;
a Kafka source has no such step, and neither has the bare loop.

Reported for Create(indices):

* **steady state**: the slope of wall time against frames, fitted (Theil-Sen)
  through every run of every size. Every cost paid once per pipeline
  (building it, start-up, stage set-up, tear-down) is in the intercept, which
  is printed as the fixed cost. This is the throughput a long-running job
  keeps, and the number the target is about;
* **wall** of the largest input, and wall minus the empty pipeline: what one
  short run of this size costs, start-up included;
* **first in -> last out**: from the first message entering decode to the last
  map leaving com_reduce (probes in this process; it still holds the set-up of
  the second fused stage).

Both paths must produce the same final COM map of every scan. Everything runs
on one core (FnApiRunner's default is one in-process worker).

Target (DESIGN.md section 7): the DirectRunner pipeline keeps >= 50% of the
throughput of the same decode+kernel loop without Beam.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
import warnings
from importlib.metadata import version
from typing import Any

import numpy as np

from beamops.frames import SparseFrameBatch, decode_batch
from beamops.results import ComMap
from beamops.simulate import ScanSimulation
from bench import _probe
from bench._common import Derived, Timing, machine_line, robust_line, table, target_line
from transforms.com_partial import com_partial
from transforms.com_reduce import ScanAccumulator

TARGET = 0.5


def make_messages(scans: int, scan: int, events: float, batch_size: int, seed: int) -> tuple[list[bytes], int, int]:
    messages, frames, n_events = [], 0, 0
    for s in range(scans):
        sim = ScanSimulation(
            scan_shape=(scan, scan), frame_shape=(576, 576), events_per_frame=events, seed=seed, scan_number=s + 1
        )
        for b in sim.batches(batch_size):
            messages.append(b.to_bytes())
            frames += b.n_frames
            n_events += len(b.events)
    return messages, frames, n_events


def bare_loop(messages: list[bytes], emit_every: int) -> list[ComMap]:
    """What the pipeline computes, without Beam: the same maps com_reduce emits, in arrival order."""
    op = com_partial()
    open_scans: dict[int, ScanAccumulator] = {}
    maps = []
    for message in messages:
        batch = decode_batch(message)
        assert isinstance(batch, SparseFrameBatch)
        partial = op.process(batch)
        scan = partial.header.scan_number
        acc = open_scans.get(scan) or ScanAccumulator.empty(partial.header, emit_every)
        acc.add(partial)
        if acc.complete:
            open_scans.pop(scan, None)
            maps.append(acc.com_map(final=True, replace_nans=False))
            continue
        if emit_every and acc.frames_seen >= acc.next_emit:
            acc.next_emit = (acc.frames_seen // emit_every + 1) * emit_every
            maps.append(acc.com_map(final=False, replace_nans=False))
        open_scans[scan] = acc
    return maps


def run_beam(messages: list[bytes], source: str, emit_every: int) -> tuple[float, float | None, list[Any]]:
    """Run the pipeline once; return (wall s, first-in -> last-out span s or None, collected outputs)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.com_reduce import com_reduce
    from transforms.decode_frames import decode_sparse_frames

    key = uuid.uuid4().hex
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    if source == "bytes":
        raw = pipeline | "Messages" >> beam.Create(messages, reshuffle=False).with_output_types(bytes)
    else:
        _probe.register_inputs(key, messages)
        raw = (
            pipeline
            | "Indices" >> beam.Create(list(range(len(messages))), reshuffle=False).with_output_types(int)
            | "Lookup" >> beam.Map(_probe.lookup, key).with_output_types(bytes)
        )
    stamped = raw | "StampFirst" >> beam.Map(_probe.stamp_first, key).with_output_types(bytes)
    out = stamped | decode_sparse_frames() | com_partial() | com_reduce(emit_every=emit_every)
    out.com_map | "Collect" >> beam.Map(_probe.collect, key)
    out.dead_letter | "CollectDeadLetters" >> beam.Map(_probe.collect, key + "-dead")
    pipeline.run().wait_until_finish()
    wall = time.perf_counter() - started
    outputs, first, last = _probe.pop(key)
    dead, _, _ = _probe.pop(key + "-dead")
    if dead:
        raise AssertionError(f"{len(dead)} dead letters, e.g. {dead[0]}")
    span = None if first is None or last is None else last - first
    return wall, span, outputs


def finals(maps: list[ComMap]) -> dict[int, ComMap]:
    out = {m.scan_number: m for m in maps if m.final}
    if len(out) != sum(m.final for m in maps):
        raise AssertionError("more than one final map for a scan")
    return out


def check_same(beam_maps: list[ComMap], bare_maps: list[ComMap], what: str) -> str:
    got, want = finals(beam_maps), finals(bare_maps)
    if set(got) != set(want):
        raise AssertionError(f"{what}: final maps for scans {sorted(got)}, bare loop has {sorted(want)}")
    for scan, m in want.items():
        g = got[scan]
        if not (g.complete and m.complete and g.frames_seen == m.frames_seen):
            raise AssertionError(f"{what}: scan {scan} final map not complete or frame counts differ")
        for axis in ("x", "y"):
            if not np.array_equal(getattr(g, axis), getattr(m, axis), equal_nan=True):
                diff = np.nanmax(np.abs(getattr(g, axis) - getattr(m, axis)))
                raise AssertionError(f"{what}: scan {scan} COM {axis} differs from the bare loop (max {diff:g} px)")
    progressive = (sum(not m.final for m in beam_maps), sum(not m.final for m in bare_maps))
    return (
        f"  verified {what}: final COM maps of {len(want)} scans identical (bit for bit) to the bare loop's; "
        f"progressive maps {progressive[0]} (Beam) vs {progressive[1]} (bare)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 scans, 3 rounds (< 1 minute)")
    parser.add_argument("--scan", type=int, default=256, help="each scan is SCAN x SCAN positions (default 256)")
    parser.add_argument("--scans", type=int, default=None, help="number of scans (keys) (default 16, quick 4)")
    parser.add_argument("--bytes-scans", type=int, default=1, help="scans fed through Create(bytes) (default 1)")
    parser.add_argument("--events", type=float, default=50.0, help="mean events per frame (default 50)")
    parser.add_argument("--batch-size", type=int, default=1000, help="frames per message (default 1000)")
    parser.add_argument("--emit-every", type=int, default=10_000, help="com_reduce emit_every (library default)")
    parser.add_argument("--rounds", type=int, default=None, help="Beam runs per input size (default 5, quick 3)")
    parser.add_argument("--bytes-repeat", type=int, default=2, help="Create(bytes) runs (slow: default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.scans = args.scans or (4 if args.quick else 16)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.bytes_scans = min(args.bytes_scans, args.scans)

    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    logging.getLogger("transforms").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    messages, n_frames, n_events = make_messages(args.scans, args.scan, args.events, args.batch_size, args.seed)
    scan_of = [decode_batch(m).header.scan_number for m in messages]
    frames_of = [decode_batch(m).n_frames for m in messages]

    def first_scans(k: int) -> tuple[list[bytes], int]:
        picked = [i for i, s in enumerate(scan_of) if s <= k]
        return [messages[i] for i in picked], sum(frames_of[i] for i in picked)

    sizes = sorted({max(1, round(args.scans * q)) for q in (0.25, 0.5, 0.75, 1.0)})
    if len(sizes) < 2:
        parser.error("--scans must be 2 or more: the steady state is a slope between input sizes")
    inputs = {k: first_scans(k) for k in sizes}
    small, small_frames = first_scans(args.bytes_scans)
    print(machine_line())
    print(f"apache-beam {version('apache-beam')}, numba {version('numba')}; FnApiRunner (in-process, 1 worker)")
    print(
        f"{args.scans} scans of {args.scan}x{args.scan}, Poisson {args.events:g} events/frame: {n_frames} frames, "
        f"{n_events:,} events, {len(messages)} messages of {args.batch_size} frames "
        f"({sum(map(len, messages)) / 1e6:.1f} MB); Create(indices) runs on the first {sizes} scans, "
        f"Create(bytes) on the first {args.bytes_scans} ({small_frames} frames, {sum(map(len, small)) / 1e6:.1f} MB); "
        f"emit_every={args.emit_every}"
    )

    bare_maps = bare_loop(messages, args.emit_every)  # also warms up numba (read-only arrays from Arrow)
    run_beam(small[:2], "indices", args.emit_every)  # warm up Beam's imports and code paths

    def time_bare() -> float:
        started = time.perf_counter()
        bare_loop(messages, args.emit_every)
        return time.perf_counter() - started

    bare_times: list[float] = []
    empty_times: list[float] = []
    points: list[tuple[int, float]] = []  # (frames, wall s) of every Create(indices) run
    walls: dict[int, list[float]] = {k: [] for k in sizes}
    spans: list[float] = []
    for r in range(args.rounds):
        # Every round times the bare loop (twice), the empty pipeline and every size, so that a
        # neighbour's load, which comes and goes over minutes here, weighs on all of them alike.
        bare_times.append(time_bare())
        empty_times.append(run_beam([], "bytes", args.emit_every)[0])
        for k in sizes:
            batch, frames = inputs[k]
            wall, span, outputs = run_beam(batch, "indices", args.emit_every)
            if r == 0:
                want = bare_maps if k == args.scans else bare_loop(batch, args.emit_every)
                note = check_same(outputs, want, f"Beam Create(indices), {k} scans")
                if k == args.scans:
                    print(note)
            points.append((frames, wall))
            walls[k].append(wall)
            if k == args.scans and span is not None:
                spans.append(span)
        bare_times.append(time_bare())
    bare, empty = Timing(tuple(bare_times)), Timing(tuple(empty_times))
    b_walls, b_spans = [], []
    for i in range(args.bytes_repeat):
        wall, span, outputs = run_beam(small, "bytes", args.emit_every)
        if i == 0:
            print(
                check_same(
                    outputs, bare_loop(small, args.emit_every), f"Beam Create(bytes), {args.bytes_scans} scan(s)"
                )
            )
        b_walls.append(wall)
        b_spans.append(span)

    def minus_empty(ts: list[float]) -> Timing:
        return Timing(tuple(max(t - empty.median, 1e-9) for t in ts))

    # steady state: fitted through all runs (median-like), and through the best run of each size
    per_frame, fixed = robust_line([f for f, _ in points], [w for _, w in points])
    best_per_frame, best_fixed = robust_line([inputs[k][1] for k in sizes], [min(walls[k]) for k in sizes])
    steady = Derived(max(best_per_frame * n_frames, 1e-9), max(per_frame * n_frames, 1e-9))
    measurements: list[tuple[str, int, Timing | Derived]] = [
        ("bare loop: decode + kernel + reduce", n_frames, bare),
        ("empty pipeline: Create([]), same shape", 0, empty),
        (f"Beam Create(indices): steady state, fit over {sizes} scans", n_frames, steady),
        ("Beam Create(indices): wall", n_frames, Timing(tuple(walls[args.scans]))),
        ("Beam Create(indices): wall - empty", n_frames, minus_empty(walls[args.scans])),
        ("Beam Create(indices): first in -> last out", n_frames, Timing(tuple(spans))),
        ("Beam Create(bytes): wall", small_frames, Timing(tuple(b_walls))),
        ("Beam Create(bytes): first in -> last out", small_frames, Timing(tuple(b_spans))),
    ]
    bare_best, bare_med = n_frames / bare.best, n_frames / bare.median
    rows, targets = [], []
    for name, frames, t in measurements:
        if not frames:
            rows.append([name, "", t.best, t.median, "", "", "", ""])
            continue
        fb, fm = frames / t.best, frames / t.median
        rows.append(
            [name, frames, t.best, t.median, fb / 1e3, fm / 1e3, f"{fb / bare_best:.0%}", f"{fm / bare_med:.0%}"]
        )
        if name.startswith("Beam Create(indices)"):
            targets.append(target_line(f"{name} / bare loop, median", 100 * fm / bare_med, 100 * TARGET, "%"))
    headers = ["case", "frames", "best s", "median s", "kframe/s best", "kframe/s med", "vs bare best", "vs bare med"]
    print(
        f"times: best and median over {args.rounds} rounds, each timing the bare loop (at its start and end), the "
        f"empty pipeline and Create(indices) at every size; {args.bytes_repeat} Create(bytes) runs; "
        f"steady state = all {n_frames} frames at the fitted per-frame cost "
        "(best: fit through each size's best run; median: through every run)"
    )
    print(table(headers, rows))
    print(
        f"  fixed cost per pipeline (fit intercept): {fixed:.3f} s (best runs {best_fixed:.3f} s); "
        f"empty pipeline median {empty.median:.3f} s"
    )
    print("\n".join(targets))
    print(
        f"  the target is about the steady state (a streaming job pays the fixed cost once); "
        f"the wall rows include it for this {n_frames}-frame input"
    )
    steady_rate, wall_rate = n_frames / steady.median, n_frames / Timing(tuple(walls[args.scans])).median
    print(
        f"  4D Camera rate 87,000 frames/s: bare loop {bare_med / 87e3:.1f}x, Beam steady state "
        f"{steady_rate / 87e3:.1f}x, wall {wall_rate / 87e3:.1f}x (1 core)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
