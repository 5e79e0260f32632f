"""Attention paid to token spans, recorded without changing the model's attention kernel.

The model keeps running its own attention function (sdpa, flash, eager, ...). For the duration of a trace
each attention module sees a copy of its config whose ``_attn_implementation`` names a wrapper registered
in transformers' ``AttentionInterface``. The wrapper calls the original function with the unchanged
arguments (so outputs are bit-identical) and, from the same post-RoPE queries and keys and the same mask,
computes attention probabilities for the recorded query rows (all, or only those asked for) in float32.
Where the kernel is eager and every row is wanted, the probabilities eager returns are recorded instead
(it has just computed them; a model loaded with ``attn_implementation="eager"`` pays for attention once).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from moe_interp.errors import InputError
from moe_interp.hooks import ModelPatch

_WRAPPER_PREFIX = "moe_interp_record|"


def attention_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities in float32, as eager attention computes them.

    Args:
        query: [batch, heads, q_len, head_dim] after RoPE.
        key: [batch, kv_heads, k_len, head_dim] after RoPE.
        attention_mask: None (plain causal), bool [batch, 1, q_len, k_len] (True = attend) or an additive
            float mask of that shape.
        sinks: per-head sink logits [heads] (GPT-OSS): part of the softmax denominator, not returned.

    Returns:
        [batch, heads, q_len, k_len].
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else key
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # one full-size allocation for the scores, then in-place steps (this runs inside every forward)
    scores = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=scores.device)[:, None]
        k_pos = torch.arange(k_len, device=scores.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        scores.masked_fill_(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores.add_(attention_mask[..., :k_len].float())
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, q_len, 1)
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.softmax(scores, dim=-1).nan_to_num_(0.0)


def attention_to_spans(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    span_values: torch.Tensor,
) -> torch.Tensor:
    """Attention mass each query row pays to each span, without materialising the attention map.

    The mass is attention applied to 0/1 span indicators as values, ``softmax(q k^T) @ span_values``, so the
    fused ``scaled_dot_product_attention`` kernel computes it in float32 (same softmax as
    :func:`attention_probs`; no softcap, sinks or sliding window without a mask: callers fall back).

    Args:
        query: [B, H, Q, D] after RoPE; key: [B, KV, K, D]; attention_mask as in :func:`attention_probs`.
        span_values: [B, K, S] float, 1 where key k lies in span s.

    Returns:
        [B, H, Q, S].
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else key
    q_len, k_len = query.shape[-2], key.shape[-2]
    values = span_values[:, None, :k_len].float().expand(-1, heads, -1, -1)
    mask = attention_mask[..., :k_len] if attention_mask is not None else None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    causal = mask is None and q_len == k_len
    if mask is None and not causal:  # queries at the end of a longer key sequence (a cache)
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
        mask = torch.arange(k_len, device=query.device)[None, :] <= q_pos
    return F.scaled_dot_product_attention(
        query.float(), key.float(), values, attn_mask=mask, is_causal=causal, scale=scaling
    )


class AttentionRecorder:
    """Installs the recording wrapper on attention modules for the life of a :class:`ModelPatch`.

    ``on_probs(layer_number, probs)`` receives float32 probabilities for every attention layer:
    [batch, heads, q_len, k_len] for all query rows, or [batch, heads, R, k_len] when ``rows`` ([batch, R]
    query positions) is given, in which case only those rows are computed.
    """

    def __init__(
        self,
        on_probs: Callable[[int, torch.Tensor], None],
        rows: torch.Tensor | None = None,
        *,
        span_values: torch.Tensor | None = None,
        on_spans: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        """With ``span_values`` [B, K, S] and ``on_spans``, layers whose attention allows it report the mass
        per span [B, H, Q, S] to ``on_spans`` (computed by :func:`attention_to_spans`) instead of
        probabilities to ``on_probs``."""
        if rows is not None and rows.dim() != 2:
            raise InputError(f"rows must be [batch, n_rows] positions, got shape {tuple(rows.shape)}")
        self.on_probs = on_probs
        self.rows = rows.long() if rows is not None else None
        self.span_values, self.on_spans = span_values, on_spans

    def install(self, patch: ModelPatch, attention_modules: list[tuple[int, nn.Module]]) -> None:
        configs: dict[int, object] = {}
        for number, module in attention_modules:
            config = getattr(module, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            if id(config) not in configs:
                wrapped = copy.copy(config)
                # Bypass the property setter: it would recurse into sub-configs shared with the original.
                wrapped.__dict__["_attn_implementation_internal"] = _register_wrapper(
                    config._attn_implementation or "eager"
                )
                configs[id(config)] = wrapped
            patch.set_attr(module, "config", configs[id(config)])
            patch.set_attr(module, _TAG, (self, number))

    def takes_kernel_probs(self, query, key, attention_mask, kwargs: dict) -> bool:
        """Whether an eager kernel's own probabilities [B, H, T, T] serve as this layer's record: all query
        rows wanted, no fused span path, no attention sinks (GPT-OSS' eager weights include the sink)."""
        return (
            self.rows is None
            and not self._fused(query, key, attention_mask, kwargs)
            and (kwargs.get("s_aux") is None)
        )

    def _fused(self, query, key, attention_mask, kwargs: dict) -> bool:
        return (
            self.on_spans is not None
            and self.rows is None
            and _fused_pays(query, key)
            and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None
            and (kwargs.get("sliding_window") is None or attention_mask is not None)
        )

    def record(self, layer: int, module, query, key, attention_mask, scaling, kwargs: dict) -> None:
        """Report one layer: span masses where possible, else probabilities."""
        fused = self._fused(query, key, attention_mask, kwargs)
        with torch.no_grad():
            if fused:
                mass = attention_to_spans(query, key, attention_mask, scaling, self.span_values)
                self.on_spans(layer, mass)
            else:
                self.on_probs(layer, self.compute(module, query, key, attention_mask, scaling, kwargs))

    def compute(self, module, query, key, attention_mask, scaling, kwargs: dict) -> torch.Tensor:
        """Probabilities of the recorded query rows (see :func:`attention_probs`)."""
        window = kwargs.get("sliding_window")
        if self.rows is not None:
            query, attention_mask = select_rows(query, attention_mask, self.rows, window)
        return attention_probs(
            module,
            query,
            key,
            attention_mask,
            scaling,
            sliding_window=window,
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
        )


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


_TAG = "_moe_interp_attention_recorder"

#: attention maps at least this large (float32 bytes, per layer) use the fused span path on CPU too
FUSED_CPU_BYTES = 256 * 2**20


def _fused_pays(query: torch.Tensor, key: torch.Tensor) -> bool:
    """The fused span path avoids materialising [B, H, Q, K] maps; on CPU it measured slower than the
    explicit path at 8 x 256 tokens (benchmarks/trace_overhead.py), so CPU uses it only for large maps."""
    if query.device.type != "cpu":
        return True
    b, h, q, _ = query.shape
    return b * h * q * key.shape[-2] * 4 >= FUSED_CPU_BYTES


def _register_wrapper(original: str) -> str:
    name = _WRAPPER_PREFIX + original
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
            weights = out[1] if original == "eager" and isinstance(out, tuple) and len(out) > 1 else None
            if weights is not None and recorder.takes_kernel_probs(query, key, attention_mask, kwargs):
                recorder.on_probs(layer, weights.detach())  # eager computed them: no second computation
            else:
                recorder.record(layer, module, query.detach(), key.detach(), attention_mask, scaling, kwargs)
        return out

    ALL_ATTENTION_FUNCTIONS.register(name, wrapper)
    return name
