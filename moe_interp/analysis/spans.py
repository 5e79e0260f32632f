"""Attention paid to the context and to the answer inside it, streamed over a data set.

For every attention layer ``l``, head ``h`` and example ``i``::

    A[i, l, h, s] = mean over query rows q of  sum over key tokens k in span s of  P_l[h, q, k]

where ``P_l`` are the attention probabilities and the query rows are the last prompt token
(``query="last"``, default) or every position that predicts a gold-answer token under teacher forcing
(``query="answer"``: the last prompt token and every answer token but the last). Only those rows are
computed (:class:`~moe_interp.analysis.rows.RowAttentionRecorder`); the model keeps its own kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_interp.analysis.encode import SPAN_NAMES, Batch, batches, model_device
from moe_interp.analysis.rows import RowAttentionRecorder
from moe_interp.architectures import get_architecture
from moe_interp.errors import InputError
from moe_interp.hooks import ModelPatch
from moe_interp.signature import forward_accepts

Query = Literal["last", "answer"]
QUERIES = ("last", "answer")


@dataclass
class SpanAttention:
    """Attention to spans over a data set.

    Attributes:
        layers: decoder-layer number of each attention layer (axis L).
        span_names: ``("context", "answer")`` (axis S).
        total: [L, H, S] float64 sum of ``A`` over examples; n: number of examples.
        per_example: [N, L, H, S] float32 ``A`` per example (``None`` with ``keep="mean"``).
        ids: example ids (empty with ``keep="mean"``). query: the query rows used.
    """

    layers: list[int]
    span_names: tuple[str, ...]
    total: torch.Tensor
    n: int
    per_example: torch.Tensor | None
    ids: list[str]
    query: str

    @property
    def mean(self) -> torch.Tensor:
        """[L, H, S] mean over examples."""
        if self.n == 0:
            raise InputError("no examples were analysed")
        return (self.total / self.n).float()

    def frame(self, *, heads: bool = False) -> pd.DataFrame:
        """Tidy means: columns layer, (head,) span, attention (mean over heads unless ``heads``)."""
        mean = self.mean
        rows = []
        for li, layer in enumerate(self.layers):
            for si, span in enumerate(self.span_names):
                if heads:
                    for h in range(mean.shape[1]):
                        rows.append((layer, h, span, float(mean[li, h, si])))
                else:
                    rows.append((layer, span, float(mean[li, :, si].mean())))
        cols = ["layer", "head", "span", "attention"] if heads else ["layer", "span", "attention"]
        return pd.DataFrame(rows, columns=cols)


def query_rows(batch: Batch, query: Query) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R] query positions and [B, R] bool validity for ``batch``."""
    if query == "last":
        return batch.last[:, None], torch.ones(len(batch.items), 1, dtype=torch.bool)
    if query != "answer":
        raise InputError(f"query must be one of {QUERIES}, got {query!r}")
    width = max(e.answer_len for e in batch.items)
    rows = torch.zeros(len(batch.items), width, dtype=torch.long)
    valid = torch.zeros(len(batch.items), width, dtype=torch.bool)
    for b, e in enumerate(batch.items):
        pos = torch.arange(e.prompt_len - 1, e.prompt_len - 1 + e.answer_len)
        rows[b] = pos[-1]
        rows[b, : len(pos)] = pos
        valid[b, : len(pos)] = True
    return rows, valid


def batch_span_attention(
    model: nn.Module, batch: Batch, query: Query = "last"
) -> tuple[list[int], torch.Tensor]:
    """One forward pass; returns the attention layers and ``A`` [B, L, H, S] float32 (CPU)."""
    arch = get_architecture(model)
    rows, valid = query_rows(batch, query)
    per_layer: dict[int, torch.Tensor] = {}
    spans, weights = batch.span_masks, valid.float() / valid.sum(1, keepdim=True)  # [B, S, K], [B, R]

    def on_rows(layer: int, probs: torch.Tensor) -> None:
        probs = probs.float().cpu()  # [B, H, R, K]
        mass = torch.einsum("bhrk,bsk->bhrs", probs, spans[..., : probs.shape[-1]])
        per_layer[layer] = torch.einsum("bhrs,br->bhs", mass, weights)

    device = model_device(model)
    ids = batch.input_ids if query == "answer" else _prompt_only(batch)
    with ModelPatch() as patch, torch.no_grad():
        patch.eval_mode(model)
        RowAttentionRecorder(rows, on_rows).install(patch, arch.attention_modules(model))
        model(
            input_ids=ids.to(device),
            attention_mask=batch.mask[:, : ids.shape[1]].to(device),
            use_cache=False,
            **_keep_one(model),
        )
    if not per_layer:
        raise InputError(f"no attention layer of this {arch.model_type} model reported probabilities")
    layers = sorted(per_layer)
    return layers, torch.stack([per_layer[n] for n in layers], dim=1)


def span_attention(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Any | Mapping[str, Any]],
    *,
    query: Query = "last",
    batch_size: int = 16,
    keep: Literal["examples", "mean"] = "examples",
    template: str = "paper",
    progress: bool = False,
) -> SpanAttention:
    """Stream ``examples`` (QAExamples or demo records) through ``model``; see the module docstring.

    Args:
        keep: ``"examples"`` keeps ``A`` per example ([N, L, H, S], 4*L*H*S bytes each, needed for
            per-example gains); ``"mean"`` keeps only the running [L, H, S] sum (memory flat in N).

    The model is left as it was (wrappers and modes restored, also on exceptions).
    """
    if keep not in ("examples", "mean"):
        raise InputError(f"keep must be 'examples' or 'mean', got {keep!r}")
    total, n, layers, chunks, ids = None, 0, None, [], []
    with_answer_span, first_id = 0, None
    stream = batches(tokenizer, examples, batch_size, template=template, with_answer=query == "answer")
    for batch in tqdm(stream, desc="attention", unit="batch", disable=not progress):
        layers, a = batch_span_attention(model, batch, query)
        total = a.double().sum(0) if total is None else total + a.double().sum(0)
        n += a.shape[0]
        with_answer_span += sum(bool(e.spans.get("answer")) for e in batch.items)
        first_id = first_id if first_id is not None else batch.items[0].id
        if keep == "examples":
            chunks.append(a)
            ids.extend(e.id for e in batch.items)
    if total is None or layers is None:
        raise InputError("examples is empty")
    if with_answer_span == 0:
        warnings.warn(
            f"the answer occurs in the context of none of the {n} examples (first id {first_id!r}): "
            "attention to the context (CAG) is measured, attention to the answer span (AAG) is undefined; "
            "check the data set's answer and context fields",
            stacklevel=2,
        )
    per = torch.cat(chunks) if keep == "examples" else None
    return SpanAttention(layers, SPAN_NAMES, total, n, per, ids, query)


def _prompt_only(batch: Batch) -> torch.Tensor:
    width = max(e.prompt_len for e in batch.items)
    return batch.input_ids[:, :width]


def _keep_one(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model accepts it: the LM head is not needed here."""
    return {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
