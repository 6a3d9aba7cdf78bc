"""`beamops operator new` writes an operator that passes its own test; plugins join the catalog."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from beamops.templates import new_operator

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_new_operator_passes_its_generated_test_and_ruff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_ops").mkdir()
    (tmp_path / "my_ops" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    made = new_operator("drop_quiet_frames", Path("my_ops"), Path("tests"))
    assert made.module.is_file() and made.spec.is_file() and made.test.is_file()
    tests = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(made.test)], tmp_path, tmp_path)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
    lint = _run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"), "."], tmp_path)
    assert lint.returncode == 0, lint.stdout


def test_new_operator_refuses_bad_names_existing_operators_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops").mkdir()
    with pytest.raises(ValueError, match="lowercase"):
        new_operator("Bad-Name", Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="already exists in the catalog"):
        new_operator("com_partial", Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="not a directory"):
        new_operator("fine_name", Path("missing"), Path("tests"))
    for shadowing in ("np", "pytest", "frames_to_keep", "sorted"):
        with pytest.raises(ValueError, match="a name the generated code uses"):
            new_operator(shadowing, Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="is a Python keyword"):
        new_operator("lambda", Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="the current directory: give the package's import path"):
        new_operator("fine_name", Path("."), Path("tests"))
    (tmp_path / "ops" / "fine_name.py").write_text("# mine\n")
    with pytest.raises(FileExistsError, match=r"fine_name\.py"):
        new_operator("fine_name", Path("ops"), Path("tests"))
    assert (tmp_path / "ops" / "fine_name.py").read_text() == "# mine\n"


def test_the_cli_creates_an_operator(tmp_path: Path) -> None:
    (tmp_path / "ops").mkdir()
    result = _run([sys.executable, "-m", "beamops.cli", "operator", "new", "count_gate", "--dir", "ops"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ops" / "count_gate.py").is_file() and (tmp_path / "tests" / "test_count_gate.py").is_file()


def test_operators_from_an_installed_plugin_are_listed(tmp_path: Path) -> None:
    package = tmp_path / "beamops_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from beamops import ComMap, Image, operator


            @operator(output_name="image")
            def plugin_com_spread(com: ComMap) -> Image:
                """Length of the COM shift from the map's mean, px."""
                import numpy as np

                data = np.hypot(com.x - np.nanmean(com.x), com.y - np.nanmean(com.y)).astype(np.float32)
                return Image(com.header, "spread", data, "px", com.frames_seen, com.final, com.complete)
            '''
        )
    )
    _install(tmp_path, "beamops-plugin-demo", "demo = beamops_plugin_demo")
    result = _run([sys.executable, "-m", "beamops.cli", "operators", "list"], ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert "plugin_com_spread" in rows and "in:com_map" in rows["plugin_com_spread"]
    assert "com_partial" in rows  # the built-in ones are still there


def _install(root: Path, distribution: str, entry_point: str) -> None:
    """Make ``root`` (on the path of the processes _run starts) hold an installed ``distribution`` whose
    ``beamops.operators`` entry point is ``entry_point`` (``name = module``)."""
    dist = root / f"{distribution.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[beamops.operators]\n{entry_point}\n")


def _plugin(root: Path, name: str, code: str) -> None:
    """An installed distribution ``name`` whose module ``name`` is a beamops.operators entry point."""
    (root / f"{name}.py").write_text(textwrap.dedent(code))
    _install(root, name, f"{name} = {name}")


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (
            "import not_installed_dependency\n",
            "beamops: entry point 'broken_plugin' (broken_plugin) of beamops.operators cannot be loaded: "
            "ModuleNotFoundError: No module named 'not_installed_dependency'",
        ),
        (
            """
            from beamops import ComMap, operator

            @operator(output_name="com_map")
            def com_reduce(com: ComMap) -> ComMap:
                return com
            """,
            "beamops: operator name 'com_reduce' from entry point broken_plugin is already used by "
            "transforms.com_reduce",
        ),
    ],
    ids=["import-error", "name-clash"],
)
def test_a_plugin_that_cannot_join_the_catalog_is_one_line(tmp_path: Path, code: str, says: str) -> None:
    _plugin(tmp_path, "broken_plugin", code)
    result = _run([sys.executable, "-m", "beamops.cli", "operators", "list"], ROOT, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == says


def test_a_package_entry_point_lists_the_operators_its_modules_define(tmp_path: Path) -> None:
    package = tmp_path / "pkg_ops"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg_ops.spread import spread_again\n")
    (package / "spread.py").write_text(
        textwrap.dedent(
            '''
            from beamops import ComMap, operator


            @operator(output_name="com_map")
            def spread_again(com: ComMap) -> ComMap:
                """The map unchanged."""
                return com
            '''
        )
    )
    _install(tmp_path, "pkg-ops", "pkg = pkg_ops")
    result = _run([sys.executable, "-m", "beamops.cli", "operators", "list"], ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "spread_again" in {line.split()[0] for line in result.stdout.splitlines()[2:]}
