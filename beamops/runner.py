"""Running a job: the default runner, FlinkRunner defaults, one-line errors.

Shared by the jobs (``python -m jobs.<name>``) and ``beamops pipeline run``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beamops.io.kafka_config import KafkaUnavailableError, is_secret
from beamops.operator import METRICS_NAMESPACE, OperatorParameterError, closest_name, dead_letters_going_nowhere

# Beam's in-process batch engine (the DirectRunner's FnApiRunner), named so it never tries to download Prism.
DEFAULT_RUNNER = "FnApiRunner"
# Runners that run the pipeline in this process; any other one is portable and gets unknown options.
IN_PROCESS_RUNNERS = frozenset({"fnapi", "direct", "bundlebaseddirect", "switchingdirect"})
HARNESS_PLUGIN = "beamops.harness"  # what an SDK worker imports at start (--beam_plugins)
# Beam's in-process runners keep no event-time watermark between -inf and +inf (apache/beam#35168): a
# live read's event-time timers fire at once, and what reads a Flatten or a GroupByKey runs only once
# every input has ended, which a live read never does.
LIVE_READ_NEEDS_FLINK = (
    "a live read (stop never) runs on Flink: Beam's in-process runner has no event-time watermark "
    "(apache/beam#35168), so each scan would be flushed incomplete at once and split into several final "
    "maps, and dead letters would never be written; start a cluster with `beamops flink up` and add "
    "--runner=FlinkRunner (and --flink_master=host:port unless it is localhost:8081; README: Run on Flink), "
    "or process what the topic holds with a stop of latest "
    "(--stop latest; in a pipeline file, stop: latest or --set <source id>.stop=latest)"
)
log = logging.getLogger("beamops.runner")


def _given(beam_args: list[str], name: str) -> str | None:
    for i, arg in enumerate(beam_args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return None


def flink_defaults(beam_args: list[str], bounded: bool = False, name: str = "beamops") -> list[str]:
    """For --runner=FlinkRunner, add what a user should not have to type.

    ``--job_name=<name>-<UTC time>-<6 hex digits>``: the Flink job's name, by which the client finds
    its job on the cluster (to cancel it on Ctrl-C, to name its last checkpoint).

    ``--flink_version=1.20``, ``--flink_master=localhost:8081``, the cached job-server jar,
    ``--environment_type=LOOPBACK`` (development; production passes EXTERNAL with its worker
    pool), ``--checkpointing_interval=10000`` (Beam's Flink runner checkpoints only when asked) and
    ``--finish_bundle_before_checkpointing``. Without the last, a checkpoint taken while the Kafka
    reader's first bundle is in flight sometimes leaves the reader never running again: no error,
    no output (7 of about 30 jobs here; none of 17 with it, none of 7 without checkpoints).
    ``--max_bundle_time_mills=100``: Flink's streaming default (1000) holds each stage's results up
    to a second before they go on (and the output topic's maps until its bundle ends); at 100 the
    final map of a live scan came 0.25-0.4 s after its last frame instead of 0.9-2.5 s, at frames/s
    within the runs' noise (34,000-82,000 against 45,000-68,000); an idle job costs a quarter of a core
    instead of an eighth (bench/flink_e2e.py, docs/performance.md section 6.1).
    ``bounded`` (the job's input ends): ``--shutdown_sources_after_idle_ms=1000``, without which
    the streaming job never finishes (Beam keeps its Impulse sources running for checkpoints,
    BEAM-3727; Flink 1.20 checkpoints after tasks finish). When the master is a cluster of
    ``beamops flink up``, ``--flink_conf_dir`` of its rendered profile, without which the job gets
    Flink's checkpoint defaults (deleted on cancel, 10 min timeout, no tolerated failure) rather
    than the profile's. Options the user gave win. And always
    ``--beam_plugins=beamops.harness``, so an SDK worker started as a process of its own (the
    docker images' worker pool) applies :mod:`beamops.harness` before its first bundle.
    """
    from beamops.services.flink_cluster import flink_runner_args, local_conf_dir

    master = _given(beam_args, "flink_master") or "localhost:8081"
    # With FLINK_CONF_DIR set, Beam's job server reads that one itself.
    conf_dir = None if os.environ.get("FLINK_CONF_DIR") else local_conf_dir(master)
    # A jar the user gave still gets the master: without one, Beam's job server would start a Flink of its own.
    extra = flink_runner_args(master, conf_dir=conf_dir, jar=_given(beam_args, "flink_job_server_jar"))
    defaults = {
        "job_name": f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}",
        "environment_type": "LOOPBACK",
        "checkpointing_interval": "10000",
        "finish_bundle_before_checkpointing": None,
        "max_bundle_time_mills": "100",
        "streaming": None,
    }
    if bounded:
        defaults["shutdown_sources_after_idle_ms"] = "1000"
    for name, value in defaults.items():
        if _given(beam_args, name) is None and f"--{name}" not in beam_args:
            extra.append(f"--{name}" if value is None else f"--{name}={value}")
    extra = [a for a in extra if _given(beam_args, a[2:].split("=")[0]) is None]
    if f"--beam_plugins={HARNESS_PLUGIN}" not in beam_args:
        extra.append(f"--beam_plugins={HARNESS_PLUGIN}")  # appends to the user's own plugins, if any
    return [*beam_args, *extra]


def run(
    values: dict[str, Any],
    beam_args: list[str],
    build_fn: Callable[[beam.Pipeline, dict[str, Any]], None],
    prog: str,
    bounded: bool = True,
    name: str | None = None,
) -> int:
    """Build and run the pipeline: 0 when it finished; a bad option is a one-line error (exit 2) before
    anything runs; a pipeline that fails is one too (exit 1), after the runner's own log of it; Ctrl-C is
    130 and SIGTERM 143 (a LOOPBACK Flink job is cancelled first). ``prog``
    (``python -m jobs.com_pipeline``) starts the error lines; ``bounded``: the input ends (see
    flink_defaults); a live read (not ``bounded``) is refused on an in-process runner. ``name`` starts a
    Flink job's name (default: the job's module, ``com-pipeline``)."""
    runner = _given(beam_args, "runner")
    unknown = unknown_arguments(beam_args, forwarded=_runner_key(runner) not in IN_PROCESS_RUNNERS)
    if unknown:
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    if not bounded and _runner_key(runner) in IN_PROCESS_RUNNERS:
        print(f"{prog}: error: {LIVE_READ_NEEDS_FLINK}", file=sys.stderr)
        return 2
    if runner is None:
        beam_args = [f"--runner={DEFAULT_RUNNER}", *beam_args]
    started = time.monotonic()
    flink: _FlinkJob | None = None
    with stop_signals() as stopped_by:
        try:
            if _runner_key(runner) == "flink":
                beam_args = flink_defaults(beam_args, bounded, _job_name_of(name or prog.split()[-1]))
                flink = _FlinkJob.of(beam_args)
                bad_snapshot = _savepoint_problem(_given(beam_args, "savepoint_path"), flink.rest_url)
                if bad_snapshot:  # else Flink says so after the job was submitted, deep in its log
                    print(f"{prog}: error: {bad_snapshot}", file=sys.stderr)
                    return 2
                unreachable = _flink_unreachable(_given(beam_args, "flink_master") or "")
                if unreachable:  # else the job server retries for a minute, a stack trace a try
                    print(f"{prog}: error: {unreachable}", file=sys.stderr)
                    return 1
            pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
            build_fn(pipeline, values)
            lost = dead_letters_going_nowhere(pipeline)
            if lost:  # a wiring mistake of the job's: its letters would vanish
                lost_labels = ", ".join(p.beamops_dead_letters_of for p in lost)
                raise RuntimeError(
                    f"the dead letters of {lost_labels} go nowhere: flatten them into the dead-letter sink"
                )
        except KeyboardInterrupt:  # Ctrl-C while the pipeline is built (waiting on a broker, say)
            return _interrupted(prog, started, stopped_by() or signal.SIGINT)
        except KafkaUnavailableError as exc:  # the brokers, not the arguments
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        except (OperatorParameterError, ValueError, OSError, RuntimeError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        log.info("running on %s", pipeline.options.get_all_options()["runner"])
        watch = _RestartWatch(flink) if flink is not None else None
        try:
            result = pipeline.run()
            if watch is not None:
                watch.start()
            result.wait_until_finish()
        except KeyboardInterrupt:  # how a live (--stop never) run on an in-process runner is stopped
            return _stopped(prog, started, stopped_by() or signal.SIGINT, flink)
        except Exception as exc:
            if stopped_by():  # Ctrl-C inside a DoFn: Beam's in-process runners hand it back as a RuntimeError
                return _stopped(prog, started, stopped_by(), flink)
            log.debug("pipeline failed", exc_info=True)  # the worker's traceback is in the runner's log
            took = time.monotonic() - started
            if "JobCancellationException" in str(exc):  # Beam's Flink runner reports a cancel as FAILED
                resume = flink.resume_hint("completed") if flink is not None else None
                print(
                    f"{prog}: the job was cancelled on the Flink cluster after {took:.1f} s; to go on from where "
                    f"it stopped, submit it again with {resume or '--savepoint_path=<its last checkpoint>'} "
                    "(README: Run on Flink)",
                    file=sys.stderr,
                )
                return 1
            print(f"{prog}: error: the pipeline failed after {took:.1f} s: {exc}", file=sys.stderr)
            if flink is not None and not bounded:  # a live job goes on from its last checkpoint, if it has one
                resume = flink.resume_hint("completed") or flink.checkpoint_on_disk()
                print(
                    f"{prog}: to go on from where it stopped, submit it again with "
                    f"{resume or '--savepoint_path=<its last checkpoint> (README: Run on Flink)'}",
                    file=sys.stderr,
                )
            return 1
        finally:
            if watch is not None:
                watch.stopped.set()
    log.info("done in %.1f s", time.monotonic() - started)
    if flink is not None and not bounded:  # a live job ends only when stopped, with a savepoint
        resume = flink.resume_hint("savepoint", wait_s=10.0)
        if resume:
            print(
                f"{prog}: the job was stopped with a savepoint; to go on, submit it again with {resume}",
                file=sys.stderr,
            )
    dead = dead_letter_counts(result, [part.full_label for part in pipeline.transforms_stack[0].parts])
    if dead:
        counts = ", ".join(f"{step} {n}" for step, n in sorted(dead.items()))
        total = sum(dead.values())
        log.warning("%d element%s went to dead letters (%s)", total, "" if total == 1 else "s", counts)
    return 0


def _savepoint_problem(path: str | None, rest_url: str) -> str | None:
    """What is wrong with a --savepoint_path on this machine's file system, for a Flink master on this
    machine (one elsewhere reads its own): a path that does not exist, or a directory without Flink's
    ``_metadata`` (a job's checkpoint directory instead of one of its ``chk-N``)."""
    from urllib.parse import urlparse

    if not path or urlparse(rest_url).hostname not in ("localhost", "127.0.0.1"):
        return None
    if "://" in path and not path.startswith("file://"):
        return None  # s3://, hdfs://...: not this machine's
    local = Path(path.removeprefix("file://").removeprefix("file:")).expanduser()
    if not local.exists():
        return f"--savepoint_path {path} does not exist"
    if local.is_dir() and not (local / "_metadata").exists():
        checkpoint = newest_checkpoint(local)
        newest = f"; its newest checkpoint is {checkpoint}" if checkpoint else ""
        return (
            f"--savepoint_path {path} is not a checkpoint or savepoint (it holds no _metadata): give a chk-N "
            f"directory or a savepoint-... directory{newest}"
        )
    return None


def newest_checkpoint(job_dir: Path) -> Path | None:
    """The newest complete ``chk-N`` (one with Flink's ``_metadata``) of a job's checkpoint directory, or None."""
    numbered = [d for d in job_dir.glob("chk-*") if d.name[4:].isdigit() and (d / "_metadata").exists()]
    return max(numbered, key=lambda d: int(d.name[4:]), default=None)


def _job_name_of(text: str) -> str:
    """The start of a Flink job's name: ``jobs.com_pipeline`` -> ``com-pipeline``, ``COM dpc`` -> ``com-dpc``."""
    return re.sub(r"[^a-z0-9]+", "-", text.rsplit(".", 1)[-1].lower()).strip("-") or "beamops"


@dataclass
class _FlinkJob:
    """The Flink job a run submits, found on the cluster by its name (flink_defaults gives every run one)."""

    rest_url: str
    name: str
    loopback: bool  # its SDK workers run in this process: it cannot go on without it
    known_id: str | None = None  # its id, once found

    @classmethod
    def of(cls, beam_args: list[str]) -> _FlinkJob:
        from beamops.services.flink_cluster import rest_base

        environment = (_given(beam_args, "environment_type") or "LOOPBACK").upper()
        master = _given(beam_args, "flink_master") or "localhost:8081"
        return cls(rest_base(master), _given(beam_args, "job_name") or "", environment == "LOOPBACK")

    def job_id(self) -> str | None:
        from beamops.services.flink_cluster import FlinkClusterError, job_named

        if self.known_id is None:
            try:
                job = job_named(self.rest_url, self.name)
            except (OSError, FlinkClusterError, KeyError, ValueError):
                return None
            self.known_id = job["jid"] if job else None
        return self.known_id

    def checkpoint_on_disk(self) -> str | None:
        """``--savepoint_path=<its newest chk-N>`` from the checkpoint directory of the ``beamops flink up``
        cluster it runs on (which the client sees, whether or not Flink still answers), if its id is known."""
        from beamops.services.flink_cluster import FlinkCluster

        url = urllib.parse.urlsplit(self.rest_url)
        if self.known_id is None or url.hostname not in ("localhost", "127.0.0.1") or url.port is None:
            return None
        checkpoint = newest_checkpoint(FlinkCluster(url.port).checkpoint_dir / self.known_id)
        return f"--savepoint_path={checkpoint}" if checkpoint else None

    def resume_hint(self, kind: str, wait_s: float = 0.0) -> str | None:
        """``--savepoint_path=<path>`` of the job's latest ``kind`` snapshot, if the cluster names one
        (within ``wait_s``: the JobManager's statistics name a snapshot a moment after it completed)."""
        from beamops.services.flink_cluster import FlinkClusterError, latest_snapshot

        job_id = self.job_id()
        deadline = time.monotonic() + wait_s
        while job_id is not None:
            try:
                path = latest_snapshot(self.rest_url, job_id, kind)
            except (OSError, FlinkClusterError, KeyError, ValueError):
                return None
            if path is not None:
                return f"--savepoint_path={path}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)
        return None

    def after_interrupt(self, prog: str) -> None:
        """Ctrl-C: a LOOPBACK job's workers were this process, so it is cancelled (else Flink restarts it
        for ever); any other job goes on by itself on the cluster, which is said, with how to stop it."""
        from beamops.services.flink_cluster import FlinkClusterError, cancel_job

        job_id = self.job_id()
        if job_id is None:
            return
        if not self.loopback:
            _tell(
                f"{prog}: the Flink job {self.name} ({job_id}) goes on running on the cluster; to stop it: "
                f"curl -X PATCH '{self.rest_url}/jobs/{job_id}?mode=cancel'"
            )
            return
        resume = self.resume_hint("completed")
        try:
            cancel_job(self.rest_url, job_id)
        except (OSError, FlinkClusterError) as exc:
            _tell(f"{prog}: could not cancel the Flink job {self.name} ({job_id}): {exc}")
            return
        again = f"; to go on from where it stopped, submit it again with {resume}" if resume else ""
        _tell(
            f"{prog}: cancelled the Flink job {self.name} ({job_id}): its workers ran in this process "
            f"(--environment_type=LOOPBACK){again}"
        )


class _RestartWatch(threading.Thread):
    """While a Flink job runs, says each time Flink restarts it and why: Flink restarts a failing job for ever
    (a message that sends it to a directory its workers cannot write, a broker gone), and the client would
    otherwise wait without a word."""

    def __init__(self, job: _FlinkJob, every_s: float = 5.0) -> None:
        super().__init__(name="flink-restart-watch", daemon=True)
        self.job, self.every_s = job, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        from beamops.services.flink_cluster import FlinkClusterError, job_restarts

        job_id, said = None, 0
        while not self.stopped.wait(self.every_s):
            job_id = job_id or self.job.job_id()
            if job_id is None:
                continue
            try:
                restarts, cause = job_restarts(self.job.rest_url, job_id)
            except (OSError, FlinkClusterError, KeyError, ValueError):
                continue  # Flink not answering is the job's own failure to report, when it comes
            if restarts > said:
                log.warning(
                    "Flink restarted the job %s (%s) after a failure, %d time%s so far: %s",
                    self.job.name, job_id, restarts, "" if restarts == 1 else "s", cause or "(no exception kept)",
                )  # fmt: skip
                said = restarts


def _tell(message: str) -> None:
    """``message`` on stderr. A reader that went away (``job | tee log``: Ctrl-C stops tee too) is no reason to
    leave undone what follows; later writes go nowhere instead of failing again."""
    try:
        print(message, file=sys.stderr, flush=True)
    except BrokenPipeError:
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, sys.stderr.fileno())
        os.close(nowhere)


def _stopped(prog: str, started: float, signum: int, flink: _FlinkJob | None) -> int:
    """The end of a run a signal stopped while it ran: a LOOPBACK Flink job is cancelled first (what is said
    next may go to a reader that is gone, ``| tee``), then it is said; a second signal meanwhile is held."""
    with _not_interrupted():
        if flink is not None:
            try:
                flink.after_interrupt(prog)
            except KeyboardInterrupt:  # asked twice more: left as it is
                _tell(f"{prog}: did not wait for the Flink job {flink.name} to be cancelled")
        return _interrupted(prog, started, signum)


def stopped_by_words(signum: int) -> str:
    """How a stop by ``signum`` is said: ``interrupted`` (Ctrl-C), ``stopped by SIGTERM``."""
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _interrupted(prog: str, started: float, signum: int) -> int:
    """The exit status of a run stopped by ``signum`` (SIGINT: Ctrl-C, or SIGTERM), said in one line."""
    log.debug("interrupted", exc_info=True)
    _tell(f"{prog}: {stopped_by_words(signum)} after {time.monotonic() - started:.1f} s")
    return 128 + signum


# What stops a run: Ctrl-C, and what `kill`, `timeout` or a service manager sends.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals() -> Iterator[Callable[[], int]]:
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt, a function says which of them came (0: none),
    and Beam's error logs, its job server's output and its threads' dying words are quiet once one did.
    A SIGTERM would otherwise end the process at once, and a Flink job whose workers were this process
    (LOOPBACK) would be restarted by Flink for ever.

    A KeyboardInterrupt raised inside a DoFn reaches the caller of an in-process runner as a
    RuntimeError ("KeyboardInterrupt [while running ...]"), after Beam logged its traceback as an
    error: only the signal tells an interrupt from a failure. Each signal is left alone unless it has its
    default handler (in the main thread), so an application's own handler, or a signal ignored in a
    background job, stays as it is.
    """
    came: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        came.append(signum)
        raise KeyboardInterrupt

    def quiet_after_interrupt(record: logging.LogRecord) -> bool:
        # Once stopped, the job's shutdown is what Beam reports: its SDK workers' "Channel closed prematurely",
        # the job server's JobCancellationException (as Java's stack trace, line by line, at INFO), each
        # with its traceback, 80-90 lines of them for a cancelled LOOPBACK job.
        if not came:
            return True
        if record.name == FLINK_JOB_SERVER_LOGGER:
            return False
        return not (record.name.startswith("apache_beam") or record.name == "root") or record.levelno < logging.ERROR

    def quiet_threads_after_interrupt(args: threading.ExceptHookArgs) -> None:
        if came:  # Beam's threads that read the job server's or the runner's streams, which the stop closed
            log.debug("after the stop, thread %s: %r", args.thread.name if args.thread else "?", args.exc_value)
        else:
            threads_hook(args)

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    main = threading.current_thread() is threading.main_thread()
    ours = [signum for signum in _STOP_SIGNALS if main and signal.getsignal(signum) is defaults[signum]]
    for signum in ours:
        signal.signal(signum, handle)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(quiet_after_interrupt)
    threads_hook = threading.excepthook
    if ours:  # only where the signals are ours to note: else nothing here can tell a stop from a failure
        threading.excepthook = quiet_threads_after_interrupt
    try:
        yield lambda: came[0] if came else 0
    finally:
        for signum in ours:  # first: a signal now must not reach `handle` after the run
            signal.signal(signum, defaults[signum])
        threading.excepthook = threads_hook
        for handler in handlers:
            handler.removeFilter(quiet_after_interrupt)


@contextmanager
def _not_interrupted() -> Iterator[None]:
    """Within (in the main thread): the first SIGINT or SIGTERM is held, so that a second Ctrl-C does not cut
    short the clean-up of the first; one more gets through (a JobManager that does not answer holds the
    clean-up up to 45 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        _tell("still cleaning up: once more to stop at once")

    before = {signum: signal.signal(signum, hold) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _flink_unreachable(master: str, timeout: float = 5.0) -> str | None:
    """Why the Flink master's REST API at ``master`` (host:port) does not answer, or None if it does
    (or is Beam's [auto] or [local], which the job server starts itself)."""
    from beamops.services.flink_cluster import FlinkClusterError, rest_base, rest_get

    if not master or master.startswith("["):
        return None
    url = rest_base(master)
    try:
        rest_get(f"{url}/overview", timeout)
    except (OSError, FlinkClusterError) as exc:
        return (
            f"cannot reach Flink at {url} within {timeout:g} s ({exc}); is it running (`beamops flink up`), "
            "and is --flink_master its host:port?"
        )
    return None


def _runner_key(runner: str | None) -> str:
    return (runner or DEFAULT_RUNNER).lower().removesuffix("runner")


def runs_here(pipeline: beam.Pipeline) -> bool:
    """Whether ``pipeline``'s workers run in this process (an in-process runner, or a portable runner's
    ``--environment_type=LOOPBACK`` workers, which Flink calls back), so they reach what this process does."""
    options = pipeline.options.get_all_options()
    runner = options["runner"]
    name = runner if runner is None or isinstance(runner, str) else type(runner).__name__
    return _runner_key(name) in IN_PROCESS_RUNNERS or str(options.get("environment_type")).upper() == "LOOPBACK"


def beam_option_names() -> set[str]:
    """The names of Beam's own pipeline options (``runner``, ``streaming``...), without a job's."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes, found = [PipelineOptions], set()
    while classes:
        for cls in classes.pop().__subclasses__():
            if cls not in found:
                found.add(cls)
                classes.append(cls)
    for cls in found:
        if cls.__module__.startswith("apache_beam."):
            cls._add_argparse_args(parser)
    return {option.lstrip("-") for action in parser._actions for option in action.option_strings}


def unknown_arguments(beam_args: list[str], forwarded: bool = False) -> list[str]:
    """The arguments neither the job nor any Beam pipeline option knows, each with a close match if any.

    In process, Beam only logs and drops them, so a mistyped ``--crop-radius 30`` would run uncropped.
    With ``forwarded`` (a portable runner such as Flink), Beam hands ``--name[=value]`` options it does
    not know to the runner's job server, whose Java options they may be (``--checkpointing_interval``):
    only what Beam cannot forward is unknown then, a bare word or a ``--dashed-name``.
    """
    parsers: list[argparse.ArgumentParser] = []
    # Beam's parser of every PipelineOptions subclass (the job's options among them), as Beam builds it;
    # its own "Discarding unparseable args" warning would only repeat the error this leads to.
    beam_options_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_options_log.level
    beam_options_log.setLevel(logging.ERROR)
    try:
        PipelineOptions(beam_args).get_all_options(add_extra_args_fn=parsers.append)
    finally:
        beam_options_log.setLevel(level)
    (parser,) = parsers
    _, unknown = parser.parse_known_args(beam_args)
    known = [option for action in parser._actions for option in action.option_strings]
    kept = []
    value_of_forwarded = False
    for arg in unknown:
        name = arg.split("=", 1)[0]
        may_be_a_value, value_of_forwarded = value_of_forwarded, False
        if forwarded and may_be_a_value and not arg.startswith("-"):
            continue
        if forwarded and name.startswith("--") and "-" not in name[2:]:
            value_of_forwarded = "=" not in arg
            continue
        kept.append(arg)
    return describe_unknown(kept, known)


def describe_unknown(unknown: Iterable[str], known: Sequence[str]) -> list[str]:
    """Each unknown argument as an error shows it: a secret's value masked, and a mistyped option followed by
    its value, then by the known option closest to it (``--crop-radius 30 (did you mean --crop_radius?)``)."""
    shown: list[list[str]] = []  # [the argument and its value, the hint]
    takes_value = after_secret = False
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if takes_value and not arg.startswith("-"):
            shown[-1][0] += f" {_masked(arg, after_secret)}"
            takes_value = after_secret = False
            continue
        match = closest_name(name, known) if arg.startswith("-") else None
        shown.append([_masked(arg, False), f" (did you mean {match}?)" if match else ""])
        takes_value = arg.startswith("-") and "=" not in arg
        after_secret = takes_value and is_secret(name)  # "--sasl_password hunter2": the next word is the secret
    return [text + hint for text, hint in shown]


def _masked(arg: str, is_a_secret: bool) -> str:
    """``arg`` as an error may show it: the value of any secret-looking ``key=`` in it is ``***``."""
    if is_a_secret and not arg.startswith("-"):
        return "***"
    parts = arg.split("=")
    for i, key in enumerate(parts[:-1]):
        if is_secret(key):
            return "=".join([*parts[: i + 1], "***"])
    return arg


def dead_letter_counts(result: Any, labels: Iterable[str] = ()) -> dict[str, int]:
    """Per operator step, how many elements the finished pipeline sent to dead letters (the errors counter);
    ``labels``: the pipeline's top-level ones (see :func:`step_label`)."""
    from apache_beam.metrics.metric import MetricsFilter

    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name("errors")
    try:
        counters = result.metrics().query(query)["counters"]
    except Exception:  # a runner without metrics: nothing to report, and no reason to fail a finished job
        log.debug("no metrics from the runner", exc_info=True)
        return {}
    counts: dict[str, int] = {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        if value:
            step = step_label(counter.key.step, labels)
            counts[step] = counts.get(step, 0) + int(value)
    return counts


# How Beam's pipeline context names an applied transform (apache_beam/pipeline.py, _unique_ref).
_TRANSFORM_ID = "ref_AppliedPTransform_"


def step_label(step: str, labels: Iterable[str] = ()) -> str:
    """The top-level label of a metric's step: of ``read_kafka_frames/Read/ParDo(...)`` in process, and of Beam's
    transform id from a portable runner such as Flink's, ``ref_AppliedPTransform_read_kafka_frames-Read-..._17``
    (the label with each run of characters other than letters, digits, '-' and '_' made '-', cut at 100 and a
    number added). ``labels``, the pipeline's top-level ones, tell where a label with '-' in it ends."""
    if not step.startswith(_TRANSFORM_ID):
        return step.split("/")[0]
    rest = step.removeprefix(_TRANSFORM_ID)
    for label in sorted(labels, key=len, reverse=True):
        normal = re.sub(r"[^a-zA-Z0-9-_]+", "-", label)
        if rest.startswith(normal) and re.match(r"(-|_\d+$|$)", rest[len(normal) :]):
            return label
    return re.split(r"-|_\d+$", rest)[0]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    job_server = logging.getLogger(FLINK_JOB_SERVER_LOGGER)
    if not any(isinstance(f, WithoutMetricsDump) for f in job_server.filters):
        job_server.addFilter(WithoutMetricsDump())
    beam_options = logging.getLogger("apache_beam.options.pipeline_options")
    if _not_discarded not in beam_options.filters:
        beam_options.addFilter(_not_discarded)


def _not_discarded(record: logging.LogRecord) -> bool:
    """Leaves out Beam's "Discarding unparseable args" and "Unparseable argument" warnings. :func:`run`
    refuses every argument nothing knows before the pipeline is built, so those left are options Beam
    forwards to a portable runner's job server (``--checkpointing_interval``): not discarded at all, and
    Beam's "did you mean" for them points at an unrelated option."""
    return not record.getMessage().startswith(("Discarding unparseable args", "Unparseable argument"))


# Beam logs its job server's output, line by line, to a logger named after the server's class.
FLINK_JOB_SERVER_LOGGER = "FlinkJarJobServer"


class WithoutMetricsDump(logging.Filter):
    """Drops the JSON of every metric that Beam's Flink runner logs when a job ends: about 3,300 lines
    for the COM job, one output line of the job server each (the metrics are in Flink's web UI and
    the run's own summary); and the job server's echo of every Flink setting it loads (about 45 lines
    a run, the cluster's config.yaml). Every other line of the job server, its errors among them, is kept."""

    _DUMP_STARTS = ("- Final accumulator values:", "- __metricscontainers : ")
    _CONFIG_ECHO = " INFO org.apache.flink.configuration.GlobalConfiguration - Loading configuration property: "

    def __init__(self) -> None:
        super().__init__()
        self._in_dump = False

    def filter(self, record: logging.LogRecord) -> bool:
        line = record.getMessage()
        if line.startswith("["):  # "[thread] LEVEL logger - message": the next log record of the job server
            self._in_dump = any(start in line for start in self._DUMP_STARTS)
            if self._CONFIG_ECHO in line:
                return False
        return not self._in_dump
