"""Temporary hooks and attribute changes that are always undone.

Every intervention in the package goes through :class:`ModelPatch`: it registers torch hooks and swaps
attributes, and on exit (normal, exception or KeyboardInterrupt) removes every hook and restores every
attribute in reverse order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_MISSING = object()


class ModelPatch:
    """Context manager collecting hooks and attribute swaps on a model, all undone on exit.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> with ModelPatch() as patch:
        ...     _ = patch.forward_hook(lin, lambda m, i, o: None)
        ...     len(lin._forward_hooks)
        1
        >>> len(lin._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def forward_hook(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> nn.Module:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)
        return module

    def pre_hook(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> nn.Module:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)
        return module

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` until exit; on exit the attribute is exactly as before (an attribute
        that did not exist is deleted again; on a module, a submodule, parameter or buffer goes back to its
        registry and a plain attribute to the instance dict, whatever kind ``value`` was)."""
        if hasattr(_class_attr(type(obj), name), "__set__"):  # a property or other data descriptor
            old = getattr(obj, name)
            setattr(obj, name, value)
            self._undo.append(lambda: setattr(obj, name, old))
            return
        if isinstance(obj, nn.Module) and type(obj).__setattr__ is nn.Module.__setattr__:
            self._undo.append(_set_module_attr(obj, name, value))
            return
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name)
        setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def eval_mode(self, model: nn.Module) -> None:
        """Put every submodule in eval mode until exit, restoring each module's own flag."""
        flipped, stack, seen = [], [model], {id(model)}
        while stack:  # an explicit stack: ~3x faster than the nested generators of model.modules()
            module = stack.pop()
            if module.training:
                flipped.append(module)
            for child in module._modules.values():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
        for module in flipped:
            module.training = False

        def undo() -> None:
            for module in flipped:
                module.training = True

        self._undo.append(undo)

    def restore(self) -> None:
        """Undo everything in reverse order; every step runs even if one fails (the first error is
        raised after the rest)."""
        error: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:  # noqa: BLE001 - keep undoing; re-raised below
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> ModelPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _class_attr(cls: type, name: str) -> Any:
    """``name`` as defined on ``cls`` or a base class (no descriptor invoked), or None."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def _set_module_attr(module: nn.Module, name: str, value: Any) -> Callable[[], None]:
    """Set ``module.name = value``; returns the undo, which puts the old value back where it lived."""
    home, old = "__dict__", module.__dict__.get(name, _MISSING)
    for registry in _REGISTRIES:
        if name in getattr(module, registry):
            home, old = registry, getattr(module, registry)[name]
    plain = home == "__dict__" and not isinstance(value, (torch.Tensor, nn.Module))
    if plain:  # what nn.Module.__setattr__ would end up doing for a plain value, ~20x cheaper
        module.__dict__[name] = value
    else:
        setattr(module, name, value)

    def undo() -> None:
        if plain:
            module.__dict__.pop(name, None)
        else:  # the value may have gone to any registry (or the dict): clear them all
            for registry in _REGISTRIES:
                getattr(module, registry).pop(name, None)
            module.__dict__.pop(name, None)
        if old is not _MISSING:
            (module.__dict__ if home == "__dict__" else getattr(module, home))[name] = old

    return undo
