"""Pipeline definitions in YAML: the examples, FILE:LINE errors, building and running, the CLI."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

import beamops.pipeline
from beamops.cli import main as beamops_main
from beamops.pipeline import (
    PipelineDefinitionError,
    PipelineSpec,
    load_pipeline,
    parse_pipeline,
    validate_pipeline,
)
from jobs import com_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "pipelines").glob("*.yaml"))
COM_DPC = ROOT / "pipelines" / "com_dpc.yaml"
MARK = "# <- error"


def test_the_examples_are_shipped() -> None:
    assert {p.name for p in EXAMPLES} >= {"com_dpc.yaml", "virtual_images.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_pipeline(path) == []
    definition = load_pipeline(path)
    assert definition.instances and all(
        i.input is None or i.input[0] in definition.instances for i in definition.instances.values()
    )
    assert beamops_main(["pipeline", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{path}: pipeline " in out and "is valid" in out


def test_the_examples_use_the_operators_they_are_named_for() -> None:
    ops = {p.name: {i.operator.name for i in load_pipeline(p).instances.values()} for p in EXAMPLES}
    assert {"simulated_scan", "com_partial", "com_reduce", "write_com_map", "dpc_phase"} <= ops["com_dpc.yaml"]
    assert {"simulated_scan", "virtual_images"} <= ops["virtual_images.yaml"]


# --- errors: one per kind, each at the line marked "# <- error" ------------------------------------------------------

_SOURCE = """\
name: t
operators:
  source:
    operator: simulated_scan
    params: {scan_rows: 4, scan_cols: 4}
"""

ERROR_CASES = {
    "unknown operator": (
        _SOURCE + "  partial:\n    operator: com_partal  # <- error\n    input: source.frames\n",
        ["partial: unknown operator 'com_partal'", "did you mean 'com_partial'?", "known: ", "simulated_scan"],
    ),
    "unknown parameter": (
        _SOURCE + "  partial:\n    operator: com_partial\n    input: source.frames\n    params:\n"
        "      crop_radius: 3\n      cropradius: 4  # <- error\n",
        [
            "operator 'com_partial': unknown parameter(s) 'cropradius' (did you mean 'crop_radius'?)",
            "known parameters:",
        ],
    ),
    "invalid parameter value": (
        "name: t\noperators:\n  source:\n    operator: simulated_scan\n    params:\n      scan_cols: 4\n"
        "      scan_rows: -1  # <- error\n",
        ["operator 'simulated_scan': parameter 'scan_rows'", "greater than or equal to 1", "(got -1)"],
    ),
    "parameter of the wrong type": (
        _SOURCE + "  partial: {operator: com_partial, input: source.frames}\n  reduce:\n    operator: com_reduce\n"
        "    input: partial.com_partial\n    params:\n      emit_every: often  # <- error\n",
        ["operator 'com_reduce': parameter 'emit_every'", "'often'"],
    ),
    "unknown input instance": (
        _SOURCE + "  partial:\n    operator: com_partial\n    input: sauce.frames  # <- error\n",
        ["partial: input 'sauce.frames': no instance 'sauce'", "did you mean 'source'?"],
    ),
    "unknown input port": (
        _SOURCE + "  partial:\n    operator: com_partial\n    input: source.frame  # <- error\n",
        ["source (simulated_scan) has no output port 'frame'; its outputs: frames"],
    ),
    "dead letters connected by hand": (
        _SOURCE + "  dl:\n    operator: write_dead_letters\n    input: source.dead_letter  # <- error\n",
        ["dead letters are not connected by hand"],
    ),
    "port type mismatch": (
        _SOURCE + "  reduce:\n    operator: com_reduce\n    input: source.frames  # <- error\n",
        [
            "cannot connect source.frames (produces SparseFrameBatch [sparse_frames]) "
            "to reduce.in (expects ComPartial [com_partial])"
        ],
    ),
    "cycle": (
        _SOURCE + "  a:\n    operator: bin_frames\n    input: b.frames  # <- error\n"
        "  b:\n    operator: bin_frames\n    input: a.frames\n",
        ["cycle: a -> b -> a"],
    ),
    "self loop": (
        _SOURCE + "  a:\n    operator: bin_frames\n    input: a  # <- error\n",
        ["cycle: a -> a"],
    ),
    "source with an input": (
        _SOURCE + "  other:\n    operator: simulated_scan\n    input: source.frames  # <- error\n",
        ["other: operator 'simulated_scan' is a source (it has no input port); remove 'input'"],
    ),
    "operator without an input": (
        _SOURCE + "  partial:  # <- error\n    operator: com_partial\n",
        ["partial: operator 'com_partial' needs an input", "takes sparse_frames"],
    ),
    "Kafka operator without kafka section": (
        "name: t\noperators:\n  source:\n    operator: read_kafka_frames  # <- error\n    params: {topic: frames}\n",
        ["operator 'read_kafka_frames' talks to Kafka: add a top-level 'kafka:' section"],
    ),
    "Kafka config file missing": (
        "name: t\nkafka:\n  bootstrap_servers: 127.0.0.1:9092\n  config_file: /no/such/file.properties  # <- error\n"
        "operators:\n  source:\n    operator: read_kafka_frames\n    params: {topic: frames}\n",
        ["kafka.config_file:", "/no/such/file.properties"],
    ),
    "parameter error of the whole model": (
        "name: t\nkafka: {bootstrap_servers: 127.0.0.1:9092}\noperators:\n  source:\n"
        "    operator: read_kafka_frames\n    params:  # <- error\n      topic: frames\n      start: committed\n",
        ["start=committed needs a group_id"],
    ),
    "dead-letter sink of the wrong type": (
        _SOURCE + "dead_letters:\n  operator: write_image  # <- error\n",
        ["dead_letters: cannot connect the dead letters (produces DeadLetter [dead_letter]) to dead_letters.in"],
    ),
    "unknown key": (
        _SOURCE + "  partial:\n    operator: com_partial\n    imput: source.frames  # <- error\n",
        ["unknown key 'imput' in operators.partial; allowed: operator, params, input"],
    ),
    "missing key": (
        _SOURCE + "  partial:  # <- error\n    input: source.frames\n",
        ["missing key 'operator' in operators.partial"],
    ),
    "unknown top-level key": (
        _SOURCE + "operator: oops  # <- error\n",
        ["unknown key 'operator' in the top level; allowed: name, description, kafka, dead_letters, operators"],
    ),
    "duplicate key": (
        _SOURCE + "  source:  # <- error\n    operator: simulated_scan\n",
        ["duplicate key 'source' (first at line 3)"],
    ),
    "bad instance id": (
        _SOURCE + "  my.partial:  # <- error\n    operator: com_partial\n    input: source.frames\n",
        ["instance id 'my.partial'"],
    ),
    "two writers overwriting each other's files": (
        _SOURCE + "  partial: {operator: com_partial, input: source.frames}\n"
        "  cropped: {operator: com_partial, input: source.frames, params: {crop_radius: 3}}\n"
        "  reduce: {operator: com_reduce, input: partial.com_partial}\n"
        "  reduce_cropped: {operator: com_reduce, input: cropped.com_partial}\n"
        "  maps: {operator: write_com_map, input: reduce.com_map, params: {out_dir: out}}\n"
        "  maps_cropped:\n    operator: write_com_map\n    input: reduce_cropped.com_map\n"
        "    params: {out_dir: ./out/}  # <- error\n",
        [
            "maps_cropped: writes scan_<N>_com.npz and .png into ",
            "/out, as maps does: each would overwrite the other's files; give one of them another out_dir",
        ],
    ),
    "invalid YAML": (
        _SOURCE + "  partial: {operator: com_partial, input: [source.frames  # <- error\n",
        ["invalid YAML"],
    ),
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(PipelineDefinitionError) as info:
        load_pipeline(path, overrides)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_kind_of_error_names_its_file_and_line(case: str, tmp_path: Path) -> None:
    text, expected = ERROR_CASES[case]
    path = _write(tmp_path, text)
    (line,) = [n for n, row in enumerate(text.splitlines(), 1) if MARK in row]
    if case == "invalid YAML":  # the parser notices at the end of the file
        line = len(text.splitlines()) + 1
    errors = _errors(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:{line}: "), errors
    for fragment in expected:
        assert fragment in errors[0], (fragment, errors[0])


def test_all_errors_are_reported_in_file_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: t
        operators:
          source:
            operator: simulated_scan
            params: {scan_rows: 0, bogus: 1}
          partial:
            operator: com_partal
            input: source.frames
          reduce:
            operator: com_reduce
            input: source.frames
          phase:
            operator: dpc_phase
          sink:
            operator: read_kafka_frames
            params: {topic: t}
        """,
    )
    errors = _errors(path)
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (5, 5, 7, 11, 12, 15)], errors
    assert "parameter 'scan_rows'" in errors[0] or "parameter 'scan_rows'" in errors[1]
    assert any("unknown parameter(s) 'bogus'" in e for e in errors[:2])


def test_overrides_replace_parameters_and_their_errors_name_the_option(tmp_path: Path) -> None:
    path = _write(tmp_path, _SOURCE)
    definition = load_pipeline(path, ["source.scan_rows=7", "dead_letters.out_dir=" + str(tmp_path)])
    assert definition.instances["source"].params.scan_rows == 7
    assert definition.dead_letters.params.out_dir == str(tmp_path)
    errors = _errors(path, ("source.scan_rows=-3", "sauce.seed=1", "nonsense"))
    assert errors[0].startswith("--set source.scan_rows=-3: source: operator 'simulated_scan': parameter 'scan_rows'")
    assert errors[1].startswith("--set sauce.seed=1: no instance 'sauce'")
    assert errors[2].startswith("--set nonsense: expected --set ID.PARAM=VALUE")


def test_kafka_operators_get_the_client_of_the_kafka_section(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text("security.protocol=SASL_SSL\nsasl.password=hunter2\n")
    definition = parse_pipeline(
        f"""\
name: live
kafka:
  bootstrap_servers: broker:9092
  config_file: {props}
  settings: {{security.protocol: PLAINTEXT, enable.idempotence: true}}
dead_letters:
  operator: write_dead_letters_kafka
  params: {{topic: dead}}
operators:
  source: {{operator: read_kafka_frames, params: {{topic: frames, group_id: g, start: committed}}}}
  partial: {{operator: com_partial, input: source}}
  reduce: {{operator: com_reduce, input: partial}}
  out: {{operator: write_com_maps_kafka, input: reduce.com_map, params: {{topic: com}}}}
""",
        "live.yaml",
    )
    client = definition.kafka
    assert client is not None and client.bootstrap_servers == "broker:9092"
    assert dict(client.settings) == {
        "security.protocol": "PLAINTEXT",
        "sasl.password": "hunter2",
        "enable.idempotence": "true",
    }
    assert definition.instances["source"].transform(client).client is client
    assert definition.dead_letters.transform(client).client is client
    assert list(definition.instances) == ["source", "partial", "reduce", "out"]


_KAFKA_ONLY = """\
name: live
kafka:
  bootstrap_servers: broker:9092
  settings:
    {setting}
operators:
  source: {{operator: read_kafka_frames, params: {{topic: frames}}}}
  partial: {{operator: com_partial, input: source}}
  reduce: {{operator: com_reduce, input: partial}}
  out: {{operator: write_com_maps_kafka, input: reduce.com_map, params: {{topic: com}}}}
"""


@pytest.mark.parametrize("written", ["0123", "12:30:45", "1_000", "yes", "0x1F", "2024-01-31", "'quoted'", "5"])
def test_kafka_settings_reach_librdkafka_as_written(written: str) -> None:
    # YAML 1.1 reads these as other numbers, a bool or a date; librdkafka takes text.
    definition = parse_pipeline(_KAFKA_ONLY.format(setting=f"sasl.password: {written}"), "live.yaml")
    assert definition.kafka is not None
    assert definition.kafka.settings["sasl.password"] == written.strip("'")


def test_a_kafka_setting_librdkafka_refuses_is_an_error_at_its_line() -> None:
    with pytest.raises(PipelineDefinitionError) as info:
        parse_pipeline(_KAFKA_ONLY.format(setting="linger.ms: abc"), "live.yaml")
    (error,) = info.value.errors
    assert str(error).startswith("live.yaml:4: kafka.settings: Kafka client settings: Invalid value")


def test_an_invalid_secret_setting_is_reported_without_its_value() -> None:
    with pytest.raises(PipelineDefinitionError) as info:
        parse_pipeline(_KAFKA_ONLY.format(setting="sasl.password: [hunter2, x]"), "live.yaml")
    message = str(info.value)
    assert "sasl.password" in message and "hunter2" not in message


def test_the_documented_example_validates() -> None:
    doc = beamops.pipeline.__doc__ or ""
    example = textwrap.dedent(doc.split("::\n\n", 1)[1].split("\n\n", 1)[0])
    definition = parse_pipeline(example, "docstring")
    assert list(definition.instances) == ["source", "partial", "reduce", "maps"]
    assert definition.kafka is not None and definition.dead_letters.operator.name == "write_dead_letters"


def test_the_schema_is_a_pydantic_model() -> None:
    schema = PipelineSpec.model_json_schema()
    assert set(schema["required"]) == {"name", "operators"}
    spec = load_pipeline(COM_DPC).spec
    assert spec.operators["partial"].input == "source.frames"


# --- building and running ---------------------------------------------------------------------------------------------


def test_build_labels_instances_and_sends_every_dead_letter_to_one_sink(tmp_path: Path) -> None:
    definition = parse_pipeline(
        f"""\
name: failing
dead_letters: {{operator: write_dead_letters, params: {{out_dir: {tmp_path}}}}}
operators:
  source:
    operator: simulated_scan
    params: {{scan_rows: 4, scan_cols: 4, frame_rows: 64, frame_cols: 64, batch_size: 4, events_per_frame: 5}}
  by5: {{operator: bin_frames, input: source.frames, params: {{factor: 5}}}}
  by7: {{operator: bin_frames, input: source.frames, params: {{factor: 7}}}}
  ok: {{operator: bin_frames, input: source.frames, params: {{factor: 2}}}}
"""
    )
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        outputs = definition.build(pipeline)
        assert set(outputs) == {"source", "by5", "by7", "ok", "dead_letters"}
        labels = {t.full_label for t in pipeline.transforms_stack[0].parts}
        assert {"source", "by5", "by7", "ok", "dead_letters.all", "dead_letters"} <= labels
    files = sorted((tmp_path / "dead_letters").glob("*.json"))
    letters = [json.loads(p.read_text()) for p in files]
    assert len(letters) == 8  # 4 batches failed in each of by5 and by7, none in ok
    assert {letter["operator"] for letter in letters} == {"bin_frames"}
    # each names the instance that failed, in its file name too
    assert sorted(p.name.split("-")[0] for p in files) == ["by5"] * 4 + ["by7"] * 4
    assert sorted(letter["instance"] for letter in letters) == ["by5"] * 4 + ["by7"] * 4
    assert all("not divisible by bin factor" in letter["error"] for letter in letters)


def test_the_com_example_gives_the_map_of_the_com_job(tmp_path: Path) -> None:
    overrides = [
        "source.scan_rows=24",
        "source.scan_cols=20",
        "source.events_per_frame=300",
        "source.batch_size=97",
        "reduce.emit_every=100",
    ]
    from_yaml, from_job = tmp_path / "yaml", tmp_path / "job"
    sinks = [f"{i}.out_dir={from_yaml}" for i in ("maps", "phase_png", "dead_letters")]
    argv = ["pipeline", "run", str(COM_DPC)]
    for item in [*overrides, *sinks]:
        argv += ["--set", item]
    assert beamops_main(argv) == 0

    # the same parameters, every one of them, to the job
    definition = load_pipeline(COM_DPC, overrides)
    job_args = []
    for op in com_pipeline.OPERATORS:
        (inst,) = [i for i in definition.instances.values() if i.operator is op]
        for name, value in inst.params.model_dump().items():
            if value is not None and name != "out_dir":
                job_args += [f"--{name}", str(value)]
    assert com_pipeline.main([*job_args, "--out_dir", str(from_job)]) == 0

    ours = np.load(from_yaml / "scan_000001_com.npz")
    theirs = np.load(from_job / "scan_000001_com.npz")
    assert ours["com"].shape == (2, 24, 20) and bool(ours["complete"])
    assert np.array_equal(ours["com"], theirs["com"], equal_nan=True)
    assert (from_yaml / "phase_scan_000001.png").exists()
    assert not (from_yaml / "dead_letters").exists()


def test_the_dpc_examples_phase_is_that_of_its_simulated_shift_field(tmp_path: Path) -> None:
    """With interactEM's defaults (theta -9, reg 0.1: its camera's) the example's phase was speckle."""
    from beamops.simulate import ScanSimulation
    from transforms.dpc_phase import integrate_gradient

    argv = ["pipeline", "run", str(COM_DPC), "--set", "source.scan_rows=40", "--set", "source.scan_cols=48"]
    argv += [item for i in ("maps", "phase_png", "dead_letters") for item in ("--set", f"{i}.out_dir={tmp_path}")]
    assert beamops_main(argv) == 0
    phase = np.load(tmp_path / "phase_scan_000001.npy")
    source = load_pipeline(COM_DPC).instances["source"].params
    sx, sy = ScanSimulation(
        scan_shape=(40, 48),
        events_per_frame=source.events_per_frame,
        disc_radius=source.disc_radius,
        shift_amplitude=source.shift_amplitude,
    ).shift_field()
    truth = integrate_gradient(sy, sx)  # d/d row, d/d col: the known shifts, exactly integrated
    assert np.corrcoef(phase.ravel(), truth.ravel())[0, 1] > 0.99
    assert np.std(phase) == pytest.approx(np.std(truth), rel=0.05)


def test_a_run_says_what_it_wrote_and_first_which_earlier_files_it_may_replace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["pipeline", "run", str(COM_DPC), "--set", "source.scan_rows=4", "--set", "source.scan_cols=5"]
    argv += [item for i in ("maps", "phase_png", "dead_letters") for item in ("--set", f"{i}.out_dir={out}")]
    with caplog.at_level(logging.INFO, logger="beamops.pipeline"):
        assert beamops_main(argv) == 0
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        assert beamops_main(argv) == 0
        second = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert sorted(first) == sorted(
        f"{i}: wrote {out / name}"
        for i, name in [
            ("maps", "scan_000001_com.npz"),
            ("maps", "scan_000001_com.png"),
            ("phase_png", "phase_scan_000001.png"),
            ("phase_png", "phase_scan_000001.npy"),
        ]
    )
    warnings = sorted(message for level, message in second if level == logging.WARNING)
    assert warnings == [
        f"maps: {out} already holds files it writes (scan_000001_com.npz): this run replaces those of the scans it "
        "writes again; to keep them, give maps another out_dir",
        f"phase_png: {out} already holds files it writes (phase_scan_000001.png): this run replaces those of the "
        "scans it writes again; to keep them, give phase_png another out_dir",
    ]


def test_a_writer_that_does_not_replace_files_says_where_their_scans_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save = f"  save:\n    operator: write_hdf5_frames\n    input: source.frames\n    params: {{out_dir: {tmp_path}}}\n"
    text = _SOURCE + save
    (tmp_path / "scan_000001.h5").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="beamops.pipeline"):
        load_pipeline(_write(tmp_path, text)).build(beam.Pipeline())
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"save: {tmp_path} already holds files it writes (scan_000001.h5): a scan written again goes to dead letters "
        "(set save.overwrite: true to replace it); to keep them, give save another out_dir"
    )


# --- the CLI ----------------------------------------------------------------------------------------------------------


def test_cli_validate_lists_every_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _SOURCE + "  partial:\n    operator: com_partal\n  reduce:\n    operator: com_reduce\n")
    assert beamops_main(["pipeline", "validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"{path}:7: partial: unknown operator 'com_partal'")
    assert lines[1].startswith(f"{path}:8: reduce: operator 'com_reduce' needs an input")
    assert lines[2] == f"beamops: {path}: 2 errors"


def test_cli_run_of_an_invalid_pipeline_exits_2_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    maps = f"  maps: {{operator: write_com_map, input: source.frames, params: {{out_dir: {tmp_path}/o}}}}\n"
    path = _write(tmp_path, _SOURCE + maps)
    assert beamops_main(["pipeline", "run", str(path), "--runner=FnApiRunner"]) == 2
    assert "cannot connect source.frames" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_run_names_the_set_option_for_a_parameter_given_as_a_job_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["pipeline", "run", str(COM_DPC), "--scan_rows=32"]) == 2
    assert capsys.readouterr().err.strip() == (
        "beamops pipeline run: error: --scan_rows=32 is a parameter of source: in a pipeline run, give it as "
        "--set source.scan_rows=32"
    )


def test_cli_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert beamops_main(["pipeline", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read" in capsys.readouterr().err


def test_an_instance_with_errors_of_its_own_is_not_also_missing_for_its_users() -> None:
    text = """\
name: typo
operators:
  source: {operator: simulated_scan, param: {scan_rows: 8}}
  partial: {operator: com_partial, input: source.frames}
  reduce: {operator: com_reduce, input: partial}
  maps: {operator: write_com_map, input: reduce.com_map}
"""
    with pytest.raises(PipelineDefinitionError) as info:
        parse_pipeline(text, "typo.yaml")
    assert [str(e) for e in info.value.errors] == [
        "typo.yaml:3: unknown key 'param' in operators.source; allowed: operator, params, input"
    ]


_IMAGES = """\
name: images
operators:
  source: {{operator: simulated_scan, params: {{scan_rows: 8, scan_cols: 8}}}}
  images:
    operator: virtual_images
    input: source.frames
    params:
      annuli: {annuli}
      names: {names}
"""


@pytest.mark.parametrize(
    ("annuli", "names", "overrides"),
    [
        ("10:50", "no", ()),  # YAML 1.1: 650 (base 60) and False
        ("0:30,40:250", "bf,adf", ("images.annuli=10:50", "images.names=no")),
    ],
)
def test_operator_parameters_are_read_as_yaml_1_2_scalars(annuli: str, names: str, overrides: tuple[str, ...]) -> None:
    definition = parse_pipeline(_IMAGES.format(annuli=annuli, names=names), "images.yaml", list(overrides))
    params = definition.instances["images"].params
    assert (params.annuli, params.names) == ("10:50", "no")


@pytest.mark.parametrize("inst_id", ["on", "off", "yes", "no", "y", "n"])
def test_instance_ids_are_read_as_yaml_1_2_text(inst_id: str) -> None:
    # YAML 1.1 reads these keys as booleans: the id became True and the check crashed on it.
    text = _SOURCE + f"  {inst_id}:\n    operator: com_partial\n    input: source.frames\n"
    text += f"  reduce:\n    operator: com_reduce\n    input: {inst_id}.com_partial\n"
    definition = parse_pipeline(text, "ids.yaml", [f"{inst_id}.crop_radius=3"])
    assert definition.instances[inst_id].params.crop_radius == 3
    assert definition.instances["reduce"].input == (inst_id, "com_partial")


@pytest.mark.parametrize(
    ("written", "error"),
    [
        ("1", "instance id 1: a letter, then letters, digits, '_' or '-'"),
        ("'1'", "instance id '1': a letter, then letters, digits, '_' or '-'"),
        ("true", "instance id true is not text to YAML: quote it ('true')"),
        ("null", "instance id null is not text to YAML: quote it ('null')"),
    ],
)
def test_an_instance_id_that_is_not_a_name_is_one_error_at_its_line(written: str, error: str) -> None:
    # Before, a number or a boolean as an id crashed the check (TypeError in "did you mean").
    text = _SOURCE + f"  {written}:\n    operator: com_partial\n    input: source.frames\n"
    text += f"  reduce:\n    operator: com_reduce\n    input: {written.strip(chr(39))}.com_partial\n"
    with pytest.raises(PipelineDefinitionError) as info:
        parse_pipeline(text, "ids.yaml", ["other.crop_radius=3"])
    message = str(info.value)
    assert f"ids.yaml:6: {error}" in message
    assert "--set other.crop_radius=3: no instance 'other'; instances: " in message
    assert ".com_partial': no instance" not in message  # the id's own error says why


def test_writers_of_one_kind_may_share_a_directory_when_their_file_names_differ(tmp_path: Path) -> None:
    """Each into its own directory; and write_image names its files after the image, so images of different
    names (the upstreams' image_names) may share one."""
    text = (
        _SOURCE + "  partial: {operator: com_partial, input: source.frames}\n"
        "  cropped: {operator: com_partial, input: source.frames, params: {crop_radius: 3}}\n"
        "  reduce: {operator: com_reduce, input: partial.com_partial}\n"
        "  reduce_cropped: {operator: com_reduce, input: cropped.com_partial}\n"
        "  maps: {operator: write_com_map, input: reduce.com_map, params: {out_dir: out}}\n"
        "  maps_cropped: {operator: write_com_map, input: reduce_cropped.com_map, params: {out_dir: out/cropped}}\n"
        "  phase: {operator: dpc_phase, input: reduce.com_map}\n"
        "  magnitude: {operator: com_magnitude, input: reduce.com_map}\n"
        "  angle: {operator: com_magnitude, input: reduce.com_map, params: {quantity: angle}}\n"
        "  phase_png: {operator: write_image, input: phase.image, params: {out_dir: out}}\n"
        "  magnitude_png: {operator: write_image, input: magnitude.image, params: {out_dir: out}}\n"
        "  angle_png: {operator: write_image, input: angle.image, params: {out_dir: out}}\n"
    )
    assert list(load_pipeline(_write(tmp_path, text)).instances)[-1] == "angle_png"
    # A second phase image, into the same directory: refused.
    text += "  phase2: {operator: dpc_phase, input: reduce_cropped.com_map}\n"
    text += "  phase2_png: {operator: write_image, input: phase2.image, params: {out_dir: ./out}}\n"
    (error,) = _errors(_write(tmp_path, text))
    assert "phase2_png: writes <image name>_scan_<N>.png and .npy (phase) into " in error
    assert "as phase_png does" in error


def test_a_home_relative_output_directory_is_the_one_the_writers_write_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the writers read '~' alike: ~/out is $HOME/out for both (YAML does not expand it)."""
    from beamops.io.files import output_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    assert output_dir("~/maps") == tmp_path / "maps" and (tmp_path / "maps").is_dir()
    text = (
        _SOURCE + "  partial: {operator: com_partial, input: source.frames}\n"
        "  reduce: {operator: com_reduce, input: partial.com_partial}\n"
        f"  a: {{operator: write_com_map, input: reduce.com_map, params: {{out_dir: {tmp_path}/maps}}}}\n"
        "  b: {operator: write_com_map, input: reduce.com_map, params: {out_dir: ~/maps}}\n"
    )
    (error,) = _errors(_write(tmp_path, text))
    assert f"b: writes scan_<N>_com.npz and .png into {tmp_path / 'maps'}, as a does" in error


def test_a_bool_given_for_a_number_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _IMAGES.format(annuli="10:50", names="a"))
    (error,) = _errors(path, ("source.scan_rows=true",))
    assert "parameter 'scan_rows'" in error and "True is a bool, not a number" in error


@pytest.mark.parametrize(
    ("path", "reduction"), [(COM_DPC, "reduce"), (ROOT / "pipelines" / "virtual_images.yaml", "images")]
)
def test_a_simulated_scan_too_large_for_a_reduction_is_refused_before_any_frame_is_made(
    path: Path, reduction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before, the pipeline ran: building it listed 10 M batches, and every frame was made before the
    # reduction sent the scan to dead letters.
    huge = ["source.scan_rows=100000", "source.scan_cols=100000"]
    (error,) = _errors(path, tuple(huge))
    source_params = next(n for n, row in enumerate(path.read_text().splitlines(), 1) if row == "    params:")
    assert error.startswith(f"{path}:{source_params}: {reduction}: source's scan 1: scan_shape (100000, 100000)")
    assert "more than max_state_mb=4096; raise max_state_mb if the workers have the memory" in error
    assert beamops_main(["pipeline", "run", str(path), *(a for s in huge for a in ("--set", s))]) == 2
    assert "max_state_mb=4096" in capsys.readouterr().err
    assert load_pipeline(path, (*huge, f"{reduction}.max_state_mb=1000000"))  # the user's call


def test_a_file_source_the_pipeline_cannot_read_or_reduce_is_refused_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the run went on: a dead letter naming the file, and exit 0.
    from beamops.io.hdf5 import write_stempy_hdf5
    from beamops.testing import ScanSimulation

    monkeypatch.chdir(tmp_path)
    sim = ScanSimulation(scan_shape=(4, 6), frame_shape=(64, 64), disc_radius=8, shift_amplitude=2, scan_number=3)
    write_stempy_hdf5(tmp_path / "scan.h5", sim.batches(8))
    (tmp_path / "notes.h5").write_text("not HDF5")
    text = (
        "name: offline\noperators:\n  source: {{operator: read_hdf5_frames, params: {{path: {path}}}}}\n"
        "  partial: {{operator: com_partial, input: source.frames}}\n"
        "  reduce: {{operator: com_reduce, input: partial, params: {{max_state_mb: {mb}}}}}\n"
    )
    assert parse_pipeline(text.format(path="scan.h5", mb=4096), "offline.yaml").instances["source"]
    for path, mb, says in [
        ("missing.h5", 4096, f"source: missing.h5: no such file (looked for in {tmp_path})"),
        ("notes.h5", 4096, "source: notes.h5: not a stempy electron-counted HDF5 file"),
        ("scan.h5", 1e-6, "reduce: source's scan 3: scan_shape (4, 6)"),
    ]:
        with pytest.raises(PipelineDefinitionError) as info:
            parse_pipeline(text.format(path=path, mb=mb), "offline.yaml")
        (error,) = info.value.errors
        assert str(error).startswith(f"offline.yaml:3: {says}"), str(error)


def test_on_a_clusters_workers_a_relative_folder_is_named_before_the_run(caplog: pytest.LogCaptureFixture) -> None:
    """Each worker finds a relative folder in its own working directory: one it cannot write failed the job on the
    first element that went there, and Flink restarted it on the same input for ever."""
    definition = load_pipeline(COM_DPC, ["phase_png.out_dir=/shared/phase"])
    cluster = ["--runner=FlinkRunner", "--environment_type=EXTERNAL", "--environment_config=127.0.0.1:1"]
    caplog.set_level(logging.WARNING, logger="beamops.pipeline")
    definition.build(beam.Pipeline(options=PipelineOptions(cluster)))
    warned = sorted(r.getMessage() for r in caplog.records)
    assert warned == [
        f"{inst} writes to 'out/com_dpc', relative to each worker's working directory: give {inst}.out_dir an "
        "absolute folder the workers can write"
        for inst in ("dead_letters", "maps")
    ]
    caplog.clear()
    definition.build(beam.Pipeline())  # in process: the folders are checked here, not warned about
    assert not [r for r in caplog.records if "relative to each worker" in r.getMessage()]


def test_an_image_writer_whose_upstream_does_not_name_its_images_shares_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin's image operator declares no image_names: two of its writers into one directory overwrote each
    other's files without a word (the check skipped what it could not know)."""
    from transforms.dpc_phase import DpcPhaseParams

    monkeypatch.setattr(DpcPhaseParams, "image_names", property(lambda self: None))  # as a plugin's would
    text = (
        _SOURCE + "  partial: {operator: com_partial, input: source.frames}\n"
        "  reduce: {operator: com_reduce, input: partial.com_partial}\n"
        "  phase: {operator: dpc_phase, input: reduce.com_map}\n"
        "  magnitude: {operator: com_magnitude, input: reduce.com_map}\n"
        "  magnitude_png: {operator: write_image, input: magnitude.image, params: {out_dir: out}}\n"
        "  phase_png: {operator: write_image, input: phase.image, params: {out_dir: out}}\n"
    )
    (error,) = _errors(_write(tmp_path, text))
    assert "phase_png: writes <image name>_scan_<N>.png and .npy into " in error and "as magnitude_png does" in error
    load_pipeline(_write(tmp_path, text.replace("{out_dir: out}}\n", "{out_dir: out/magnitude}}\n", 1)))  # apart
