"""Provenance: which operators, with which parameters, made a result.

Every operator stamps its output PCollections with the chain of steps that made them (while the
pipeline is built, so it costs nothing per element): the operators upstream, each with its catalog
name, instance label and parameters, and the label of any plain Beam transform between two of them.
Sinks write it next to what they write (a Kafka header, a key of an ``.npz``, a PNG text chunk, an
HDF5 attribute), so a map found later says how it was made: which topic range or simulated scan,
which crop, which reduction.

Parameters only: the Kafka client settings (brokers, credentials) are not operator parameters and
never appear here. Nothing in it depends on when or where the job ran, so a replay with the same
parameters writes the same provenance as any other run of them, except where the read's own
parameters differ (its start and stop).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from apache_beam import pvalue

#: Kafka header, ``.npz`` key, PNG text keyword and HDF5 attribute under which sinks write it.
PROVENANCE_KEY = "beamops-provenance"
_LINEAGE_ATTR = "beamops_lineage"


@dataclass(frozen=True)
class Step:
    """One step of a chain: an operator (``operator`` its catalog name, ``instance`` its label,
    ``params`` its parameters as JSON values), or a plain Beam transform (``operator`` None)."""

    instance: str
    operator: str | None = None
    params: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.operator is None:
            return {"transform": self.instance}
        return {"operator": self.operator, "instance": self.instance, "params": self.params or {}}


@dataclass(frozen=True)
class Provenance:
    """The steps that made a result, source first, and the beamops version that ran them.

    ``traced`` is False when the trace stops before a source: at a transform with several inputs,
    whose steps before it are not followed.
    """

    steps: tuple[Step, ...] = ()
    traced: bool = True
    beamops_version: str = field(default_factory=lambda: _version())

    def to_dict(self) -> dict[str, Any]:
        return {
            "beamops_version": self.beamops_version,
            "steps": [s.to_dict() for s in self.steps],
            "traced_to_source": self.traced,
        }

    def to_json(self) -> str:
        """Compact JSON with sorted keys: equal provenance gives equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)

    def params_of(self, operator: str) -> dict[str, Any]:
        """The parameters of the last step that ran ``operator`` (KeyError if none did)."""
        for step in reversed(self.steps):
            if step.operator == operator:
                return dict(step.params or {})
        raise KeyError(f"no step ran operator {operator!r}; steps: {[s.instance for s in self.steps]}")

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        raw = json.loads(text)
        steps = tuple(
            Step(s["transform"]) if "transform" in s else Step(s["instance"], s["operator"], s["params"])
            for s in raw["steps"]
        )
        return cls(steps, bool(raw["traced_to_source"]), str(raw["beamops_version"]))

    @classmethod
    def of(cls, pcoll: pvalue.PValue) -> Provenance:
        """The chain that made ``pcoll``: the stamp of the nearest operator output upstream, plus the
        plain transforms from there to ``pcoll``, each named by its outermost label (``Inputs``, not
        ``Inputs/Map(decode)``). Followed through transforms of one input; one of none (``beam.Create``)
        is a source, one of several (``beam.Flatten``) ends the trace (``traced`` False)."""
        between: list[Step] = []
        current: Any = pcoll
        while True:
            stamped = getattr(current, _LINEAGE_ATTR, None)
            if stamped is not None:
                return cls((*stamped.steps, *reversed(between)), stamped.traced, stamped.beamops_version)
            producer = _outermost_producer(current) if isinstance(current, pvalue.PCollection) else None
            if producer is None:
                return cls(tuple(reversed(between)), traced=False)
            between.append(Step(producer.full_label))
            inputs = [i for i in producer.main_inputs.values() if isinstance(i, pvalue.PCollection)]
            if len(inputs) != 1:
                return cls(tuple(reversed(between)), traced=not inputs)
            current = inputs[0]


def _outermost_producer(pcoll: pvalue.PCollection) -> Any:
    """The outermost applied transform whose output ``pcoll`` is (a composite, not its last inner step)."""
    producer = pcoll.producer
    while producer is not None and producer.parent is not None and producer.parent.full_label:
        if pcoll not in producer.parent.outputs.values():
            break
        producer = producer.parent
    return producer


def stamp(pcoll: pvalue.PCollection, provenance: Provenance) -> None:
    """Mark ``pcoll`` as made by ``provenance``'s steps (Operator.expand does it for each output port)."""
    setattr(pcoll, _LINEAGE_ATTR, provenance)


def _version() -> str:
    from beamops import __version__

    return __version__
