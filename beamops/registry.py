"""The operator catalog: built-in operators from ``transforms`` and plugins.

Built-in operators are the Operator classes defined in the modules of the
``transforms`` package and in the SDK's sources and sinks (``beamops.io``).
Other installed packages add theirs through the ``beamops.operators``
entry-point group; an entry point names a module (all its operators are
added) or one Operator class.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from beamops.operator import Operator, did_you_mean

ENTRY_POINT_GROUP = "beamops.operators"
BUILTIN_PACKAGE = "transforms"
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
    names = [f"{BUILTIN_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    wanted = [name for name in [*BUILTIN_IO_MODULES, *names] if "._" not in name]
    return [_load(f"operator module {name}", lambda name=name: importlib.import_module(name)) for name in wanted]


def discover() -> dict[str, type[Operator]]:
    """Every known operator by name; a name defined twice is an error."""
    found: dict[str, type[Operator]] = {}

    def add(op: type[Operator], where: str) -> None:
        if op.name in found and found[op.name] is not op:
            raise CatalogError(f"operator name {op.name!r} from {where} is already used by {found[op.name].__module__}")
        found[op.name] = op

    for module in _builtin_modules():
        for op in _operators_in(module):
            add(op, module.__name__)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = _load(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP}", ep.load)
        ops = _operators_in(loaded, with_submodules=True) if isinstance(loaded, ModuleType) else [loaded]
        if not ops:
            log.warning("entry point %r (%s) of %s defines no operator", ep.name, ep.value, ENTRY_POINT_GROUP)
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
