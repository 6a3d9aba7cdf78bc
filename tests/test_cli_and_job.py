"""The beamops command and jobs.com_pipeline, run as a user would."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import fake_flink_rest

from beamops.cli import main as beamops_main
from beamops.io.hdf5 import write_stempy_hdf5
from beamops.io.kafka_config import KafkaClientConfig
from beamops.registry import discover
from beamops.runner import FLINK_JOB_SERVER_LOGGER, flink_defaults, setup_logging, unknown_arguments
from beamops.simulate import ScanSimulation
from beamops.spec import OperatorSpec
from beamops.testing import run_operator
from jobs import com_pipeline, simulate
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce

ROOT = Path(__file__).resolve().parents[1]


def test_operators_list_names_every_operator(capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["operators", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "INPUTS", "OUTPUTS", "PARAMS", "TITLE"]
    for name in ("com_partial", "com_dense", "com_reduce", "simulated_scan", "write_com_map"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_operators_show_lists_parameters_with_types_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["operators", "show", "com_reduce"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert rows["emit_every"][1:3] == ["int", "10000"]
    assert rows["timeout_s"][1:3] == ["float", "300.0"]
    assert rows["replace_nans"][1:3] == ["bool", "False"]
    assert "in  in (com_partial)" in out and "out com_map (com_map)" in out


def test_operators_show_json_is_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["operators", "show", "com_partial", "--json"]) == 0
    spec = OperatorSpec.model_validate_json(capsys.readouterr().out)
    assert spec == discover()["com_partial"].spec().exported()


def test_unknown_operator_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["operators", "show", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert "no operator named 'no_such_op'" in err and "com_partial" in err
    assert beamops_main(["operators", "show", "com_partal"]) == 2
    assert "no operator named 'com_partal' (did you mean 'com_partial'?)" in capsys.readouterr().err


def test_export_writes_one_valid_operator_json_each(tmp_path: Path) -> None:
    assert beamops_main(["operators", "export", str(tmp_path)]) == 0
    written = sorted(p.parent.name for p in tmp_path.glob("*/operator.json"))
    assert written == sorted(discover())
    for path in tmp_path.glob("*/operator.json"):
        spec = OperatorSpec.load(path)
        assert spec == discover()[path.parent.name].spec().exported()
        assert json.loads(path.read_text())["id"] == str(spec.id)


def test_export_into_a_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    assert beamops_main(["operators", "export", str(taken)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"beamops: cannot write {taken}/") and "Not a directory" in line


@pytest.mark.parametrize("port", ["0", "65536", "-1", "x"])
def test_a_server_port_outside_1_to_65535_is_a_usage_error(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        beamops_main(["kafka", "up", "--port", port])
    assert exited.value.code == 2
    assert f"a port is a number from 1 to 65535, not '{port}'" in capsys.readouterr().err


def test_job_help_documents_every_operator_parameter() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "jobs.com_pipeline", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for op in com_pipeline.OPERATORS:
        for name in op.Params.model_fields:
            assert f"--{name}" in out, name
    assert "--runner" in out


def test_job_rejects_an_invalid_parameter_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert com_pipeline.main(["--crop_radius", "-1", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "com_partial" in err and "crop_radius" in err
    assert not list(tmp_path.iterdir())


SMALL_SCAN = ["--scan_rows", "6", "--scan_cols", "5", "--events_per_frame", "50"]


def test_job_writes_the_com_map_and_its_picture(tmp_path: Path) -> None:
    args = ["--scan_rows", "24", "--scan_cols", "20", "--events_per_frame", "300", "--batch_size", "97"]
    assert com_pipeline.main([*args, "--out_dir", str(tmp_path)]) == 0
    npz = np.load(tmp_path / "scan_000001_com.npz")
    assert npz["com"].shape == (2, 24, 20) and bool(npz["complete"])
    sim = ScanSimulation(scan_shape=(24, 20), events_per_frame=300)
    ex, ey = sim.expected_com()
    # 6 standard errors: the largest of 960 Gaussian deviations stays below ~4.
    assert np.abs(npz["com"][0] - ex).max() < 6 * sim.com_standard_error()
    assert np.abs(npz["com"][1] - ey).max() < 6 * sim.com_standard_error()
    png = (tmp_path / "scan_000001_com.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not (tmp_path / "dead_letters").exists()


def test_flink_runner_gets_its_defaults_and_the_cached_job_server_jar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jar = tmp_path / "beam-runners-flink-1.20-job-server-2.73.0.jar"
    jar.write_bytes(b"PK")
    monkeypatch.setenv("BEAMOPS_FLINK_JOB_SERVER_JAR", str(jar))
    args = flink_defaults(["--runner=FlinkRunner", "--environment_type=EXTERNAL"])
    assert f"--flink_job_server_jar={jar}" in args
    assert "--flink_version=1.20" in args and "--flink_master=localhost:8081" in args
    assert "--checkpointing_interval=10000" in args and "--streaming" in args
    assert "--finish_bundle_before_checkpointing" in args
    assert "--max_bundle_time_mills=100" in args  # latency: Flink's default holds a stage's results up to 1 s
    given = ["--runner=FlinkRunner", "--max_bundle_time_mills=1000"]
    assert [a for a in flink_defaults(given) if "max_bundle_time" in a] == [given[1]]
    # a name to find the job by on the cluster (to cancel it on Ctrl-C, to name its last checkpoint)
    (named,) = [a for a in flink_defaults(["--runner=FlinkRunner"], name="com-pipeline") if "--job_name" in a]
    assert re.fullmatch(r"--job_name=com-pipeline-\d{8}-\d{6}-[0-9a-f]{6}", named), named
    assert [a for a in flink_defaults(["--runner=FlinkRunner", "--job_name=mine"]) if "job_name" in a] == [
        "--job_name=mine"
    ]
    assert "--environment_type=EXTERNAL" in args and "--environment_type=LOOPBACK" not in args
    assert not any(a.startswith("--shutdown_sources_after_idle_ms") for a in args)
    # A bounded job ends: Beam keeps a checkpointing streaming job's sources up unless told otherwise.
    assert "--shutdown_sources_after_idle_ms=1000" in flink_defaults(["--runner=FlinkRunner"], bounded=True)
    given = ["--runner=FlinkRunner", "--shutdown_sources_after_idle_ms=5000"]
    assert [a for a in flink_defaults(given, bounded=True) if "shutdown" in a] == [given[1]]
    # A jar of the user's own still goes to the cluster, not to a Flink the job server would start itself.
    own = flink_defaults(["--runner=FlinkRunner", "--flink_job_server_jar=/opt/my.jar"])
    assert "--flink_master=localhost:8081" in own and "--flink_version=1.20" in own
    assert [a for a in own if a.startswith("--flink_job_server_jar")] == ["--flink_job_server_jar=/opt/my.jar"]
    there = flink_defaults(["--runner=FlinkRunner", "--flink_job_server_jar=/opt/my.jar", "--flink_master=jm:8081"])
    assert [a for a in there if a.startswith("--flink_master")] == ["--flink_master=jm:8081"]


def test_flink_runner_without_a_job_server_jar_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEAMOPS_FLINK_JOB_SERVER_JAR", str(tmp_path / "missing.jar"))
    assert com_pipeline.main(["--runner=FlinkRunner", "--out_dir", str(tmp_path)]) == 2
    assert "BEAMOPS_FLINK_JOB_SERVER_JAR" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--crop-radius", "30"], "unrecognized arguments: --crop-radius 30 (did you mean --crop_radius?)"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_an_argument_nobody_knows_is_an_error_not_a_default_run(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert com_pipeline.main([*args, "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Discarding unparseable args" not in err
    assert not list(tmp_path.iterdir())


def test_a_portable_runner_gets_the_options_beam_forwards_to_its_job_server() -> None:
    args = ["--checkpointing_interval=2000", "--state_backend", "rocksdb", "--crop-radius", "30", "stray"]
    assert unknown_arguments(args, forwarded=True) == ["--crop-radius 30 (did you mean --crop_radius?)", "stray"]
    # in process, nobody would read them
    assert unknown_arguments(args)[:2] == ["--checkpointing_interval=2000", "--state_backend rocksdb"]
    assert unknown_arguments(["--runner=FlinkRunner", "--parallelism=2", "--streaming"]) == []


def test_a_secret_among_unknown_arguments_is_not_echoed() -> None:
    given = ["sasl.password=a", "--ssl.key.password=b", "--kafka-config=sasl.password=c", "--sasl_password", "d"]
    assert unknown_arguments(given) == [
        "sasl.password=***",
        "--ssl.key.password=***",
        "--kafka-config=sasl.password=*** (did you mean --kafka_config?)",
        "--sasl_password ***",
    ]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--input_topic", "frames"], "--input_topic needs --bootstrap_servers"),
        (["--start", "earliest", "--group_id", "g"], "--group_id, --start need --bootstrap_servers"),
        (
            ["--bootstrap_servers", "127.0.0.1:9", "--input_topic", "frames", "--output_topic", "frames"],
            "--input_topic 'frames' cannot also be an output topic",
        ),
        (
            ["--bootstrap_servers", "127.0.0.1:9", "--input_topic", "t", "--out_dir", "o", "--dead_letter_topic", "t"],
            "--input_topic 't' cannot also be an output topic",
        ),
        (
            ["--bootstrap_servers", "127.0.0.1:9", "--input_topic", "t", "--out_dir", "o", "--scan_rows", "16"],
            "--scan_rows set the built-in simulated scan, which a Kafka read does not use",
        ),
    ],
)
def test_kafka_options_that_cannot_work_are_refused_before_running(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert com_pipeline.main(args) == 2
    assert says in capsys.readouterr().err


def test_a_replay_refuses_the_simulated_scans_options(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import replay

    with pytest.raises(SystemExit) as exited:
        replay.parse_args(["--input_topic", "t", "--scan_rows", "16", "--seed=3", "--runner=FnApiRunner"])
    assert exited.value.code == 2
    assert "--scan_rows, --seed=3: a replay reads Kafka" in capsys.readouterr().err


def test_an_output_directory_that_cannot_be_made_is_refused_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a directory")
    assert com_pipeline.main([*SMALL_SCAN, "--out_dir", str(blocker / "maps")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m jobs.com_pipeline: error: cannot make the output directory '{blocker}")
    assert not any("running on" in line for line in err)
    assert blocker.read_text() == "a file, not a directory"


def test_a_worker_that_cannot_make_the_output_directory_fails_the_job(tmp_path: Path) -> None:
    """On a cluster the workers' disks are not this machine's: there it is the job that fails, with the reason."""
    from transforms.write_com_map import write_com_map

    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a directory")
    sim = ScanSimulation(scan_shape=(4, 4), events_per_frame=20.0)
    maps = run_operator(lambda f: f | com_partial() | com_reduce(emit_every=0), sim.batches(16)).outputs
    with pytest.raises(Exception, match=f"cannot make the output directory '{blocker}"):
        run_operator(write_com_map(out_dir=str(blocker / "maps")), maps)


def test_ctrl_c_stops_a_job_with_one_line_and_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import apache_beam as beam

    def interrupted(self: beam.Pipeline) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(beam.Pipeline, "run", interrupted)
    assert com_pipeline.main([*SMALL_SCAN, "--out_dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("python -m jobs.com_pipeline: interrupted after")
    assert "Traceback" not in err


def test_a_job_cancelled_on_flink_says_so_and_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import apache_beam as beam

    def cancelled(self: beam.Pipeline) -> None:
        # what Beam's PortableRunner raises when the Flink job was cancelled (its web UI, REST API, `flink cancel`)
        raise RuntimeError(
            "Pipeline BeamApp-root-1207173445-bc0fdd11_314851d7 failed in state FAILED: "
            "org.apache.flink.runtime.client.JobCancellationException: Job was cancelled."
        )

    monkeypatch.setattr(beam.Pipeline, "run", cancelled)
    assert com_pipeline.main([*SMALL_SCAN, "--out_dir", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m jobs.com_pipeline: the job was cancelled on the Flink cluster after ")
    assert line.endswith("submit it again with --savepoint_path=<its last checkpoint> (README: Run on Flink)")


@pytest.mark.parametrize("known", [True, False], ids=["its-checkpoint-on-disk", "no-id-known"])
def test_a_live_flink_job_that_fails_says_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], known: bool
) -> None:
    """Flink stopped under a live job: the client said only "the pipeline failed ... Connection refused", and the
    job's last checkpoint, still on disk, had to be found by hand."""
    import apache_beam as beam

    from beamops import runner
    from beamops.services.flink_cluster import FlinkCluster

    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    job_dir = FlinkCluster(28081).checkpoint_dir / "aa11"
    for n in (3, 45, 46):  # chk-46 was being written: no _metadata yet
        (job_dir / f"chk-{n}").mkdir(parents=True)
        if n != 46:
            (job_dir / f"chk-{n}" / "_metadata").write_bytes(b"")

    def flink_went_away(self: beam.Pipeline) -> None:
        if known:
            submitted.known_id = "aa11"  # what the restart watch found while the job ran
        raise RuntimeError("Pipeline BeamApp-x failed in state FAILED: java.net.ConnectException: Connection refused")

    submitted = runner._FlinkJob("http://localhost:28081", "com-pipeline-x", loopback=True)
    monkeypatch.setattr(runner._FlinkJob, "of", classmethod(lambda cls, args: submitted))
    monkeypatch.setattr(runner, "_flink_unreachable", lambda master: None)
    monkeypatch.setattr(beam.Pipeline, "run", flink_went_away)
    args = ["--runner=FlinkRunner", "--flink_job_server_jar=/not/needed.jar"]
    status = runner.run({}, args, lambda pipeline, values: None, "job", bounded=False)
    assert status == 1
    failed, hint = capsys.readouterr().err.strip().splitlines()
    assert failed.startswith("job: error: the pipeline failed after ") and "ConnectException" in failed
    resume = f"--savepoint_path={job_dir / 'chk-45'}" if known else "--savepoint_path=<its last checkpoint> (README"
    assert hint.startswith(f"job: to go on from where it stopped, submit it again with {resume}")


@pytest.mark.parametrize(
    ("stop", "status", "said", "default"),
    [
        (signal.SIGINT, 130, "job: interrupted after", signal.default_int_handler),
        (signal.SIGTERM, 143, "job: stopped by SIGTERM after", signal.SIG_DFL),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_while_a_dofn_runs_stops_the_job_with_one_line(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    stop: int,
    status: int,
    said: str,
    default: Any,
) -> None:
    """Beam's in-process runner hands a KeyboardInterrupt raised in a DoFn back as a RuntimeError, after
    logging its traceback: before, that was "the pipeline failed", exit 1. `kill`, `timeout` and service
    managers send SIGTERM: before, it ended the process on the spot (a LOOPBACK Flink job, whose workers were
    the process, was then restarted by Flink for ever)."""
    import apache_beam as beam

    from beamops.runner import run

    def send_the_signal(element: int) -> int:
        os.kill(os.getpid(), stop)
        time.sleep(10)  # stopped long before
        return element

    def build(pipeline: beam.Pipeline, values: dict[str, object]) -> None:
        _ = pipeline | beam.Create([1]) | beam.Map(send_the_signal)

    with caplog.at_level(logging.ERROR):
        assert run({}, [], build, "job") == status
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(said)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("apache_beam")]
    assert signal.getsignal(stop) is default


def test_ctrl_c_through_tee_still_cancels_a_loopback_flink_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """`job | tee log`: Ctrl-C stops tee too, the first line said to stderr raised BrokenPipeError, and the
    cancel of the Flink job, which came after it, never ran (Flink restarted the job for ever)."""
    import apache_beam as beam

    from beamops import runner

    cancelled = []

    class Job:
        rest_url = "http://127.0.0.1:1"

        def after_interrupt(self, prog: str) -> None:
            runner._tell(f"{prog}: cancelled")  # fails on the closed pipe: the cancel was done by then
            cancelled.append(prog)

    def interrupted(self: beam.Pipeline) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner._FlinkJob, "of", classmethod(lambda cls, args: Job()))
    monkeypatch.setattr(runner, "_flink_unreachable", lambda master: None)
    monkeypatch.setattr(beam.Pipeline, "run", interrupted)
    read_end, write_end = os.pipe()
    os.close(read_end)  # tee is gone
    stderr = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        args = ["--runner=FlinkRunner", "--flink_job_server_jar=/not/needed.jar"]
        status = runner.run({}, args, lambda pipeline, values: None, "job")
    finally:
        stderr.close()
    assert (status, cancelled) == (130, ["job"])


def test_ctrl_c_while_the_pipeline_is_built_stops_the_job_with_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: a traceback (the build waits on a broker that does not answer, for instance)."""
    import apache_beam as beam

    from beamops.runner import run

    def build(pipeline: beam.Pipeline, values: dict[str, object]) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # interrupted long before

    assert run({}, [], build, "job") == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("job: interrupted after")


def test_cuda_on_a_worker_without_a_gpu_fails_the_job_instead_of_dead_lettering_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transforms import _cuda_kernels

    monkeypatch.setattr(_cuda_kernels, "cuda_available", lambda: False)
    assert com_pipeline.main([*SMALL_SCAN, "--device", "cuda", "--out_dir", str(tmp_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "device='cuda' was requested but numba sees no CUDA GPU" in last
    assert not (tmp_path / "dead_letters").exists() and not list(tmp_path.glob("*_com.npz"))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--shift_amplitude", "-30"], "disc_radius must be > 0 and shift_amplitude >= 0 px, got 20.0 and -30.0"),
        (["--disc_radius", "300"], "frame_shape (576, 576) is too small for disc_radius 300.0 + shift_amplitude 8.0"),
    ],
)
def test_the_simulate_job_refuses_a_disc_that_would_leave_the_frame(extra, says, capsys) -> None:
    # No broker listens on port 9: the scan is checked first.
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", *extra]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        *[(["--rate", r], "--rate must be 0 (as fast as possible) or a number of frames/s from 1 up") for r in
          ("nan", "inf", "1e-9", "-1")],
        (["--scan_rows", "0"], "--scan_rows must be >= 1, got 0"),
        (["--frames_per_position", "0"], "--frames_per_position must be >= 1, got 0"),
        (["--events_per_frame", "nan"], "--events_per_frame must be a finite number >= 0, got nan"),
    ],
)  # fmt: skip
def test_the_simulate_job_names_the_option_it_refuses(extra: list[str], says: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", *extra])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_the_simulator_progress_counts_delivered_frames_and_shows_the_queued_ones() -> None:
    from beamops.io.publish import PublishStats

    def stats(frames: int, delivered: int, elapsed_s: float) -> PublishStats:
        return PublishStats(
            frames=frames, batches=frames // 40, messages=frames // 40, bytes=frames * 100,
            delivered_frames=delivered, delivered_messages=delivered // 40, delivered_bytes=delivered * 100,
            failed_messages=0, queued_messages=(frames - delivered) // 40, elapsed_s=elapsed_s, throttled_s=0.0,
            late_frames=0,
        )  # fmt: skip

    out = io.StringIO()
    # Rates over the publisher's time (as the summary's), not the progress clock's (set-up before publishing).
    progress = simulate.Progress(160, stream=out, mode="bar", clock=iter(range(0, 1000, 10)).__next__)
    progress.update(stats(120, 0, 1.0))  # the broker is away: three messages queued, none acknowledged
    progress.update(stats(160, 40, 2.0))
    progress.close(stats(160, 160, 3.0))
    lines = out.getvalue().strip("\n").split("\r")[1:]
    assert [line.split("]")[1].split("  ETA")[0].strip() for line in lines] == [
        "0/160 frames delivered   0.0%  120 queued  0 frames/s  0.0 MB/s",
        "40/160 frames delivered  25.0%  120 queued  20 frames/s  0.0 MB/s",
        "160/160 frames delivered 100.0%  0 queued  53 frames/s  0.0 MB/s",
    ]
    assert lines[-1].startswith("[##############################]")


def test_the_simulate_job_refuses_a_kafka_setting_librdkafka_does_not_know(capsys) -> None:
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--kafka_config", "foo.bar=1"]) == 2
    assert capsys.readouterr().err.strip().endswith('Kafka client settings: No such configuration property: "foo.bar"')


def test_a_secret_in_a_refused_kafka_setting_is_not_shown() -> None:
    client = KafkaClientConfig("127.0.0.1:9", {"sasl.password": "hunter2", "security.protocol": "hunter2"})
    with pytest.raises(ValueError, match=r'Invalid value "\*\*\*" for configuration property "security.protocol"'):
        client.check()


def test_an_unreachable_flink_master_is_one_line_within_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{bound_not_listening.getsockname()[1]}"
        started = time.monotonic()
        status = com_pipeline.main(
            [*SMALL_SCAN, "--out_dir", str(tmp_path), "--runner=FlinkRunner", f"--flink_master={master}",
             "--flink_job_server_jar=/not/needed/before/flink/answers.jar"]
        )  # fmt: skip
    assert status == 1 and time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m jobs.com_pipeline: error: cannot reach Flink at http://{master} within 5 s")
    assert err[-1].endswith("is it running (`beamops flink up`), and is --flink_master its host:port?")
    assert "beamops flink up" in err[-1]


def test_a_flink_master_without_a_port_is_flinks_rest_port() -> None:
    """`--flink_master=localhost` was probed on port 80, where Beam's job server reaches Flink on 8081."""
    from beamops.services.flink_cluster import rest_base

    assert rest_base("localhost") == "http://localhost:8081"
    assert rest_base("10.0.0.5:18081") == "http://10.0.0.5:18081"
    assert rest_base("https://flink.example:443/") == "https://flink.example:443"
    assert rest_base("[auto]") == "http://[auto]"  # the job server starts a Flink of its own


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`beamops operators list | head -1`: the pipe closes before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run(
        [sys.executable, "-m", "beamops.cli", "operators", "list"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        check=False,
    )
    os.close(write_end)
    assert done.returncode == 141
    assert b"Traceback" not in done.stderr and b"BrokenPipeError" not in done.stderr


def test_help_after_the_pipeline_file_is_the_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        beamops_main(["pipeline", "run", str(ROOT / "pipelines" / "com_dpc.yaml"), "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: beamops pipeline run")


def test_a_rerun_into_the_same_out_dir_says_which_maps_it_replaces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobs.com_pipeline"):
        assert com_pipeline.main([*SMALL_SCAN, "--out_dir", str(tmp_path)]) == 0
        assert not caplog.records  # nothing there yet
        # a refused parameter is said alone: nothing is replaced, so no warning that it would be
        assert com_pipeline.main([*SMALL_SCAN, "--crop_to_x", "5", "--out_dir", str(tmp_path)]) == 2
        assert not caplog.records
        assert com_pipeline.main([*SMALL_SCAN, "--crop_radius", "5", "--out_dir", str(tmp_path)]) == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{tmp_path} already holds COM maps (scan_000001_com.npz): this run replaces")
    assert "give another --out_dir to keep them" in warning


def test_a_simulated_scan_too_large_for_the_reduce_is_refused_before_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Else every frame was made first (a mistyped --scan_rows 100000: hours, silently) and then dead-lettered."""
    args = ["--scan_rows", "300", "--scan_cols", "300", "--max_state_mb", "1", "--out_dir", str(tmp_path)]
    assert com_pipeline.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "python -m jobs.com_pipeline: error: --scan_rows 300 --scan_cols 300: scan 1: scan_shape (300, 300), "
        "frame_shape (576, 576) and 90,000 frames need 3 MB of state, more than max_state_mb=1; raise "
        "max_state_mb if the workers have the memory"
    )
    assert not list(tmp_path.iterdir())


def stempy_file(path: Path, scan_number: int) -> Path:
    """A 3x4 scan of 64x64 frames in stempy's layout, its scan number stored in metadata/beamops."""
    sim = ScanSimulation(
        scan_shape=(3, 4), frame_shape=(64, 64), disc_radius=8, shift_amplitude=2, scan_number=scan_number
    )
    write_stempy_hdf5(path, sim.batches(5))
    return path


@pytest.mark.parametrize(("extra", "expected"), [([], 7), (["--first_scan_number", "3", "--n_scans", "2"], 3)])
def test_a_recorded_scan_is_published_under_the_number_its_file_stores(
    tmp_path: Path, extra: list[str], expected: int
) -> None:
    path = stempy_file(tmp_path / "scan_7.h5", scan_number=7)
    args = simulate.parse_args(["--topic", "t", "--hdf5", str(path), *extra])
    scans = simulate._scans(args)
    assert scans.frames_each == 12
    first = simulate.first_scan_number(args, scans, newest=None)
    assert first == expected
    assert {b.header.scan_number for b in scans.batches_of(first)} == {expected}


def test_a_recorded_scan_whose_file_stores_no_number_is_numbered_after_the_topics_newest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stempy's own writer stores no scan number: as 1 every time, two such files would mix into one scan."""
    import h5py

    from beamops.io.hdf5 import BEAMOPS_METADATA

    path = stempy_file(tmp_path / "stempy.h5", scan_number=7)
    with h5py.File(path, "r+") as f:
        del f[BEAMOPS_METADATA]
    args = simulate.parse_args(["--topic", "t", "--hdf5", str(path)])
    scans = simulate._scans(args)
    assert scans.stored_number is None
    assert simulate.first_scan_number(args, scans, newest=None) == 1
    assert simulate.first_scan_number(args, scans, newest=6) == 7
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_simulated_scans_are_numbered_after_the_topics_newest_scan(caplog: pytest.LogCaptureFixture) -> None:
    """A second run onto the same topic is a new scan, as a detector's next acquisition: with the number of
    the first, a reduce would skip its frames as delivered twice and its map would be the first run's."""

    def first(extra: list[str], newest: int | None) -> int:
        args = simulate.parse_args(["--topic", "t", "--scan_rows", "2", "--scan_cols", "2", *extra])
        return simulate.first_scan_number(args, simulate._scans(args), newest)

    assert first([], None) == 1
    assert first([], 4) == 5
    assert first(["--first_scan_number", "5"], 4) == 5
    assert not caplog.records
    assert first(["--first_scan_number", "3"], 4) == 3  # as asked, but said
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        "topic 't' already holds scans up to 4: scan 3 published again is skipped by a reduce that reduced it "
        "(as frames delivered twice); give --first_scan_number 5 for a new scan"
    )


def test_simulated_scan_options_given_with_a_recorded_file_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Else --scan_rows 40 --scan_cols 24 would be dropped without a word and the file published as it is."""
    path = stempy_file(tmp_path / "scan.h5", scan_number=1)
    with pytest.raises(SystemExit) as exited:
        simulate.parse_args(["--topic", "t", "--hdf5", str(path), "--scan_rows", "40", "--scan_col=24"])
    assert exited.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line.endswith("error: --scan_rows, --scan_cols: --hdf5 publishes the file's scan; the simulated scan's "
                         "options do not apply")  # fmt: skip


FLINK_JAR = "--flink_job_server_jar=/opt/job-server.jar"  # so no jar need be cached


@pytest.fixture
def local_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state dir as `beamops flink up --port 18999` leaves it; returns its rendered conf dir."""
    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("FLINK_CONF_DIR", raising=False)
    conf = tmp_path / "flink-18999" / "conf"
    conf.mkdir(parents=True)
    (conf / "config.yaml").write_text("rest:\n  port: 18999\n")
    (tmp_path / "flink-18999" / "state.json").write_text("{}")
    return conf.resolve()


def test_a_local_cluster_s_profile_goes_to_the_job_server(local_cluster: Path) -> None:
    for master in ("127.0.0.1:18999", "localhost:18999", "http://127.0.0.1:18999"):
        args = flink_defaults(["--runner=FlinkRunner", f"--flink_master={master}", FLINK_JAR])
        assert f"--flink_conf_dir={local_cluster}" in args, master


def test_a_given_conf_dir_or_another_master_gets_none_added(
    local_cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = ["--runner=FlinkRunner", "--flink_master=127.0.0.1:18999", FLINK_JAR, "--flink_conf_dir=/etc/flink"]
    assert [a for a in flink_defaults(given) if a.startswith("--flink_conf_dir")] == ["--flink_conf_dir=/etc/flink"]
    for master in ("127.0.0.1:18998", "jobmanager:18999"):
        args = flink_defaults(["--runner=FlinkRunner", f"--flink_master={master}", FLINK_JAR])
        assert not [a for a in args if a.startswith("--flink_conf_dir")], master
    monkeypatch.setenv("FLINK_CONF_DIR", "/etc/flink")  # Beam's job server reads it itself
    args = flink_defaults(["--runner=FlinkRunner", "--flink_master=127.0.0.1:18999", FLINK_JAR])
    assert not [a for a in args if a.startswith("--flink_conf_dir")]


def test_the_flink_job_servers_metrics_dump_and_config_echo_are_left_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What Beam's Flink job server printed at the end of a job (shortened: about 3,300 lines of JSON)."""
    runner = "[flink-runner-job-invoker-0] INFO org.apache.beam.runners.flink.FlinkPipelineRunner - "
    config = "[flink-runner-job-invoker-0] INFO org.apache.flink.configuration.GlobalConfiguration - "
    printed = [
        f"{runner}Execution finished in 10822 msecs",
        f"{runner}Final accumulator values:",
        f"{runner}__metricscontainers : {{",
        '  "metrics": {',
        '    "attempted": [{',
        '      "urn": "beam:metric:pardo_execution_time:start_bundle_msecs:v1",',
        "    }]",
        "}",
        "[grpc-default-executor-0] INFO org.apache.beam.runners.jobsubmission.InMemoryJobService - Getting job metrics",
        "[flink-runner-job-invoker-1] ERROR org.apache.beam.runners.jobsubmission.JobInvocation - Error during job",
        "org.apache.flink.client.program.ProgramInvocationException: Job failed",
        "\tat org.apache.flink.runtime.jobmaster.JobResult.toJobExecutionResult(JobResult.java:146)",
        f"{config}Loading configuration property: taskmanager.numberOfTaskSlots, 2",  # one of about 45 a run
    ]
    setup_logging()
    job_server = logging.getLogger(FLINK_JOB_SERVER_LOGGER)
    with caplog.at_level(logging.INFO, logger=FLINK_JOB_SERVER_LOGGER):
        for line in printed:
            job_server.info(line)
    assert [r.getMessage() for r in caplog.records] == [printed[0], *printed[8:12]]


def test_options_forwarded_to_flinks_job_server_are_not_said_to_be_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Beam warns "Discarding unparseable args" for the options it hands to the job server (the job adds
    --checkpointing_interval itself); run() refuses any other unknown argument before that."""
    from apache_beam.options.pipeline_options import PipelineOptions

    setup_logging()
    with caplog.at_level(logging.WARNING, logger="apache_beam.options.pipeline_options"):
        options = PipelineOptions(flink_defaults(["--runner=FlinkRunner", "--flink_job_server_jar=/opt/js.jar"]))
        options.get_all_options()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("apache_beam")]


@pytest.mark.parametrize("runner", [[], ["--runner=DirectRunner", "--streaming"], ["--runner=BundleBasedDirectRunner"]])
def test_a_live_read_on_an_in_process_runner_is_refused_before_anything_runs(
    runner: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before, it ran: every event-time timer fired at once (apache/beam#35168), so scans were flushed
    # incomplete and split into several "final" maps, and the dead letters behind a Flatten were never
    # written while the offsets were committed. No broker is contacted (none listens on port 9).
    live = ["--bootstrap_servers", "127.0.0.1:9", "--input_topic", "frames", "--group_id", "g", "--stop", "never"]
    definition = tmp_path / "live.yaml"
    definition.write_text(
        "name: live\nkafka: {bootstrap_servers: '127.0.0.1:9'}\noperators:\n"
        "  source: {operator: read_kafka_frames, params: {topic: frames, group_id: g, stop: never}}\n"
        "  partial: {operator: com_partial, input: source.frames}\n"
    )
    started = time.monotonic()
    assert com_pipeline.main([*live, *runner]) == 2
    assert beamops_main(["pipeline", "run", str(definition), *runner]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in err] == ["python -m jobs.com_pipeline", "beamops pipeline run"]
    for line in err:
        assert line.endswith(
            "error: a live read (stop never) runs on Flink: Beam's in-process runner has no event-time watermark "
            "(apache/beam#35168), so each scan would be flushed incomplete at once and split into several final "
            "maps, and dead letters would never be written; start a cluster with `beamops flink up` and add "
            "--runner=FlinkRunner (and --flink_master=host:port unless it is localhost:8081; README: Run on Flink), "
            "or process what the topic holds with a stop of latest "
            "(--stop latest; in a pipeline file, stop: latest or --set <source id>.stop=latest)"
        )


def test_the_replay_offers_only_the_positions_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import replay

    with pytest.raises(SystemExit):
        replay.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.split("--start START ")[1].split(" --stop")[0]
    stop = text.split("--stop STOP ")[1].split(" --create_topics")[0]
    assert "committed" not in start and "never" not in stop and "timestamp:T" in start and "latest" in stop


def test_nothing_running_on_a_port_names_the_ports_where_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from beamops.services._local import running_elsewhere

    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    for name in ("flink-8081", "flink-18181", "flink-28181", "flink-old", "kafka-19092"):
        (tmp_path / name).mkdir()
    running = {18181, 28181}
    assert running_elsewhere("flink", 8081, running.__contains__) == (
        " (one runs on ports 18181, 28181: add --port 18181, --port 28181)"
    )
    assert running_elsewhere("flink", 8081, {18181}.__contains__) == " (one runs on port 18181: add --port 18181)"
    assert running_elsewhere("kafka", 9092, set().__contains__) == ""  # state left, nothing running


def test_a_savepoint_path_that_is_not_a_snapshot_is_refused_before_the_job_is_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, Flink said so 8 s after the submission, 126 log lines down."""
    job_dir = tmp_path / "checkpoints" / "5fd61a43"
    for n in (3, 12):
        (job_dir / f"chk-{n}").mkdir(parents=True)
        (job_dir / f"chk-{n}" / "_metadata").write_bytes(b"")
    flink = ["--runner=FlinkRunner", "--flink_master=127.0.0.1:9", "--flink_job_server_jar=/not/needed.jar"]
    for given, says in [
        (tmp_path / "nowhere", f"--savepoint_path file:{tmp_path / 'nowhere'} does not exist"),
        (job_dir, f"holds no _metadata): give a chk-N directory or a savepoint-... directory; its newest "
         f"checkpoint is {job_dir / 'chk-12'}"),
    ]:  # fmt: skip
        assert com_pipeline.main([*SMALL_SCAN, *flink, f"--savepoint_path=file:{given}"]) == 2
        assert says in capsys.readouterr().err


def test_servers_get_ports_a_client_cannot_take_by_connecting_to_itself() -> None:
    """A live job's consumer, reconnecting to a stopped broker's port in the ephemeral range, connected to
    itself on that port: `beamops kafka up` then said only "already in use by another process"."""
    from beamops.services._local import ephemeral_port_warning, ephemeral_ports, free_port, port_holders

    ephemeral = ephemeral_ports()
    if ephemeral.start > 10_000:  # else there is no room below it, and any free port is taken
        assert all(free_port() < ephemeral.start for _ in range(5))
    assert ephemeral_port_warning(ephemeral.start - 1) is None
    assert f"({ephemeral.start}-{ephemeral.stop - 1})" in str(ephemeral_port_warning(ephemeral.start))
    with socket.socket() as client:  # TCP's simultaneous open: a socket connected to its own port
        client.bind(("127.0.0.1", 0))
        port = client.getsockname()[1]
        client.connect(("127.0.0.1", port))
        assert port_holders(port).startswith(f" (held by pid {os.getpid()}, a client connected to itself: ")
    assert port_holders(port) == ""
    with socket.socket(socket.AF_INET6) as server:  # as a JVM holds 127.0.0.1: an IPv6 socket (/proc/net/tcp6)
        server.bind(("::", 0))
        server.listen()
        assert port_holders(server.getsockname()[1]).startswith(f" (held by pid {os.getpid()}: ")


def test_dead_letters_are_counted_by_operator_on_flink_as_in_process() -> None:
    """On Flink the summary said `(ref_AppliedPTransform_read_kafka_frames-Read-ParDo-_ReadPartitionFn-_17 1)`."""
    from beamops.runner import step_label

    assert step_label("read_kafka_frames/Read/ParDo(_ReadPartitionFn)") == "read_kafka_frames"
    assert step_label("ref_AppliedPTransform_read_kafka_frames-Read-ParDo-_ReadPartitionFn-_17") == "read_kafka_frames"
    assert step_label("ref_AppliedPTransform_com_partial_5") == "com_partial"
    # a pipeline definition's ids may hold '-': the pipeline's own labels say where one ends
    labels = ["source", "phase", "phase-png", "maps"]
    assert step_label("ref_AppliedPTransform_phase-png-ParDo-_WriteFn-_31", labels) == "phase-png"
    assert step_label("ref_AppliedPTransform_phase-Map-kernel-_29", labels) == "phase"
    assert step_label("ref_AppliedPTransform_phase_28", labels) == "phase"


def test_a_servers_uptime_is_said_for_people() -> None:
    from beamops.services._local import duration

    assert [duration(s) for s in (0.4, 59, 60, 1247, 3600, 11100, 86400 * 2 + 3600 * 4 + 5)] == [
        "0 s", "59 s", "1 min 0 s", "20 min 47 s", "1 h 00 min", "3 h 05 min", "2 d 4 h",
    ]  # fmt: skip


def test_once_stopped_beams_shutdown_noise_is_quiet_and_before_it_nothing_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled LOOPBACK job printed 80-90 lines after Ctrl-C: its threads' "Exception in thread ...", the job
    server's Java stack trace (at INFO) and Beam's ERROR records with tracebacks."""
    from beamops.runner import FLINK_JOB_SERVER_LOGGER, stop_signals

    said: list[str] = []  # what Python's hook would print, by thread
    monkeypatch.setattr(threading, "excepthook", lambda args: said.append(args.thread.name))

    def dying_thread() -> None:
        def fail() -> None:
            raise RuntimeError("Channel closed prematurely.")

        thread = threading.Thread(target=fail, name="read_grpc_client_inputs")
        thread.start()
        thread.join()

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        with stop_signals() as stopped_by:
            dying_thread()  # before a stop: said as Python says it
            assert said == ["read_grpc_client_inputs"]
            with pytest.raises(KeyboardInterrupt):
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # Ctrl-C
            assert stopped_by() == signal.SIGINT
            dying_thread()
            logging.getLogger().error("org.apache.flink.runtime.client.JobCancellationException: Job was cancelled.")
            logging.getLogger(FLINK_JOB_SERVER_LOGGER).info("\tat org.apache.flink.client.ClusterClient.run")
            logging.getLogger("apache_beam.runners.worker.sdk_worker").error("Error processing instruction")
            logging.getLogger("beamops.io.kafka").error("ours: still said")
        dying_thread()  # after the run: Python's hook again
    finally:
        logging.getLogger().removeHandler(handler)
    assert said == ["read_grpc_client_inputs"] * 2
    assert capsys.readouterr().err == "ours: still said\n"


def test_flink_down_names_the_jobs_it_stops_and_where_each_goes_on_from() -> None:
    """`beamops flink down` under a live job stopped it without a word; its last checkpoint had to be found by hand."""
    from beamops.services.flink_cluster import _jobs_stopped_with

    answers = {
        "/jobs/overview": {
            "jobs": [
                {"jid": "aa11", "name": "com-pipeline-1", "state": "RUNNING"},
                {"jid": "bb22", "name": "com-pipeline-2", "state": "RESTARTING"},
                {"jid": "cc33", "name": "old", "state": "FINISHED"},
            ]
        },
        "/jobs/aa11/checkpoints": {"latest": {"completed": {"external_path": "file:/cp/aa11/chk-45"}}},
        "/jobs/bb22/checkpoints": {"latest": {"completed": None}},
    }
    with fake_flink_rest(answers) as url:
        said = _jobs_stopped_with(url)
    assert said == [
        "job com-pipeline-1 (aa11, RUNNING) stops with the cluster; submit it again with "
        "--savepoint_path=file:/cp/aa11/chk-45 to go on from its last checkpoint",
        "job com-pipeline-2 (bb22, RESTARTING) stops with the cluster; it has no checkpoint to go on from",
    ]
    assert _jobs_stopped_with("http://127.0.0.1:1") == []  # no answer: nothing to say, and down goes on


def test_a_flink_job_that_keeps_restarting_is_said_once_per_restart_with_its_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An EXTERNAL job that failed on every attempt (its workers could not write the dead letters) restarted for
    ever while its client waited without a word."""
    from beamops import runner

    cause = "beamops.operator.WorkerEnvironmentError: cannot make the output directory 'out/dead_letters'"
    answers: dict[str, Any] = {
        "/jobs/overview": {"jobs": [{"jid": "aa11", "name": "com-pipeline-x", "state": "RESTARTING"}]},
        "/jobs/aa11/metrics?get=numRestarts": [{"id": "numRestarts", "value": "0"}],
        "/jobs/aa11/exceptions?maxExceptions=1": {"exceptionHistory": {"entries": [{"stacktrace": cause + "\n\tat"}]}},
    }
    caplog.set_level(logging.WARNING, logger="beamops.runner")
    with fake_flink_rest(answers) as url:
        watch = runner._RestartWatch(runner._FlinkJob(url, "com-pipeline-x", loopback=False), every_s=0.05)
        watch.start()
        time.sleep(0.3)  # no restart yet: nothing said
        answers["/jobs/aa11/metrics?get=numRestarts"] = [{"id": "numRestarts", "value": "2"}]
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # several more polls: still one line
        watch.stopped.set()
        watch.join(5)
    assert [r.getMessage() for r in caplog.records] == [
        f"Flink restarted the job com-pipeline-x (aa11) after a failure, 2 times so far: {cause}"
    ]


def test_dead_letters_to_a_relative_folder_on_a_clusters_workers_are_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docker/README's submit command had no --dead_letter_topic: the worker-pool image's workers could not write
    out/dead_letters, and Flink restarted the job for ever on the first message that did not decode."""
    import apache_beam as beam

    from beamops import runner

    def submitted(self: beam.Pipeline) -> None:
        raise KeyboardInterrupt  # instead of running it

    monkeypatch.setattr(runner, "_flink_unreachable", lambda master: None)
    monkeypatch.setattr(beam.Pipeline, "run", submitted)
    cluster = ["--runner=FlinkRunner", "--environment_type=EXTERNAL", "--environment_config=127.0.0.1:1"]
    cluster += ["--flink_job_server_jar=/not/needed.jar"]
    caplog.set_level(logging.WARNING, logger="jobs.com_pipeline")
    assert com_pipeline.main([*SMALL_SCAN, *cluster]) == 130
    assert [r.getMessage() for r in caplog.records if r.name == "jobs.com_pipeline"] == [
        "dead letters go to 'out/dead_letters', relative to each worker's working directory: give "
        "--dead_letter_topic, or an absolute --out_dir the workers can write"
    ]
    caplog.clear()
    assert com_pipeline.main([*SMALL_SCAN, *cluster, "--out_dir", "/shared/maps"]) == 130
    assert not [r for r in caplog.records if r.name == "jobs.com_pipeline"]


def test_down_where_nothing_ever_ran_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`beamops kafka down --port N` (or flink) with nothing there left an empty run/<service>-N/.lock behind."""
    from beamops.services import flink_cluster, kafka_broker

    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    assert kafka_broker.down(19999) == 0
    assert flink_cluster.down(19998) == 0
    assert kafka_broker.status(19999) == flink_cluster.status(19998) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_local_cluster_named_without_a_port_gives_its_checkpoint_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--flink_master=localhost` is the cluster on 8081: without its profile (--flink_conf_dir) a cancel deletes the
    checkpoint the client just named to resume from."""
    from beamops.services.flink_cluster import FlinkCluster, local_conf_dir

    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    cluster = FlinkCluster(8081)  # as `beamops flink up` leaves it: a state file and the rendered profile
    cluster.conf_dir.mkdir(parents=True)
    (cluster.conf_dir / "config.yaml").write_text("rest.port: 8081\n")
    cluster.state_path.write_text("{}")
    for master in ("localhost", "localhost:8081", "http://127.0.0.1:8081/"):
        assert local_conf_dir(master) == cluster.conf_dir, master
    assert local_conf_dir("localhost:8082") is None and local_conf_dir("[auto]") is None


def test_during_clean_up_one_more_signal_is_held_and_the_next_gets_through(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C twice in a row cut the cancel of a LOOPBACK Flink job short; three times must still stop the client."""
    from beamops.runner import _not_interrupted

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _not_interrupted():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # held: the clean-up goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert capsys.readouterr().err == "still cleaning up: once more to stop at once\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
