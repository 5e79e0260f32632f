"""Context-faithful experts (CE) from selection counts, and the other-experts control set (OE).

The paper's rule (``method="count"``): in each MoE layer, the ``k`` experts the *router-tuned* model selects
most often on the context-dependent data are the CE (``k`` = the model's top-k by default). Alternatives:

- ``"diff"``: the ``k`` experts whose count grew most from the base to the tuned model (tuned - base);
- ``"ratio"``: the ``k`` experts with the largest ``(tuned + 1) / (base + 1)`` (add-one smoothed).

Ties are broken by the higher tuned count, then the lower expert id. The OE set has, per layer, as many
experts as the CE set, drawn uniformly (seeded) from the experts that are not CE.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_interp.errors import InputError
from moe_interp.evaluation import write_json_atomic
from moe_interp.routerlens.counting import SelectionCounts
from moe_interp.routerlens.masking import ExpertSpec

METHODS = ("count", "diff", "ratio")
FRAME_COLUMNS = ["layer", "expert", "count_base", "count_tuned", "score", "rank", "set"]


def draw_other_experts(ce: ExpertSpec, num_experts: int, seed: int) -> ExpertSpec:
    """OE: per layer, ``len(ce[layer])`` experts drawn uniformly from the non-CE experts (seeded)."""
    rng = random.Random(seed)
    out: ExpertSpec = {}
    for layer in sorted(ce):
        pool = sorted(set(range(num_experts)) - set(ce[layer]))
        if len(pool) < len(ce[layer]):
            raise InputError(
                f"layer {layer}: cannot draw {len(ce[layer])} other experts from the {len(pool)} "
                "non-CE experts"
            )
        out[layer] = sorted(rng.sample(pool, len(ce[layer])))
    return out


@dataclass
class ExpertSets:
    """CE / OE selection with the evidence behind it.

    Attributes:
        frame: one row per (layer, expert): ``layer``, ``expert``, ``count_base`` (NaN without base
            counts), ``count_tuned``, ``score``, ``rank`` (1 = best in its layer), ``set`` (``"CE"``,
            ``"OE"`` or ``""``).
        method, k, oe_seed, span, num_experts: how the sets were made.
    """

    frame: pd.DataFrame
    method: str
    k: int
    oe_seed: int
    span: str | None
    num_experts: int

    def _spec(self, name: str) -> ExpertSpec:
        rows = self.frame[self.frame["set"] == name]
        out: ExpertSpec = {}
        for layer, expert in zip(rows["layer"].tolist(), rows["expert"].tolist(), strict=True):
            out.setdefault(int(layer), []).append(int(expert))
        return {layer: sorted(v) for layer, v in sorted(out.items())}

    def ce(self) -> ExpertSpec:
        """``{layer: [CE experts]}`` (pass to :func:`~moe_interp.routerlens.mask_experts`)."""
        return self._spec("CE")

    def oe(self, seed: int | None = None) -> ExpertSpec:
        """The OE set of this selection, or a fresh draw with another ``seed``."""
        if seed is None or seed == self.oe_seed:
            return self._spec("OE")
        return draw_other_experts(self.ce(), self.num_experts, seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "oe_seed": self.oe_seed,
            "span": self.span,
            "num_experts": self.num_experts,
            "ce": {str(k): v for k, v in self.ce().items()},
            "oe": {str(k): v for k, v in self.oe().items()},
            "rows": json.loads(self.frame.to_json(orient="records")),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the selection as JSON, atomically."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertSets:
        d = json.loads(Path(path).read_text())
        frame = pd.DataFrame(d["rows"], columns=FRAME_COLUMNS)
        frame["count_base"] = frame["count_base"].astype("float64")
        frame["set"] = frame["set"].fillna("").astype(str)
        return cls(frame, d["method"], int(d["k"]), int(d["oe_seed"]), d.get("span"), int(d["num_experts"]))


def _matrix(counts: SelectionCounts | torch.Tensor, span: str | None, what: str) -> torch.Tensor:
    if isinstance(counts, SelectionCounts):
        if span is None:
            if len(counts.counts) != 1:
                raise InputError(f"{what} counts hold spans {sorted(counts.counts)}; pass span=...")
            span = next(iter(counts.counts))
        return counts._get(span)
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2:
        raise InputError(f"{what} counts must be SelectionCounts or an [L, E] tensor")
    return counts


def identify_experts(
    tuned: SelectionCounts | torch.Tensor,
    base: SelectionCounts | torch.Tensor | None = None,
    *,
    layers: list[int] | None = None,
    span: str | None = None,
    method: str = "count",
    k: int | None = None,
    oe_seed: int = 0,
) -> ExpertSets:
    """Pick the CE per layer (see the module docstring) and a seeded OE control set.

    Args:
        tuned: selection counts of the router-tuned model (:class:`SelectionCounts` or [L, E] tensor).
        base: counts of the base model on the same data (needed for ``"diff"`` / ``"ratio"``).
        layers: decoder-layer number of each row (taken from ``tuned`` when it is SelectionCounts).
        span: which counted span to use (needed when the counts hold several).
        k: CE per layer; default: the model's top-k (from ``tuned``; required with tensors).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {METHODS}")
    t = _matrix(tuned, span, "tuned").to(torch.int64)
    b = _matrix(base, span, "base").to(torch.int64) if base is not None else None
    if b is not None and b.shape != t.shape:
        raise InputError(f"base counts have shape {tuple(b.shape)}, tuned counts {tuple(t.shape)}")
    if b is None and method != "count":
        raise InputError(f"method {method!r} needs the base model's counts (base=...)")
    if isinstance(tuned, SelectionCounts):
        layers = layers if layers is not None else tuned.layers
        k = k if k is not None else tuned.top_k
        span = span if span is not None else next(iter(tuned.counts))
    if layers is None:
        layers = list(range(t.shape[0]))
    if len(layers) != t.shape[0]:
        raise InputError(f"{len(layers)} layer numbers for {t.shape[0]} rows of counts")
    n_experts = t.shape[1]
    if k is None:
        raise InputError("k is required when the counts are a plain tensor")
    if not 1 <= k <= n_experts // 2:
        raise InputError(
            f"k must be in [1, {n_experts // 2}] for {n_experts} experts (the OE control set needs k other "
            f"experts per layer), got {k}"
        )
    if method == "count":
        score = t.double()
    elif method == "diff":
        score = (t - b).double()
    else:
        score = (t.double() + 1) / (b.double() + 1)
    rows = []
    ce: ExpertSpec = {}
    for i, layer in enumerate(layers):
        order = sorted(range(n_experts), key=lambda e: (-float(score[i, e]), -int(t[i, e]), e))
        rank = {e: r + 1 for r, e in enumerate(order)}
        ce[layer] = sorted(order[:k])
        for e in range(n_experts):
            rows.append(
                {
                    "layer": layer,
                    "expert": e,
                    "count_base": float(b[i, e]) if b is not None else float("nan"),
                    "count_tuned": int(t[i, e]),
                    "score": float(score[i, e]),
                    "rank": rank[e],
                    "set": "",
                }
            )
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    oe = draw_other_experts(ce, n_experts, oe_seed)
    for name, spec in (("CE", ce), ("OE", oe)):
        for layer, experts in spec.items():
            frame.loc[(frame["layer"] == layer) & frame["expert"].isin(experts), "set"] = name
    return ExpertSets(frame, method, k, oe_seed, span, n_experts)
