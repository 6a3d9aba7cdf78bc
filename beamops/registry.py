"""The operator catalog: built-in operators from ``transforms`` and plugins.

Built-in operators are the Operator classes defined in the modules of the
``transforms`` package installed beside ``beamops`` and in the SDK's sources
and sinks (``beamops.io``). Another package named ``transforms`` earlier on
sys.path (a project's own) would hide them: that is an error, not a smaller
catalog. Other installed packages add theirs through the ``beamops.operators``
entry-point group; an entry point names a module (all its operators are
added), a package (the operators its ``__init__`` defines or imports from its
modules) or one Operator class.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from beamops.operator import Operator, did_you_mean

ENTRY_POINT_GROUP = "beamops.operators"
BUILTIN_PACKAGE = "transforms"
# beamops installs its catalog as a top-level package beside itself (in the repository: its root).
BUILTIN_DIR = Path(__file__).resolve().parents[1] / BUILTIN_PACKAGE
# Sources and sinks live in the SDK; their operators are built in too.
BUILTIN_IO_MODULES = ("beamops.io.kafka",)


log = logging.getLogger("beamops.registry")


class UnknownOperatorError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class CatalogError(ValueError):
    """The catalog cannot be built: a module or entry point that fails to load, or a name used twice."""


def _load(what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as exc:  # any failure of someone's module: say whose, in one line
        raise CatalogError(f"{what} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def _operators_in(module: ModuleType, *, with_submodules: bool = False) -> list[type[Operator]]:
    """The operators ``module`` defines (and, ``with_submodules``, those a package re-exports from its
    own modules); not the ones it imports from elsewhere."""
    own = (module.__name__, f"{module.__name__}.")
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Operator)
        and (obj.__module__ == own[0] or (with_submodules and obj.__module__.startswith(own[1])))
        and "name" in obj.__dict__
    ]


def _builtin_modules() -> list[ModuleType]:
    package = importlib.import_module(BUILTIN_PACKAGE)
    found = [Path(p).resolve() for p in getattr(package, "__path__", [package.__file__])]
    if found != [BUILTIN_DIR]:
        where = ", ".join(map(str, found))
        raise CatalogError(
            f"{BUILTIN_PACKAGE!r} imports from {where}, which hides beamops' built-in operators in {BUILTIN_DIR}: "
            f"rename that package (beamops installs a top-level {BUILTIN_PACKAGE!r}) or take its directory off sys.path"
        )
    names = [f"{BUILTIN_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    wanted = [name for name in [*BUILTIN_IO_MODULES, *names] if "._" not in name]
    return [_load(f"operator module {name}", lambda name=name: importlib.import_module(name)) for name in wanted]


def discover() -> dict[str, type[Operator]]:
    """Every known operator by name; a name defined twice is an error."""
    found: dict[str, type[Operator]] = {}

    def add(op: type[Operator], where: str) -> None:
        if op.name in found and found[op.name] is not op:
            raise CatalogError(
                f"operator name {op.name!r} from {where} is already used by {found[op.name].__module__}: "
                "rename one (a class's `name`, or @operator(name=...))"
            )
        found[op.name] = op

    for module in _builtin_modules():
        for op in _operators_in(module):
            add(op, module.__name__)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = _load(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP}", ep.load)
        ops = _operators_in(loaded, with_submodules=True) if isinstance(loaded, ModuleType) else [loaded]
        if not ops:
            hint = (
                f"; {ep.value} is a package, whose submodules are not scanned: import their operators in its "
                f"__init__.py, or point the entry point at the module that defines them ({ep.value}.<module>)"
                if hasattr(loaded, "__path__")
                else ""
            )
            log.warning("entry point %r (%s) of %s defines no operator%s", ep.name, ep.value, ENTRY_POINT_GROUP, hint)
        for op in ops:
            if not (inspect.isclass(op) and issubclass(op, Operator)):
                raise CatalogError(f"entry point {ep.name!r} ({ep.value}) is not an Operator class or a module")
            add(op, f"entry point {ep.value}")
    return dict(sorted(found.items()))


def get(name: str) -> type[Operator]:
    ops = discover()
    try:
        return ops[name]
    except KeyError:
        known = ", ".join(ops)
        raise UnknownOperatorError(f"no operator named {name!r}{did_you_mean(name, ops)}; known: {known}") from None
