"""Layer-wise gains of a tuned / intervened model over a base model, as tidy frames.

Notation: ``A_m,l(i, s)`` is the attention that the query rows of example ``i`` pay to span ``s`` in layer
``l`` of model ``m``, averaged over heads (:mod:`moe_interp.analysis.spans`). Span ``"context"`` gives CAG
(context attention gain), span ``"answer"`` (the gold answer's occurrences inside the context) gives AAG.
Per example and layer::

    abs_gain_l(i) = A_tuned,l(i, s) - A_base,l(i, s)
    rel_gain_l(i) = (A_tuned,l(i, s) - A_base,l(i, s)) / max(A_base,l(i, s), eps)

Averaged over the N examples (what the figures plot)::

    CAG_l (relative)  = 1/N sum_i rel_gain_l(i)              column ``rel_gain``
    CAG_l (absolute)  = 1/N sum_i abs_gain_l(i)              column ``abs_gain``
    ratio of means    = (mean_i A_tuned,l - mean_i A_base,l) / mean_i A_base,l   column ``rel_gain_of_means``

(AAG likewise with ``s = "answer"``; examples whose answer does not occur in the context have
``A = 0`` for it and are left out of AAG.) APG (answer probability gain) from the logit lens:
``APG_l = 1/N sum_i (p_tuned,l(i) - p_base,l(i))`` and its ratio-of-means relative variant.
"""

from __future__ import annotations

import pandas as pd
import torch

from moe_interp.analysis.lens import LensResult
from moe_interp.analysis.spans import SpanAttention
from moe_interp.errors import InputError

MEASURES = {"context": "CAG", "answer": "AAG"}
EPS = 1e-8


def _paired(base: SpanAttention, tuned: SpanAttention) -> tuple[torch.Tensor, torch.Tensor]:
    if base.per_example is None or tuned.per_example is None:
        raise InputError("attention gains need per-example values: run span_attention(..., keep='examples')")
    if base.ids != tuned.ids:
        raise InputError("base and tuned attention were measured on different examples (ids differ)")
    if base.layers != tuned.layers or base.query != tuned.query:
        raise InputError(
            f"base and tuned differ in layers ({base.layers} vs {tuned.layers}) "
            f"or query rows ({base.query!r} vs {tuned.query!r})"
        )
    return base.per_example.mean(2), tuned.per_example.mean(2)  # [N, L, S]


def attention_gains_per_example(base: SpanAttention, tuned: SpanAttention) -> pd.DataFrame:
    """One row per (example, layer, measure): example, layer, measure, base, tuned, abs_gain, rel_gain."""
    b, t = _paired(base, tuned)
    frames = []
    for si, span in enumerate(base.span_names):
        bs, ts = b[..., si], t[..., si]  # [N, L]
        n, nl = bs.shape
        frames.append(
            pd.DataFrame(
                {
                    "example": [i for i in base.ids for _ in range(nl)],
                    "layer": base.layers * n,
                    "measure": MEASURES.get(span, span),
                    "base": bs.flatten().tolist(),
                    "tuned": ts.flatten().tolist(),
                    "abs_gain": (ts - bs).flatten().tolist(),
                    "rel_gain": ((ts - bs) / bs.clamp(min=EPS)).flatten().tolist(),
                    "present": (bs > 0).flatten().tolist(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def attention_gains(base: SpanAttention, tuned: SpanAttention) -> pd.DataFrame:
    """CAG / AAG per layer (formulas in the module docstring).

    Returns:
        columns layer, measure (``"CAG"``/``"AAG"``), base, tuned (mean attention), abs_gain, rel_gain,
        rel_gain_of_means, n (examples used).
    """
    per = attention_gains_per_example(base, tuned)
    per = per[per["present"] | (per["measure"] == "CAG")]
    out = (
        per.groupby(["measure", "layer"], sort=False)
        .agg(
            base=("base", "mean"),
            tuned=("tuned", "mean"),
            abs_gain=("abs_gain", "mean"),
            rel_gain=("rel_gain", "mean"),
            n=("base", "size"),
        )
        .reset_index()
    )
    out["rel_gain_of_means"] = (out["tuned"] - out["base"]) / out["base"].clip(lower=EPS)
    cols = ["layer", "measure", "base", "tuned", "abs_gain", "rel_gain", "rel_gain_of_means", "n"]
    return out[cols]


def answer_probability_gain(base: LensResult, tuned: LensResult) -> pd.DataFrame:
    """APG per layer: columns layer, base, tuned (mean probability), abs_gain (= APG), rel_gain_of_means."""
    if base.ids != tuned.ids or base.layers != tuned.layers:
        raise InputError("base and tuned logit-lens results cover different examples or layers")
    b, t = base.prob.mean(0), tuned.prob.mean(0)
    return pd.DataFrame(
        {
            "layer": base.layers,
            "base": b.tolist(),
            "tuned": t.tolist(),
            "abs_gain": (tuned.prob - base.prob).mean(0).tolist(),
            "rel_gain_of_means": ((t - b) / b.clamp(min=EPS)).tolist(),
        }
    )


def answer_probability_gain_per_example(base: LensResult, tuned: LensResult) -> pd.DataFrame:
    """One row per (example, layer): example, layer, base, tuned, abs_gain."""
    if base.ids != tuned.ids or base.layers != tuned.layers:
        raise InputError("base and tuned logit-lens results cover different examples or layers")
    n, nl = base.prob.shape
    return pd.DataFrame(
        {
            "example": [i for i in base.ids for _ in range(nl)],
            "layer": base.layers * n,
            "base": base.prob.flatten().tolist(),
            "tuned": tuned.prob.flatten().tolist(),
            "abs_gain": (tuned.prob - base.prob).flatten().tolist(),
        }
    )
