"""Provenance: which operators, with which parameters, made a result.

Every operator stamps its output PCollections with the chain of steps that made them (while the
pipeline is built, so it costs nothing per element): the operators upstream, each with its catalog
name, instance label and parameters, and the label of any plain Beam transform between two of them.
Sinks of results write it next to what they write (a Kafka header, a key of an ``.npz``, a PNG text
chunk, an HDF5 attribute), so a map found later says how it was made: which simulated scan, HDF5 file
or Kafka read (topic, start and stop as given, group), which crop, which reduction. The offsets a
read actually consumed are not in it: a live read's start is ``committed`` and its stop ``latest``
or ``never``.

Parameters only: the Kafka client settings (brokers, credentials) are not operator parameters and
never appear here. Nothing in it depends on when or where the job ran: two runs with the same
parameters write the same provenance (a replay's read differs from the live run's in its start and
stop, in having no group, and in wait_past_end).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
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

    def describe(self) -> str:
        """For people: one line per step, source first, with every parameter."""
        lines = [f"made by beamops {self.beamops_version}" + ("" if self.traced else " (traced part of the way)")]
        for number, step in enumerate(self.steps, 1):
            if step.operator is None:
                lines.append(f"{number:>3}. {step.instance} (Beam transform)")
                continue
            named = step.operator if step.instance == step.operator else f"{step.instance} ({step.operator})"
            params = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted((step.params or {}).items()))
            lines.append(f"{number:>3}. {named}: {params}" if params else f"{number:>3}. {named}")
        return "\n".join(lines)

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
        plain transforms from there to ``pcoll``, each named by its top-level label (``Inputs``, not
        ``Inputs/Map(decode)``; consecutive steps of one composite are one step). Followed step by step
        (into composites, so an operator inside one is found) through steps of one main input; a step of
        none (``beam.Create``) is a source; one of several (``beam.Flatten``) ends the trace, and it and
        side inputs make ``traced`` False."""
        labels: list[str] = []  # nearest first
        traced = True
        current: Any = pcoll
        while True:
            stamped = getattr(current, _LINEAGE_ATTR, None)
            if stamped is not None:
                steps = (*stamped.steps, *_plain_steps(labels))
                return cls(steps, stamped.traced and traced, stamped.beamops_version)
            step = current.producer if isinstance(current, pvalue.PCollection) else None
            if step is None:
                return cls(_plain_steps(labels), traced=False)
            labels.append(_top_level(step).full_label)
            traced = traced and not step.side_inputs
            inputs = [i for i in step.main_inputs.values() if isinstance(i, pvalue.PCollection)]
            if len(inputs) != 1:
                return cls(_plain_steps(labels), traced=traced and not inputs)
            current = inputs[0]


def _top_level(applied: Any) -> Any:
    """The transform applied to the pipeline itself that ``applied`` is part of (or is)."""
    while applied.parent is not None and applied.parent.full_label:  # the root's label is ""
        applied = applied.parent
    return applied


def _plain_steps(labels_nearest_first: list[str]) -> tuple[Step, ...]:
    ordered = labels_nearest_first[::-1]
    return tuple(Step(label) for k, label in enumerate(ordered) if k == 0 or ordered[k - 1] != label)


def read_provenance(path: str | Path) -> Provenance:
    """The provenance a sink wrote into a file: a map's ``.npz`` (key ``provenance``), a PNG (text chunk
    ``beamops-provenance``) or a stempy HDF5 file (``metadata/beamops`` attribute ``provenance``).
    ValueError, naming the file, when it holds none or is none of those."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            import numpy as np

            with np.load(path) as npz:
                text = str(npz["provenance"]) if "provenance" in npz.files else None
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as png:
                text = png.text.get(PROVENANCE_KEY)
        elif suffix in (".h5", ".hdf5"):
            from beamops.io.hdf5 import inspect_stempy_hdf5

            text = inspect_stempy_hdf5(path).provenance
        elif suffix == ".npy":
            raise ValueError(f"{path}: an .npy holds only its array; the .png written beside it holds the provenance")
        else:
            raise ValueError(f"{path}: not a file beamops writes provenance into (.npz, .png, .h5)")
        if text is None:
            raise ValueError(f"{path}: holds no beamops provenance (written by another program, or an older beamops)")
        return Provenance.from_json(text)
    except (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read its provenance: {exc}") from exc


def stamp(pcoll: pvalue.PCollection, provenance: Provenance) -> None:
    """Mark ``pcoll`` as made by ``provenance``'s steps (Operator.expand does it for each output port)."""
    setattr(pcoll, _LINEAGE_ATTR, provenance)


def _version() -> str:
    from beamops import __version__

    return __version__
