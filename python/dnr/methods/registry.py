"""The registry of compression methods by name: ``register``, ``get``, ``available``, ``create``.

The config (``--method`` values), the CLI (``dnr train --help``) and ``dnr compare`` read it, so a method
registered here, by the package or by a user's plugin module, is usable everywhere by its name.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

from .base import CompressionMethod

__all__ = ["register", "get", "available", "create", "import_plugins", "UnknownMethodError", "PluginError"]

_METHODS: dict[str, type[CompressionMethod]] = {}


class UnknownMethodError(KeyError):
    """No method of that name is registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


class PluginError(ImportError):
    """A plugin module could not be imported; the message names it and the cause."""


def register(name: str, cls: type[CompressionMethod] | None = None, *, replace: bool = False) -> Callable:
    """Register ``cls`` as method ``name``; usable as ``@register("name")`` on the class.

    Args:
        name: the ``--method`` value: letters, digits, '-' and '_'.
        cls: a :class:`CompressionMethod` subclass.
        replace: allow replacing a registered method of that name (otherwise a ValueError).
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"register: name must be letters, digits, '-' or '_', got {name!r}")

    def add(method: type[CompressionMethod]) -> type[CompressionMethod]:
        if not (isinstance(method, type) and issubclass(method, CompressionMethod)):
            raise TypeError(f"register({name!r}): expected a dnr.methods.CompressionMethod subclass, got {method!r}")
        if name in _METHODS and _METHODS[name] is not method and not replace:
            raise ValueError(f"register: method {name!r} is already registered ({_METHODS[name].__qualname__}); "
                             "pass replace=True to replace it")
        method.name = name
        _METHODS[name] = method
        return method

    return add if cls is None else add(cls)


def get(name: str) -> type[CompressionMethod]:
    """The class registered as ``name``; raises UnknownMethodError listing the registered names."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"unknown compression method {name!r}; registered: {', '.join(_METHODS)} "
                                 "(a plugin module registers more: --plugin MODULE)") from None


def available() -> tuple[str, ...]:
    """The registered names, the package's own first, in registration order."""
    return tuple(_METHODS)


def create(cfg: Any) -> CompressionMethod:
    """A new instance of the method ``cfg.method`` for the run configured by ``cfg``."""
    return get(cfg.method)(cfg)


def import_plugins(modules: Iterable[str]) -> None:
    """Import each module (dotted path, importable from ``sys.path``) so that it registers its methods.

    Raises:
        PluginError: a module that cannot be imported (named, with the cause).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # a plugin's own failure is reported, not a traceback from deep inside
            raise PluginError(f"cannot import plugin module {module!r}: {type(err).__name__}: {err}") from err
