"""Per-token attention over one prompt (for the coloured-text figure), and its tuned-minus-base difference.

``P_l(k)`` is the attention from the query rows (the last prompt token, or the answer-predicting rows;
see :mod:`moe_interp.analysis.spans`) to key token ``k`` in layer ``l``, averaged over heads and rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from moe_interp.analysis.encode import as_examples, encode, make_batch, model_device, pad_id
from moe_interp.analysis.rows import RowAttentionRecorder
from moe_interp.analysis.spans import Query, query_rows
from moe_interp.architectures import get_architecture
from moe_interp.errors import InputError
from moe_interp.hooks import ModelPatch


@dataclass
class TokenAttention:
    """Attention of one prompt's query rows to each of its tokens.

    Attributes:
        tokens: decoded prompt tokens [K]. layers: decoder-layer numbers [L].
        attention: [L, K] float32, mean over heads and query rows (prompt keys only).
        spans: the example's ``"context"`` / ``"answer"`` token spans.
    """

    tokens: list[str]
    layers: list[int]
    attention: torch.Tensor
    spans: dict[str, list[tuple[int, int]]]


def token_attention(
    model: nn.Module,
    tokenizer: Any,
    example: Any | Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    query: Query = "last",
    template: str = "paper",
) -> TokenAttention:
    """Attention from ``example``'s query rows to every prompt token, at ``layers`` (default: all)."""
    (ex,) = list(as_examples([example]))
    enc = encode(tokenizer, ex, template=template, tokens=True)
    batch = make_batch([enc], pad_id(tokenizer), with_answer=query == "answer")
    rows, _ = query_rows(batch, query)
    arch = get_architecture(model)
    modules = arch.attention_modules(model)
    if layers is not None:
        known = {n for n, _ in modules}
        bad = [n for n in layers if n not in known]
        if bad:
            raise InputError(f"layers {bad} have no attention module; attention layers: {sorted(known)}")
        modules = [(n, m) for n, m in modules if n in set(layers)]
    got: dict[int, torch.Tensor] = {}

    def on_rows(layer: int, probs: torch.Tensor) -> None:
        got[layer] = probs[0].float().mean(dim=(0, 1))[: enc.prompt_len].cpu()  # [K]

    device = model_device(model)
    with ModelPatch() as patch, torch.no_grad():
        patch.eval_mode(model)
        RowAttentionRecorder(rows, on_rows).install(patch, modules)
        model(input_ids=batch.input_ids.to(device), attention_mask=batch.mask.to(device), use_cache=False)
    numbers = sorted(got)
    return TokenAttention(enc.tokens, numbers, torch.stack([got[n] for n in numbers]), enc.spans)


def token_attention_difference(base: TokenAttention, tuned: TokenAttention) -> pd.DataFrame:
    """Tidy per-token frame: layer, position, token, span (context/answer/other), base, tuned, diff."""
    if base.tokens != tuned.tokens or base.layers != tuned.layers:
        raise InputError("base and tuned token attention were measured on different prompts or layers")
    label = ["other"] * len(base.tokens)
    for name in ("context", "answer"):
        for start, end in base.spans.get(name, []):
            for k in range(start, end):
                label[k] = name
    rows = []
    for li, layer in enumerate(base.layers):
        for k, tok in enumerate(base.tokens):
            b, t = float(base.attention[li, k]), float(tuned.attention[li, k])
            rows.append((layer, k, tok, label[k], b, t, t - b))
    return pd.DataFrame(rows, columns=["layer", "position", "token", "span", "base", "tuned", "diff"])
