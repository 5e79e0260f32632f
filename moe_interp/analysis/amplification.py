"""Amplification by experts: how much attention to the context falls when an expert set is masked.

For an expert set X (e.g. CE, context-faithful experts, vs OE, other experts) and every attention layer::

    drop_l(X)     = mean_i A_base,l(i, s) - mean_i A_mask X,l(i, s)
    rel_drop_l(X) = drop_l(X) / mean_i A_base,l(i, s)

with ``A`` the head-averaged span attention of :mod:`moe_interp.analysis.spans` (``s`` = context or answer).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from moe_interp.analysis.attribution import ExpertEffects
from moe_interp.analysis.spans import Query, SpanAttention, span_attention
from moe_interp.errors import InputError
from moe_interp.routerlens.masking import mask_experts


def _means(att: SpanAttention) -> torch.Tensor:
    return att.mean.mean(1)  # [L, S]


def amplification_by_experts(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Any],
    expert_sets: Mapping[str, Any],
    *,
    query: Query = "last",
    batch_size: int = 16,
    template: str = "paper",
) -> pd.DataFrame:
    """Attention to spans with each expert set masked, against no masking.

    Args:
        examples: a re-iterable collection (it is streamed once per set, plus once unmasked).
        expert_sets: name -> ``{layer: [experts]}`` (or a ``layer``/``expert`` frame), e.g. from
            :func:`ce_oe_sets`.

    Returns:
        columns set, layer, span, base, masked, drop, rel_drop (formulas in the module docstring).
    """
    examples = list(examples)
    if not expert_sets:
        raise InputError("expert_sets is empty; pass e.g. {'CE': {layer: [experts]}, 'OE': {...}}")
    kw = dict(query=query, batch_size=batch_size, keep="mean", template=template)
    base = span_attention(model, tokenizer, examples, **kw)
    b = _means(base)
    rows = []
    for name, spec in expert_sets.items():
        with mask_experts(model, spec):
            masked = _means(span_attention(model, tokenizer, examples, **kw))
        for li, layer in enumerate(base.layers):
            for si, span in enumerate(base.span_names):
                drop = float(b[li, si] - masked[li, si])
                rel = drop / float(b[li, si]) if float(b[li, si]) > 0 else float("nan")
                rows.append((name, layer, span, float(b[li, si]), float(masked[li, si]), drop, rel))
    return pd.DataFrame(rows, columns=["set", "layer", "span", "base", "masked", "drop", "rel_drop"])


def ce_oe_sets(effects: ExpertEffects, per_layer: int = 2, seed: int = 0) -> dict[str, dict[int, list[int]]]:
    """CE: per layer the ``per_layer`` experts whose masking lowers the answer log-probability most;
    OE: as many other experts per layer, drawn at random (``seed``) from the rest.
    """
    if not 0 < per_layer <= effects.num_experts // 2:
        raise InputError(f"per_layer must be in [1, {effects.num_experts // 2}], got {per_layer}")
    rng = random.Random(seed)
    mean = effects.delta_logprob.mean(-1)  # [L, E]
    ce, oe = {}, {}
    for li, layer in enumerate(effects.layers):
        order = torch.argsort(mean[li]).tolist()  # most negative first
        ce[layer] = sorted(order[:per_layer])
        oe[layer] = sorted(rng.sample(order[per_layer:], per_layer))
    return {"CE": ce, "OE": oe}
