"""The README's Python examples run as written (in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "kafka_broker" not in b]  # the fixture example needs a pytest session
    assert len(runnable) >= 2
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in runnable:
        exec(compile(block, str(README), "exec"), namespace)
    assert "drop_sparse_frames" in namespace and "result" in namespace
