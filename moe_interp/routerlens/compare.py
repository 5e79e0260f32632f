"""The paper's comparison: Base vs router-tuned (RT) vs RT with the other experts (OE) masked vs RT with the
context-faithful experts (CE) masked, on EM / F1 and (where the memorised answer is known) Pc / Po.

Each condition is one :func:`moe_interp.evaluation.evaluate` run (resumable per condition when ``out`` is
given). OE is drawn with several seeds; its row in the summary is the mean over seeds with their spread.
Differences to the base / RT run are *paired* (same examples), with the standard error of the mean
per-example difference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import EvalFrame, evaluate
from moe_interp.routerlens.counting import _distributed
from moe_interp.routerlens.data import to_examples
from moe_interp.routerlens.experts import ExpertSets
from moe_interp.routerlens.masking import mask_experts
from moe_interp.routerlens.tuning import applied_router_weights

METRICS = ("EM", "F1", "Pc", "Po")
_COLUMN = {"EM": "em", "F1": "f1", "Pc": "pc", "Po": "po"}
CONDITION_ORDER = ("Base", "RT", "RT w/o OE", "RT w/o CE")


@dataclass(frozen=True)
class Condition:
    """One evaluated setting: router weights (or None = base) and experts masked (or None)."""

    name: str
    router_weights: Any = None
    masked: Mapping[int, Sequence[int]] | None = None
    seed: int | None = None

    @property
    def key(self) -> str:
        base = self.name.replace(" ", "_").replace("/", "")
        return base if self.seed is None else f"{base}_seed{self.seed}"


@contextmanager
def applied(model: nn.Module, condition: Condition) -> Iterator[None]:
    """Apply a condition's router weights and masks for the ``with`` block (restored afterwards)."""
    with ExitStack() as stack:
        if condition.router_weights is not None:
            stack.enter_context(applied_router_weights(model, condition.router_weights))
        if condition.masked:
            stack.enter_context(mask_experts(model, dict(condition.masked)))
        yield


def paper_conditions(
    router_weights: Any, experts: ExpertSets, oe_seeds: Sequence[int] = (0, 1, 2, 3, 4)
) -> list[Condition]:
    """Base, RT, RT with OE masked (one condition per seed), RT with CE masked."""
    if not oe_seeds:
        raise InputError("oe_seeds is empty: draw at least one OE set")
    return [
        Condition("Base"),
        Condition("RT", router_weights),
        *[Condition("RT w/o OE", router_weights, experts.oe(s), s) for s in oe_seeds],
        Condition("RT w/o CE", router_weights, experts.ce()),
    ]


def evaluate_sharded(
    model: nn.Module,
    tokenizer,
    examples: Sequence[QAExample],
    *,
    out: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> EvalFrame:
    """:func:`~moe_interp.evaluation.evaluate`, data-parallel under ``accelerate launch`` / ``torchrun``:
    each process evaluates examples ``i % world == rank`` (results file ``out`` gets a ``.rankR`` suffix)
    and the rows are gathered, so every process returns the full frame in input order."""
    rank, world = _distributed()
    if world == 1:
        return evaluate(model, tokenizer, examples, out=out, **kwargs)
    import torch.distributed as dist

    part_out = None if out is None else Path(out).with_suffix(f".rank{rank}of{world}.jsonl")
    part = evaluate(model, tokenizer, list(examples)[rank::world], out=part_out, **kwargs)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, pd.DataFrame(part))
    frame = pd.concat(parts, ignore_index=True).set_index("id").loc[[ex.id for ex in examples]].reset_index()
    result = EvalFrame(frame[list(part.columns)])
    result.attrs.update(part.attrs)
    return result


def _run_stats(name: str, seed: int | None, frame: EvalFrame) -> dict[str, Any]:
    row: dict[str, Any] = {"condition": name, "seed": seed, "n": len(frame)}
    for metric in METRICS:
        values = frame[_COLUMN[metric]].astype(float).dropna()
        p = float(values.mean()) if len(values) else math.nan
        row[metric] = p
        row[f"{metric}_se"] = (
            float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        )
    return row


def paired_difference(a: EvalFrame, b: EvalFrame, metric: str = "Pc") -> tuple[float, float]:
    """Mean per-example difference ``a - b`` of ``metric`` over shared examples and its standard error."""
    col = _COLUMN[metric]
    joined = pd.merge(a[["id", col]], b[["id", col]], on="id", suffixes=("_a", "_b")).dropna()
    d = joined[f"{col}_a"].astype(float) - joined[f"{col}_b"].astype(float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), math.nan
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


@dataclass
class Comparison:
    """Results of :func:`compare`.

    Attributes:
        runs: one row per evaluated condition (OE once per seed): condition, seed, n, and for each metric
            its mean and standard error (``Pc``, ``Pc_se``, ...).
        summary: one row per condition (OE averaged over seeds): metric means, ``<metric>_se`` (standard
            error; for OE the mean of the per-seed standard errors), ``<metric>_sd`` (spread over OE seeds,
            0 for single runs), and paired Pc differences ``dPc_vs_base`` / ``dPc_vs_RT`` with their SE
            (for OE averaged over seeds).
        frames: condition key -> per-example :class:`EvalFrame`.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    frames: dict[str, EvalFrame]

    def figure(self, metrics: Sequence[str] = METRICS, title: str = "Router Lens on the demo model"):
        """Grouped plotly bar chart: metric on x, one bar per condition; error bars = SE (OE: spread
        over seeds combined with the mean SE)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for _, row in self.summary.iterrows():
            ys = [row[m] for m in metrics]
            err = [
                math.sqrt(row[f"{m}_se"] ** 2 + row[f"{m}_sd"] ** 2)
                if not math.isnan(row[f"{m}_se"])
                else 0.0
                for m in metrics
            ]
            fig.add_bar(name=row["condition"], x=list(metrics), y=ys, error_y=dict(type="data", array=err))
        fig.update_layout(barmode="group", title=title, yaxis_title="rate", yaxis_range=[0, 1])
        return fig


def compare(
    model: nn.Module,
    tokenizer,
    examples: Sequence[QAExample | Mapping[str, Any]],
    conditions: Sequence[Condition],
    *,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **evaluate_kwargs: Any,
) -> Comparison:
    """Evaluate ``examples`` under each condition (see :func:`paper_conditions`) and summarise.

    ``evaluate_kwargs`` go to :func:`~moe_interp.evaluation.evaluate` (mode, max_new_tokens, batch_size,
    match, template, ...). With ``out``, each condition writes ``<out>/<key>.jsonl`` and a rerun resumes.
    The model is left as it was (weights restored, masks removed).
    """
    exs = to_examples(examples)
    if not exs:
        raise InputError("no examples to evaluate")
    keys = [c.key for c in conditions]
    if len(set(keys)) != len(keys):
        raise InputError(f"conditions must be distinct, got keys {keys}")
    folder = Path(out) if out is not None else None
    frames: dict[str, EvalFrame] = {}
    runs = []
    for cond in conditions:
        path = folder / f"{cond.key}.jsonl" if folder is not None else None
        with applied(model, cond), torch.no_grad():
            frame = evaluate_sharded(model, tokenizer, exs, out=path, progress=progress, **evaluate_kwargs)
        frames[cond.key] = frame
        runs.append(_run_stats(cond.name, cond.seed, frame))
    runs_frame = pd.DataFrame(runs)
    base = next((frames[c.key] for c in conditions if c.name == "Base"), None)
    rt = next((frames[c.key] for c in conditions if c.name == "RT"), None)
    summary = []
    names = list(dict.fromkeys(c.name for c in conditions))
    for name in names:
        group = [c for c in conditions if c.name == name]
        sub = runs_frame[runs_frame["condition"] == name]
        row: dict[str, Any] = {"condition": name, "runs": len(group), "n": int(sub["n"].iloc[0])}
        for metric in METRICS:
            row[metric] = float(sub[metric].mean())
            row[f"{metric}_se"] = float(sub[f"{metric}_se"].mean())
            row[f"{metric}_sd"] = float(sub[metric].std(ddof=1)) if len(sub) > 1 else 0.0
        for ref_name, ref in (("base", base), ("RT", rt)):
            if ref is None:
                continue
            diffs = [paired_difference(frames[c.key], ref, "Pc") for c in group]
            row[f"dPc_vs_{ref_name}"] = sum(d for d, _ in diffs) / len(diffs)
            row[f"dPc_vs_{ref_name}_se"] = sum(s for _, s in diffs) / len(diffs)
        summary.append(row)
    return Comparison(runs=runs_frame, summary=pd.DataFrame(summary), frames=frames)
