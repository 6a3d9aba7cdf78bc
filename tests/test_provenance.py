"""Provenance: every written result says which operators, with which parameters, made it."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image as PngFile

from beamops import ComPartial, OperatorDefinitionError, SparseFrameBatch, cli, operator
from beamops.io.hdf5 import inspect_stempy_hdf5
from beamops.io.kafka import live_reads, read_kafka_frames
from beamops.io.kafka_config import KafkaClientConfig
from beamops.provenance import PROVENANCE_KEY, Provenance, Step, read_provenance
from beamops.testing import ScanSimulation, run_operator
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.simulated_scan import simulated_scan
from transforms.virtual_images import virtual_images
from transforms.write_com_map import map_provenances, write_com_map
from transforms.write_hdf5_frames import write_hdf5_frames
from transforms.write_image import write_image


def test_com_map_files_name_every_operator_and_parameter_that_made_them(tmp_path: Path) -> None:
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        frames = p | "Scan" >> simulated_scan(scan_rows=4, scan_cols=5, events_per_frame=50, seed=7)
        maps = frames | com_partial(crop_radius=30.0) | "Reduce" >> com_reduce(replace_nans=True)
        _ = maps | write_com_map(out_dir=str(tmp_path))

    with np.load(tmp_path / "scan_000001_com.npz") as npz:
        provenance = Provenance.from_json(str(npz["provenance"]))
    assert [(s.instance, s.operator) for s in provenance.steps] == [
        ("Scan", "simulated_scan"),
        ("com_partial", "com_partial"),
        ("Reduce", "com_reduce"),
    ]
    assert provenance.traced
    assert provenance.params_of("simulated_scan")["seed"] == 7
    assert provenance.params_of("simulated_scan")["scan_cols"] == 5
    assert provenance.params_of("com_partial")["crop_radius"] == 30.0
    assert provenance.params_of("com_reduce")["replace_nans"] is True
    # the picture holds the same text, so a PNG mailed on its own still says how it was made
    with PngFile.open(tmp_path / "scan_000001_com.png") as png:
        assert Provenance.from_json(png.text[PROVENANCE_KEY]) == provenance
    assert read_provenance(tmp_path / "scan_000001_com.png") == provenance


def test_beamops_provenance_prints_what_made_each_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = Provenance((Step("Scan", "simulated_scan", {"seed": 3}), Step("Keep"), Step("c", "com_partial", {})))
    np.savez(tmp_path / "scan_000001_com.npz", provenance=made.to_json())
    np.savez(tmp_path / "other.npz", data=np.zeros(2))
    np.save(tmp_path / "bf_scan_000001.npy", np.zeros(2))
    assert cli.main(["provenance", str(tmp_path / "scan_000001_com.npz")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  1. Scan (simulated_scan): seed=3",
        "  2. Keep (Beam transform)",
        "  3. c (com_partial)",
    ]
    files = [str(tmp_path / name) for name in ("other.npz", "bf_scan_000001.npy", "scan_000001_com.npz")]
    assert cli.main(["provenance", "--json", files[2], files[2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [files[2], files[2]]
    assert Provenance.from_json(json.dumps(lines[0]["provenance"])) == made
    assert cli.main(["provenance", *files]) == 2  # each file is still reported
    out, err = capsys.readouterr()
    assert "other.npz: holds no beamops provenance" in err
    assert "bf_scan_000001.npy: an .npy holds only its array; the .png written beside it" in err
    assert out.startswith(f"{files[2]}: made by beamops")  # no blank line for the files that failed


def test_plain_beam_transforms_between_operators_are_named_by_their_label() -> None:
    sim = ScanSimulation(scan_shape=(2, 2))
    p = beam.Pipeline()
    source = p | "Inputs" >> beam.Create(list(sim.batches(4)))
    kept = source | "KeepAll" >> beam.Filter(lambda b: True)
    partials = (kept | com_partial()).com_partial | "Again" >> beam.Map(lambda x: x)
    provenance = Provenance.of(partials)
    assert [s.to_dict().get("transform", s.operator) for s in provenance.steps] == [
        "Inputs",  # the Create, not its inner steps (Inputs/Map(decode)...)
        "KeepAll",
        "com_partial",
        "Again",
    ]
    assert provenance.traced  # a Create is a source
    merged = (source, kept) | beam.Flatten()
    assert Provenance.of(merged).steps == (Step("Flatten"),)
    assert not Provenance.of(merged).traced  # several inputs: not followed


def test_an_operator_inside_a_composite_is_found_and_side_inputs_end_the_trace() -> None:
    class Job(beam.PTransform):
        def expand(self, root: beam.pvalue.PBegin) -> beam.PCollection:
            frames = root | "Scan" >> simulated_scan(scan_rows=2, scan_cols=3, seed=5)
            return frames.frames | "KeepAll" >> beam.Filter(lambda b: True)

    p = beam.Pipeline()
    kept = p | "Job" >> Job()
    provenance = Provenance.of(kept)
    assert [s.to_dict().get("transform", s.instance) for s in provenance.steps] == ["Scan", "Job"]
    assert provenance.params_of("simulated_scan")["seed"] == 5 and provenance.traced
    side = p | "Side" >> beam.Create([1])
    with_side = kept | "WithSide" >> beam.Map(lambda b, n: b, beam.pvalue.AsSingleton(side))
    followed = Provenance.of(with_side)
    assert [s.instance for s in followed.steps] == ["Scan", "Job", "WithSide"]
    assert not followed.traced  # what came through the side input is not in it


def test_provenance_round_trips_through_json_and_names_a_missing_operator() -> None:
    provenance = Provenance((Step("Inputs"), Step("c", "com_partial", {"crop_radius": 3.0})), traced=True)
    text = provenance.to_json()
    assert Provenance.from_json(text) == provenance
    assert Provenance.from_json(text.encode()).to_json() == text  # the same bytes again
    with pytest.raises(KeyError, match="no step ran operator 'com_reduce'; steps: \\['Inputs', 'c'\\]"):
        provenance.params_of("com_reduce")


def test_kafka_client_settings_never_reach_the_provenance() -> None:
    # The read's parameters (topic, range, group) do; the client's (brokers, credentials) are not parameters.
    client = KafkaClientConfig("broker.example:9093", {"sasl.password": "hunter2", "sasl.username": "frank.m"})
    p = beam.Pipeline()
    read = p | read_kafka_frames(client=client, topic="frames", start="offset:5", stop="offset:9")
    text = Provenance.of(read.frames).to_json()
    assert json.loads(text)["steps"][0]["params"]["start"] == "offset:5"
    assert "hunter2" not in text and "frank.m" not in text and "broker.example" not in text


@operator
def count_with_provenance(partial: ComPartial, *, provenance: Provenance) -> str:
    """The steps that made the batch, as the kernel sees them."""
    return ",".join(s.instance for s in provenance.steps)


def test_a_kernel_asking_for_provenance_gets_what_made_its_input() -> None:
    sim = ScanSimulation(scan_shape=(2, 2))
    got = run_operator(lambda f: f | "Partial" >> com_partial() | "Count" >> count_with_provenance(), sim.batches(4))
    # run_operator's Create is the source; a kernel does not see its own step
    assert got.outputs == ["Inputs,Partial"]
    # outside Beam there is no pipeline to trace: the kernel gets an untraced, empty provenance
    partial = com_partial().process(sim.batch(0, 4))
    assert count_with_provenance().process(partial) == ""
    assert count_with_provenance().process(partial, Provenance((Step("X"),))) == "X"


def test_provenance_must_be_keyword_only() -> None:
    with pytest.raises(OperatorDefinitionError, match="keyword-only provenance: Provenance"):

        @operator
        def positional(batch: SparseFrameBatch, params: object, provenance: Provenance) -> str:
            return ""


def test_hdf5_files_and_image_pictures_hold_the_provenance(tmp_path: Path) -> None:
    sim = ScanSimulation(scan_shape=(3, 3), frame_shape=(64, 64), disc_radius=8, shift_amplitude=2, scan_number=4)
    run_operator(lambda f: f | "Save" >> write_hdf5_frames(out_dir=str(tmp_path)), sim.batches(5))
    saved = Provenance.from_json(inspect_stempy_hdf5(tmp_path / "scan_000004.h5").provenance or "")
    assert [s.to_dict().get("transform") for s in saved.steps] == ["Inputs"]

    def chain(frames: beam.PCollection) -> beam.PCollection:
        images = frames | "Images" >> virtual_images(annuli="0:4,10:20", emit_every=0)
        return images.images | write_image(out_dir=str(tmp_path))

    run_operator(chain, sim.batches(5))
    with PngFile.open(tmp_path / "bf_scan_000004.png") as png:
        drawn = Provenance.from_json(png.text[PROVENANCE_KEY])
    assert drawn.params_of("virtual_images")["annuli"] == "0:4,10:20"
    assert [s.instance for s in drawn.steps] == ["Inputs", "Images"]


def test_the_newest_maps_of_a_folder_say_what_made_them_and_other_files_are_skipped(tmp_path: Path) -> None:
    made = Provenance((Step("read", "read_kafka_frames", {"group_id": "live", "topic": "frames"}),))
    np.savez(tmp_path / "scan_000001_com.npz", com=np.zeros((2, 1, 1)), provenance=made.to_json())
    np.savez(tmp_path / "scan_000002_com.npz", com=np.zeros((2, 1, 1)))  # written before provenance existed
    (tmp_path / "scan_000003_com.npz").write_bytes(b"not a zip")
    (tmp_path / "notes.npz").write_bytes(b"")  # not a map
    assert map_provenances(tmp_path) == [made]


@pytest.mark.parametrize(
    ("params", "live"),
    [
        ({"group_id": "live", "topic": "frames", "stop": "latest"}, {"consumer group 'live'"}),
        ({"group_id": None, "topic": "frames", "stop": "never"}, {"an unbounded read of 'frames'"}),
        ({"group_id": None, "topic": "frames", "stop": "offset:9"}, set()),  # a replay's
        (["not", "a", "dict"], set()),  # JSON from elsewhere: not judged
    ],
)
def test_a_live_read_is_one_with_a_group_or_without_end(params: object, live: set[str]) -> None:
    assert live_reads(Provenance((Step("r", "read_kafka_frames", params),))) == live  # type: ignore[arg-type]
    assert live_reads(Provenance((Step("c", "com_partial", {"group_id": "x"}),))) == set()
