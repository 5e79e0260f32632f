"""Whether a model's forward takes an argument (e.g. ``logits_to_keep``, which older models lack)."""

from __future__ import annotations

import inspect

from torch import nn

_ACCEPTS: dict[tuple[object, str], bool] = {}


def forward_accepts(model: nn.Module, name: str) -> bool:
    """True if ``model.forward`` has a parameter called ``name`` (False if its signature can't be read).

    Answers are cached per forward function (reading a signature costs about as much as a small layer).
    """
    forward = model.forward
    key = (getattr(forward, "__func__", None), name)
    if key[0] is not None and key in _ACCEPTS:
        return _ACCEPTS[key]
    try:
        accepts = name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if key[0] is not None:
        _ACCEPTS[key] = accepts
    return accepts
