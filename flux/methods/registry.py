"""Which method a name means, without importing torch.

A method is named in the config by a built-in name (:data:`BUILTIN`) or by ``"module:Class"``
(a user's :class:`flux.methods.api.Method` subclass, importable from ``sys.path``).  Names are
*checked* here without importing anything (config validation, ``flux bench``); the class is
imported only by :func:`make_method`.
"""
from __future__ import annotations

import importlib
import re

# the one list of built-in methods
BUILTIN: dict[str, str] = {
    "fedavg": "flux.methods.fedavg:FedAvg",
    "fmd": "flux.methods.fmd:FMD",
    "fmq": "flux.methods.fmq:FMQ",
    "fmes": "flux.methods.fmes:FMES",
    "flux": "flux.methods.flux:Flux",
}
# the approaches FLUX replaces (fedavg has no memory limit: it is the accuracy reference)
BASELINES: tuple[str, ...] = ("fmd", "fmq", "fmes")

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def method_names() -> tuple[str, ...]:
    """The built-in method names, in a stable order."""
    return tuple(BUILTIN)


def method_problem(name: object) -> str | None:
    """Why ``name`` cannot name a method (None when it can); imports nothing.

    A built-in name, or ``"package.module:ClassName"``.
    """
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if name in BUILTIN:
        return None
    if ":" not in name:
        return f"must be one of {', '.join(BUILTIN)} or a 'module:Class' of your own, got {name!r}"
    module, _, cls = name.partition(":")
    if not _DOTTED.match(module) or not _NAME.match(cls):
        return f"{name!r} is not of the form 'package.module:ClassName'"
    return None


def method_target(name: str) -> str:
    """``"module:Class"`` of a method name (a built-in name resolves through :data:`BUILTIN`)."""
    problem = method_problem(name)
    if problem:
        raise ValueError(f"method: {problem}")
    return BUILTIN.get(name, name)


def method_class(name: str) -> type:
    """Import and return the class a method name means.

    Raises:
        ValueError: the name is malformed, its module cannot be imported, the class is missing,
            or it is not a :class:`flux.methods.api.Method` subclass.
    """
    from flux.methods.api import Method

    module_name, _, cls_name = method_target(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"method {name!r}: cannot import module {module_name!r}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ValueError(f"method {name!r}: module {module_name!r} has no attribute {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method {name!r}: {cls_name} is not a subclass of flux.methods.api.Method")
    return cls


def make_method(name: str):
    """A fresh instance of the method ``name`` means (:func:`method_class`)."""
    return method_class(name)()
