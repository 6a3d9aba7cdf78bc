"""beamops: streaming operators for detector data on Apache Beam.

x is a column and y a row everywhere; shapes are (rows, cols).
"""

from beamops.deadletter import DeadLetter
from beamops.frames import (
    DenseFrameBatch,
    FrameDecodeError,
    FrameHeader,
    SparseFrameBatch,
    decode_batch,
    encode_batch,
)
from beamops.operator import (
    DEAD_LETTER,
    BatchOperator,
    NoParams,
    Operator,
    OperatorDefinitionError,
    OperatorOutputs,
    OperatorParameterError,
    OperatorParams,
    Port,
    WorkerEnvironmentError,
    operator,
)
from beamops.ports import PortTypeError, register_port_type
from beamops.results import ComMap, ComPartial, Image, decode_element
from beamops.spec import OperatorSpec

# Registers the coders of the batch and result types with Beam, before any pipeline is built; and
# makes bundles end without waiting up to 200 ms for Beam's state sampler, in every process running operators.
import beamops.coders  # isort: skip
import beamops.harness  # noqa: F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "DEAD_LETTER",
    "BatchOperator",
    "ComMap",
    "ComPartial",
    "DeadLetter",
    "DenseFrameBatch",
    "FrameDecodeError",
    "FrameHeader",
    "Image",
    "NoParams",
    "Operator",
    "OperatorDefinitionError",
    "OperatorOutputs",
    "OperatorParameterError",
    "OperatorParams",
    "OperatorSpec",
    "Port",
    "PortTypeError",
    "SparseFrameBatch",
    "WorkerEnvironmentError",
    "decode_batch",
    "decode_element",
    "encode_batch",
    "operator",
    "register_port_type",
]
