"""`beamops operator new` writes an operator that passes its own test; plugins join the catalog."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from beamops import registry
from beamops.templates import Generated, new_operator

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    """The environment of a process that imports the beamops under test (this checkout's), and this
    Python as ``python``."""
    paths = [str(p) for p in (extra_path, ROOT) if p is not None]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }


def _run(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_env(extra_path), capture_output=True, text=True, timeout=300)


def _new_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Generated:
    """A new operator ``name`` in the new package ``tmp_path/my_ops``, its test in ``tmp_path/tests``."""
    monkeypatch.chdir(tmp_path)
    made = new_operator(name, Path("my_ops"), Path("tests"))
    assert (tmp_path / "my_ops" / "__init__.py").read_text() == ""  # the package it made
    return made


def test_a_new_operator_passes_its_generated_test_and_ruff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _new_in(tmp_path, monkeypatch, "drop_quiet_frames")
    assert made.module.is_file() and made.spec.is_file() and made.test.is_file()
    tests = _run([*PYTEST, str(made.test)], tmp_path, tmp_path)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "4 passed" in tests.stdout
    config = ["--config", str(ROOT / "pyproject.toml")]
    lint = _run([sys.executable, "-m", "ruff", "check", *config, "."], tmp_path)
    assert lint.returncode == 0, lint.stdout
    layout = _run([sys.executable, "-m", "ruff", "format", "--check", *config, "."], tmp_path)
    assert layout.returncode == 0, layout.stdout


@pytest.mark.parametrize(
    ("kernel", "corrupted"),
    [
        ("frames = [batch.frame(i) for i", "frames = [batch.frame(i) // 2 for i"),
        ("batch.scan_positions[keep]", "np.roll(batch.scan_positions[keep], 1)"),
    ],
    ids=["halved-events", "rotated-positions"],
)
def test_the_generated_test_fails_a_kernel_that_corrupts_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str, corrupted: str
) -> None:
    made = _new_in(tmp_path, monkeypatch, "drop_quiet_frames")
    source = made.module.read_text()
    assert source.count(kernel) == 1
    made.module.write_text(source.replace(kernel, corrupted))
    tests = _run([*PYTEST, str(made.test)], tmp_path, tmp_path)
    assert tests.returncode == 1, tests.stdout + tests.stderr
    assert "FAILED tests/test_drop_quiet_frames.py::test_drop_quiet_frames_keeps_the_frames" in tests.stdout


def test_a_stale_operator_json_fails_with_the_diff_and_the_command_that_rewrites_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _new_in(tmp_path, monkeypatch, "drop_quiet_frames")
    made.module.write_text(made.module.read_text().replace("Field(1, ge=0", "Field(2, ge=0"))
    spec_test = [*PYTEST, "-k", "operator_json", str(made.test)]
    stale = _run(spec_test, tmp_path, tmp_path)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert re.search(r'^E +- default": 2,$', stale.stdout, re.M), stale.stdout  # the code's
    assert re.search(r'^E +\+ default": 1,$', stale.stdout, re.M), stale.stdout  # the file's
    command = re.search(
        r"drop_quiet_frames\.operator\.json \(\+\) is not the operator's spec \(-\); rewrite it: (.+)$",
        stale.stdout,
        re.M,
    )
    assert command is not None, stale.stdout
    subprocess.run(command[1], shell=True, cwd=tmp_path, env=_env(), check=True, timeout=120)
    fixed = _run(spec_test, tmp_path, tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_new_operator_refuses_bad_names_existing_operators_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ops").mkdir()
    with pytest.raises(ValueError, match="lowercase"):
        new_operator("Bad-Name", Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="already exists in the catalog"):
        new_operator("com_partial", Path("ops"), Path("tests"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        new_operator("fine_name", Path("a_file"), Path("tests"))
    for shadowing in ("np", "pytest", "frames_to_keep", "sorted"):
        with pytest.raises(ValueError, match="a name the generated code uses"):
            new_operator(shadowing, Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="is a Python keyword"):
        new_operator("lambda", Path("ops"), Path("tests"))
    with pytest.raises(ValueError, match="the current directory: give the package's import path"):
        new_operator("fine_name", Path("."), Path("tests"))
    (tmp_path / "transforms").mkdir()
    with pytest.raises(ValueError, match="would be a package 'transforms', which hides beamops' built-in operators"):
        new_operator("fine_name", Path("transforms"), Path("tests"))
    assert not any((tmp_path / "transforms").iterdir())
    (tmp_path / "ops" / "fine_name.py").write_text("# mine\n")
    with pytest.raises(FileExistsError, match=r"fine_name\.py"):
        new_operator("fine_name", Path("ops"), Path("tests"))
    assert (tmp_path / "ops" / "fine_name.py").read_text() == "# mine\n"


def test_the_cli_creates_an_operator_and_says_how_to_register_it(tmp_path: Path) -> None:
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "mine"\n')  # a project of the user's: left alone
    result = _run([sys.executable, "-m", "beamops.cli", "operator", "new", "count_gate", "--dir", "ops"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ops" / "count_gate.py").is_file() and (tmp_path / "tests" / "test_count_gate.py").is_file()
    assert "run its test: python -m pytest tests/test_count_gate.py" in result.stderr  # ops/ is importable here
    # The lines it prints for pyproject.toml put the operator in the catalog.
    assert '  [project.entry-points."beamops.operators"]\n  count_gate = "ops.count_gate"\n' in result.stderr
    _install(tmp_path, "my-ops", "count_gate = ops.count_gate")
    listed = _run([sys.executable, "-m", "beamops.cli", "operators", "list"], ROOT, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {"count_gate", "com_partial"} <= {line.split()[0] for line in listed.stdout.splitlines()[2:]}


def test_a_new_project_gets_a_pyproject_that_installs_the_operator_into_the_catalog(tmp_path: Path) -> None:
    """`pip install -e .`, which the command says to run, failed in a directory without a pyproject.toml."""
    new = [sys.executable, "-m", "beamops.cli", "operator", "new"]
    result = _run([*new, "hot_pixel_filter", "--dir", "src/myops"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "pyproject.toml"
    assert "pyproject.toml is a new project with myops.hot_pixel_filter as an operator entry point" in result.stderr
    project = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["beamops.operators"] == {"hot_pixel_filter": "myops.hot_pixel_filter"}
    # The wheel pip would install: the package, its operator.json, the entry point.
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "-q", "."], tmp_path
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("myops-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"myops/__init__.py", "myops/hot_pixel_filter.py", "myops/hot_pixel_filter.operator.json"} <= names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert zf.read(entry_points).decode().split() == [
            "[beamops.operators]",
            "hot_pixel_filter",
            "=",
            "myops.hot_pixel_filter",
        ]
    # A second operator in the same project leaves its pyproject.toml as it is.
    again = _run([*new, "cold_pixel_filter", "--dir", "src/myops"], tmp_path)
    assert again.returncode == 0 and "pyproject.toml" not in again.stdout
    assert '  cold_pixel_filter = "myops.cold_pixel_filter"' in again.stderr


def test_the_cli_says_when_the_new_test_needs_the_package_installed(tmp_path: Path) -> None:
    (tmp_path / "src" / "myops").mkdir(parents=True)
    (tmp_path / "src" / "myops" / "__init__.py").write_text("")
    new = [sys.executable, "-m", "beamops.cli", "operator", "new"]
    result = _run([*new, "hot_pixel_filter", "--dir", "src/myops"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "run its test after `pip install -e .` (myops.hot_pixel_filter is not importable from here): "
        "python -m pytest tests/test_hot_pixel_filter.py"
    ) in result.stderr
    installed = _run([*new, "cold_pixel_filter", "--dir", "src/myops"], tmp_path, tmp_path / "src")
    assert installed.returncode == 0, installed.stderr
    assert "run its test: python -m pytest tests/test_cold_pixel_filter.py" in installed.stderr


def test_operator_new_outside_the_beamops_repository_needs_dir(tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "beamops.cli", "operator", "new", "count_gate"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == "beamops: give --dir, the package directory for your operators (e.g. --dir src/myops)\n"
    assert list(tmp_path.iterdir()) == []
    # In beamops' own repository the default is its catalog, transforms/ (which has com_partial).
    in_repo = _run([sys.executable, "-m", "beamops.cli", "operator", "new", "com_partial"], ROOT)
    assert in_repo.returncode == 2
    assert in_repo.stderr == "beamops: an operator named 'com_partial' already exists in the catalog\n"


def test_a_project_package_named_transforms_is_an_error_not_a_smaller_catalog(tmp_path: Path) -> None:
    (tmp_path / "transforms").mkdir()
    (tmp_path / "transforms" / "__init__.py").write_text("")
    result = _run([sys.executable, "-m", "beamops.cli", "operators", "list"], tmp_path)  # tmp_path first on sys.path
    assert result.returncode == 2, result.stdout
    assert result.stderr == (
        f"beamops: 'transforms' imports from {tmp_path.resolve() / 'transforms'}, which hides beamops' built-in "
        f"operators in {ROOT / 'transforms'}: rename that package (beamops installs a top-level 'transforms') "
        "or take its directory off sys.path\n"
    )


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
            "transforms.com_reduce: rename one (a class's `name`, or @operator(name=...))",
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


def test_a_package_entry_point_without_operators_says_its_modules_are_not_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "unscanned_ops").mkdir()
    (tmp_path / "unscanned_ops" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point = EntryPoint("myops", "unscanned_ops", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry_point])
    with caplog.at_level(logging.WARNING, logger="beamops.registry"):
        registry.discover()
    assert caplog.messages == [
        "entry point 'myops' (unscanned_ops) of beamops.operators defines no operator; unscanned_ops is a package, "
        "whose submodules are not scanned: import their operators in its __init__.py, or point the entry point "
        "at the module that defines them (unscanned_ops.<module>)"
    ]
