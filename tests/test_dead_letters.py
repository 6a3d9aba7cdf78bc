"""Dead letters: the operator instance that made them, a source message's key and headers, and how
the file and Kafka sinks write them (no broker needed)."""

from __future__ import annotations

import base64
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
from apache_beam import coders
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from pydantic import Field

from beamops import DeadLetter, OperatorParams, operator
from beamops.frames import SparseFrameBatch
from beamops.io import kafka
from beamops.io.kafka import ReadFromKafkaParams, dead_letter_record
from beamops.io.kafka_config import KafkaClientConfig
from beamops.operator import OperatorMetrics
from beamops.testing import ScanSimulation, run_operator
from transforms.write_dead_letters import write_dead_letters

SIM = ScanSimulation(
    scan_shape=(4, 4), frame_shape=(32, 32), events_per_frame=4, disc_radius=6, shift_amplitude=2, seed=3
)
BATCHES = list(SIM.batches(5))  # 16 frames: 5 + 5 + 5 + 1, origins batch 0..3

BEAMOPS_HEADERS = [
    "beamops-operator",
    "beamops-instance",
    "beamops-error-type",
    "beamops-error",
    "beamops-payload-format",
    "beamops-origin",
]


def source_letter(**fields: Any) -> DeadLetter:
    """A dead letter as read_kafka_frames makes one, with ``fields`` replaced."""
    values: dict[str, Any] = {
        "operator": "read_kafka_frames",
        "error_type": "FrameDecodeError",
        "error": "not an Arrow IPC stream",
        "payload": b"\x00junk",
        "payload_format": "raw",
        "origin": {"topic": "frames", "partition": 2, "offset": 41, "timestamp_ms": 1_700_000_000_000},
        "instance": "live",
        "key": b"scan-7",
        "headers": (("trace-id", b"abc"), ("blob", b"\xff\x00"), ("nothing", None)),
    }
    return DeadLetter(**{**values, **fields})


# --- the Kafka source keeps the message's key and headers ------------------------------------------------


class _Message:
    """A consumed message, as confluent-kafka's Consumer.poll returns it."""

    def __init__(self, value: bytes, key: bytes | None, headers: list[tuple[str, bytes | None]] | None) -> None:
        self._value, self._key, self._headers = value, key, headers

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self._headers

    def offset(self) -> int:
        return 41

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000  # TIMESTAMP_CREATE_TIME


def decode_to_letter(message: _Message) -> DeadLetter:
    reader = kafka._ReadPartitionFn(
        "read_kafka_frames", KafkaClientConfig("127.0.0.1:1"), ReadFromKafkaParams(topic="frames")
    )
    reader.setup()
    read = kafka.PartitionRead("frames", 2, 0, 100)
    (out,) = reader._decode(message, read, ManualWatermarkEstimator(None), kafka._ReadState())
    assert out.tag == "dead_letter"
    return out.value.value  # TaggedOutput(TimestampedValue(letter))


def test_a_message_that_does_not_decode_keeps_its_key_and_headers_outside_the_origin() -> None:
    headers = [("trace-id", b"abc"), ("token", b"s3cret"), ("nothing", None)]
    letter = decode_to_letter(_Message(b"\x00junk", b"scan-7", headers))
    assert (letter.payload, letter.key, letter.headers) == (b"\x00junk", b"scan-7", tuple(headers))
    # The origin is logged and rendered as JSON: it says where the message was, not what it carried.
    assert letter.origin == {"topic": "frames", "partition": 2, "offset": 41, "timestamp_ms": 1_700_000_000_000}


def test_a_message_without_key_or_headers_is_published_again_without_them() -> None:
    letter = decode_to_letter(_Message(b"\x00junk", None, None))
    assert (letter.key, letter.headers) == (None, ())
    key, _, headers = dead_letter_record(letter)
    assert key is None  # not the operator's name: the message had no key
    assert [name for name, _ in headers] == [h for h in BEAMOPS_HEADERS if h != "beamops-instance"]  # no label yet


def test_headers_are_never_logged_nor_in_the_repr(caplog: pytest.LogCaptureFixture) -> None:
    letter = source_letter(headers=(("authorization", b"Bearer s3cret"),))
    assert "s3cret" not in repr(letter)
    with caplog.at_level(logging.WARNING, logger="beamops.deadletter"):
        OperatorMetrics("read_kafka_frames").dead_letter(letter)
    assert "offset=41" in caplog.text and "s3cret" not in caplog.text


def test_the_new_fields_cross_a_beam_coder_and_a_pickle() -> None:
    letter = source_letter()
    coder = coders.registry.get_coder(DeadLetter)
    for again in (coder.decode(coder.encode(letter)), pickle.loads(pickle.dumps(letter))):
        assert again == letter
        assert (again.instance, again.key, again.headers) == ("live", b"scan-7", letter.headers)


# --- the Kafka dead-letter record ---------------------------------------------------------------------------


def test_a_kafka_dead_letter_has_the_original_key_and_headers_first_then_the_beamops_headers() -> None:
    letter = source_letter(headers=(("trace-id", b"abc"), ("beamops-schema-version", b"2"), ("nothing", None)))
    key, value, headers = dead_letter_record(letter)
    assert (key, value) == (b"scan-7", b"\x00junk")
    assert headers[:3] == [("trace-id", b"abc"), ("beamops-schema-version", b"2"), ("nothing", None)]
    assert [name for name, _ in headers[3:]] == BEAMOPS_HEADERS
    ours = dict(headers[3:])
    assert (ours["beamops-operator"], ours["beamops-instance"]) == (b"read_kafka_frames", b"live")
    assert json.loads(ours["beamops-origin"])["offset"] == 41


def test_an_empty_key_is_a_key() -> None:
    assert dead_letter_record(source_letter(key=b""))[0] == b""


def test_a_letter_without_original_key_is_keyed_by_operator_and_has_only_beamops_headers() -> None:
    letter = source_letter(operator="com_reduce", instance="reduce_r5", key=None, headers=None)
    key, _, headers = dead_letter_record(letter)
    assert key == b"com_reduce"
    assert [name for name, _ in headers] == BEAMOPS_HEADERS
    assert dict(headers)["beamops-instance"] == b"reduce_r5"


def test_a_letter_made_outside_an_operator_has_no_instance_header() -> None:
    _, _, headers = dead_letter_record(source_letter(instance=None, headers=None))
    assert [name for name, _ in headers] == [h for h in BEAMOPS_HEADERS if h != "beamops-instance"]


# --- dead-letter files ----------------------------------------------------------------------------------------


def write_files(letter: DeadLetter, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    payload, meta = (Path(p) for p in write_dead_letters(out_dir=str(out_dir)).process(letter))
    return payload, json.loads(meta.read_text())


def test_a_dead_letter_file_is_named_after_the_instance_and_records_key_and_headers(tmp_path: Path) -> None:
    payload, meta = write_files(source_letter(), tmp_path)
    assert payload.name.startswith("live-") and payload.suffix == ".bin"
    assert payload.read_bytes() == b"\x00junk"
    assert (meta["operator"], meta["instance"], meta["payload_file"]) == ("read_kafka_frames", "live", payload.name)
    # Bytes that are UTF-8 are kept as text, others as base64, saying which; a null value stays null.
    assert meta["key"] == {"text": "scan-7"}
    assert meta["headers"] == [
        ["trace-id", {"text": "abc"}],
        ["blob", {"base64": base64.b64encode(b"\xff\x00").decode()}],
        ["nothing", None],
    ]


def test_a_letter_without_instance_key_or_headers_is_named_after_the_operator(tmp_path: Path) -> None:
    letter = source_letter(operator="com_reduce", instance=None, key=None, headers=None)
    payload, meta = write_files(letter, tmp_path)
    assert payload.name.startswith("com_reduce-")
    assert (meta["instance"], meta["key"], meta["headers"]) == (None, None, None)


def test_an_instance_label_that_is_no_file_name_is_made_one(tmp_path: Path) -> None:
    payload, meta = write_files(source_letter(instance="Reduce r=5.0/fast"), tmp_path)
    assert payload.parent == tmp_path / "dead_letters"
    assert payload.name.startswith("Reduce_r_5_0_fast-") and payload.suffix == ".bin"
    assert meta["instance"] == "Reduce r=5.0/fast"


# --- which instance failed ----------------------------------------------------------------------------------------


class RefuseParams(OperatorParams):
    batch: int = Field(description="The batch (origin 'batch') to refuse.")


@operator(output_name="frames")
def refuse_batch(batch: SparseFrameBatch, params: RefuseParams) -> SparseFrameBatch:
    """Pass batches through, refusing one."""
    if batch.origin and batch.origin.get("batch") == params.batch:
        raise ValueError(f"refusing batch {params.batch}")
    return batch


def test_each_instance_of_an_operator_names_itself_in_its_dead_letters() -> None:
    # The third instance has no label: it is named by its default one.
    result = run_operator(
        lambda frames: (
            frames | "first" >> refuse_batch(batch=0) | "second" >> refuse_batch(batch=1) | refuse_batch(batch=2)
        ),
        BATCHES,
    )
    assert sorted((d.origin["batch"], d.operator, d.instance) for d in result.dead_letters) == [
        (0, "refuse_batch", "first"),
        (1, "refuse_batch", "second"),
        (2, "refuse_batch", "refuse_batch"),
    ]
