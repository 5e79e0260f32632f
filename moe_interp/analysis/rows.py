"""Attention probabilities for chosen query rows only, without changing the model's attention kernel.

Same mechanism as :class:`moe_interp.attention.AttentionRecorder` (a config copy whose
``_attn_implementation`` names a wrapper in transformers' ``AttentionInterface``; the wrapper calls the
model's own kernel with unchanged arguments, so outputs are bit-identical), but the wrapper gathers the
requested query rows *before* computing probabilities: cost and memory are ``[B, H, R, T]`` per layer
instead of ``[B, H, T, T]``. Probabilities come from :func:`moe_interp.attention.attention_probs`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib import import_module

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from moe_interp.attention import attention_probs
from moe_interp.errors import InputError
from moe_interp.hooks import ModelPatch

_PREFIX = "moe_interp_rows|"
_TAG = "_moe_interp_row_recorder"


class RowAttentionRecorder:
    """Reports attention probabilities of selected query rows for every attention layer.

    Args:
        rows: [B, R] long query positions per batch row (pad with any valid position and ignore those).
        on_rows: called as ``on_rows(layer_number, probs)`` with probs [B, H, R, K] float32, where K is the
            key length (padding keys get probability 0).
    """

    def __init__(self, rows: torch.Tensor, on_rows: Callable[[int, torch.Tensor], None]) -> None:
        if rows.dim() != 2:
            raise InputError(f"rows must be [batch, n_rows] positions, got shape {tuple(rows.shape)}")
        self.rows = rows.long()
        self.on_rows = on_rows

    def install(self, patch: ModelPatch, attention_modules: list[tuple[int, nn.Module]]) -> None:
        """Swap each module's config for a copy naming the wrapper, until ``patch`` exits."""
        configs: dict[int, object] = {}
        for number, module in attention_modules:
            config = getattr(module, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            if id(config) not in configs:
                wrapped = copy.copy(config)
                name = _register(config._attn_implementation or "eager")
                # bypass the property setter (it would recurse into sub-configs shared with the original)
                wrapped.__dict__["_attn_implementation_internal"] = name
                configs[id(config)] = wrapped
            patch.set_attr(module, "config", configs[id(config)])
            patch.set_attr(module, _TAG, (self, number))


def select_rows(
    query: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor, sliding_window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows and the matching mask rows.

    Args:
        query: [B, H, T, D]; attention_mask: None (plain causal), [B, K] (key padding, 1 = token) or
            [B or 1, 1 or H, T, K] (bool or additive). rows: [B, R].

    Returns:
        query rows [B, H, R, D] and a mask [B, 1 or H, R, K] for :func:`attention_probs`.
    """
    b, h, t, d = query.shape
    rows = rows.to(query.device)
    if rows.shape[0] != b or int(rows.max()) >= t or int(rows.min()) < 0:
        raise InputError(
            f"query rows {tuple(rows.shape)} (max {int(rows.max())}) do not fit queries [{b}, {t}]"
        )
    q = query.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
    if attention_mask is None or attention_mask.dim() == 2:
        k_pos = torch.arange(t, device=query.device)
        allowed = k_pos[None, None, :] <= rows[:, :, None]  # [B, R, K]
        if sliding_window is not None:
            allowed = allowed & (rows[:, :, None] - k_pos[None, None, :] < sliding_window)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :t].bool()
        return q, allowed[:, None]
    m = attention_mask.expand(b, -1, -1, -1)
    idx = rows[:, None, :, None].expand(b, m.shape[1], rows.shape[1], m.shape[-1])
    return q, m.gather(2, idx)


def _register(original: str) -> str:
    name = _PREFIX + original
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def wrapper(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if original == "eager":
            fn = import_module(type(module).__module__).eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[original]
        out = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        tag = getattr(module, _TAG, None)
        if tag is not None:
            recorder, layer = tag
            window = kwargs.get("sliding_window")
            with torch.no_grad():
                q, mask = select_rows(query.detach(), attention_mask, recorder.rows, window)
                probs = attention_probs(
                    module,
                    q,
                    key.detach(),
                    mask,
                    scaling,
                    softcap=kwargs.get("softcap"),
                    sinks=kwargs.get("s_aux"),
                )
            recorder.on_rows(layer, probs)
        return out

    ALL_ATTENTION_FUNCTIONS.register(name, wrapper)
    return name
