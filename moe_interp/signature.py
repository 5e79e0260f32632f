"""Whether a model's forward takes an argument (e.g. ``logits_to_keep``, which older models lack)."""

from __future__ import annotations

import inspect

from torch import nn


def forward_accepts(model: nn.Module, name: str) -> bool:
    """True if ``model.forward`` has a parameter called ``name`` (False if its signature can't be read)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
