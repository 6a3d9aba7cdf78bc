"""The beamops command and jobs.com_pipeline, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beamops.cli import main as beamops_main
from beamops.io.kafka_config import KafkaClientConfig
from beamops.registry import discover
from beamops.runner import flink_defaults, unknown_arguments
from beamops.simulate import ScanSimulation
from beamops.spec import OperatorSpec
from beamops.testing import run_operator
from jobs import com_pipeline
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
        (["--crop-radius", "30"], "unrecognized arguments: --crop-radius (did you mean --crop_radius?) 30"),
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
    assert unknown_arguments(args, forwarded=True) == ["--crop-radius (did you mean --crop_radius?)", "30", "stray"]
    assert unknown_arguments(args)[:3] == args[:3]  # in process, nobody would read them
    assert unknown_arguments(["--runner=FlinkRunner", "--parallelism=2", "--streaming"]) == []


def test_a_secret_among_unknown_arguments_is_not_echoed() -> None:
    given = ["sasl.password=a", "--ssl.key.password=b", "--kafka-config=sasl.password=c", "--sasl_password", "d"]
    assert unknown_arguments(given) == [
        "sasl.password=***",
        "--ssl.key.password=***",
        "--kafka-config=sasl.password=*** (did you mean --kafka_config?)",
        "--sasl_password",
        "***",
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
    from jobs import simulate

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
    from jobs import simulate

    with pytest.raises(SystemExit) as exited:
        simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", *extra])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_the_simulate_job_refuses_a_kafka_setting_librdkafka_does_not_know(capsys) -> None:
    from jobs import simulate

    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--kafka_config", "foo.bar=1"]) == 2
    assert capsys.readouterr().err.strip().endswith('Kafka client settings: No such configuration property: "foo.bar"')


def test_a_secret_in_a_refused_kafka_setting_is_not_shown() -> None:
    client = KafkaClientConfig("127.0.0.1:9", {"sasl.password": "hunter2", "security.protocol": "hunter2"})
    with pytest.raises(ValueError, match=r'Invalid value "\*\*\*" for configuration property "security.protocol"'):
        client.check()


def test_an_unreachable_flink_master_is_one_line_within_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket
    import time

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
    assert err[-1].startswith(f"python -m jobs.com_pipeline: error: cannot reach Flink at {master} within 5 s")
    assert "beamops flink up" in err[-1]


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
