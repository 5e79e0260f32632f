"""Evaluation of trained methods and the paper's table: method x data set (EM / F1), trainable parameters,
closed-book accuracy on memorised facts before / after (forgetting), and a plotly bar figure."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from moe_interp.ceft.deltas import applied_deltas
from moe_interp.ceft.engine import CEFTResult
from moe_interp.data.example import QAExample
from moe_interp.evaluation import evaluate

ROW_COLUMNS = ["method", "dataset", "n", "EM", "F1", "Pc", "Po", "trainable", "trainable_pct_of_fft"]


def evaluate_methods(
    model: nn.Module,
    tokenizer,
    results: Mapping[str, CEFTResult | None],
    datasets: Mapping[str, Sequence[QAExample]],
    *,
    out: str | os.PathLike[str] | None = None,
    total: int | None = None,
    **eval_kwargs: Any,
) -> pd.DataFrame:
    """Evaluate every method (``None`` = the untrained model) on every data set.

    Returns one row per (method, dataset): ``n``, ``EM``, ``F1``, ``Pc``, ``Po`` (proportions; NaN where a
    metric does not apply), ``trainable`` (exact count; 0 for the base model). Per-example answers go to
    ``out/<method>/<dataset>.jsonl`` (resumable, see :func:`moe_interp.evaluation.evaluate`).
    """
    rows = []
    fft = next((r.trainable for r in results.values() if r is not None and r.method.kind == "full"), None)
    full = fft or total
    for name, res in results.items():
        for ds, examples in datasets.items():
            file = Path(out) / name / f"{ds}.jsonl" if out is not None else None
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
            if res is None:
                frame = evaluate(model, tokenizer, examples, out=file, progress=False, **eval_kwargs)
            else:
                with applied_deltas(model, res.source):
                    frame = evaluate(model, tokenizer, examples, out=file, progress=False, **eval_kwargs)
            trainable = 0 if res is None else res.trainable
            rows.append(
                {
                    "method": name,
                    "dataset": ds,
                    "n": len(frame),
                    "EM": frame.EM,
                    "F1": frame.F1,
                    "Pc": frame.Pc,
                    "Po": frame.Po,
                    "trainable": trainable,
                    "trainable_pct_of_fft": 100.0 * trainable / full if full else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def paper_table(rows: pd.DataFrame, forgetting: str | None = "memorised", base: str = "Base") -> pd.DataFrame:
    """The paper's table: one row per method; ``EM`` / ``F1`` (in %) per context data set, trainable
    parameters (and % of FFT's); for the ``forgetting`` data set (closed-book) its accuracy (EM, %) and the
    change against ``base``."""
    ctx = rows[rows["dataset"] != forgetting]
    wide = ctx.pivot(index="method", columns="dataset", values=["EM", "F1"]) * 100
    wide = wide.swaplevel(0, 1, axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    wide.columns = [f"{ds} {m}" for ds, m in wide.columns]
    order = list(dict.fromkeys(rows["method"]))
    table = wide.reindex(order)
    if forgetting is not None and (rows["dataset"] == forgetting).any():
        mem = rows[rows["dataset"] == forgetting].set_index("method")["EM"] * 100
        table[f"{forgetting} closed-book EM"] = mem.reindex(order)
        if base in mem.index:
            table[f"{forgetting} change vs {base}"] = mem.reindex(order) - mem[base]
    params = rows.drop_duplicates("method").set_index("method")
    table["trainable params"] = params["trainable"].reindex(order).astype("int64")
    table["% of FFT"] = params["trainable_pct_of_fft"].reindex(order)
    return table


def figure(rows: pd.DataFrame, metric: str = "EM"):
    """Grouped bars: ``metric`` (in %) per method, one group per data set; hover shows trainable params."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method, g in rows.groupby("method", sort=False):
        fig.add_bar(
            name=f"{method} ({int(g['trainable'].iloc[0]):,} params)",
            x=g["dataset"],
            y=100 * g[metric],
            hovertemplate="%{x}: %{y:.1f}%<extra>" + str(method) + "</extra>",
        )
    fig.update_layout(
        barmode="group",
        title=f"CEFT and baselines: {metric} per data set (memorised = closed-book, forgetting)",
        yaxis_title=f"{metric} (%)",
        xaxis_title="data set",
    )
    return fig


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a GitHub markdown table (numbers with one decimal; counts with thousands separators)."""
    cols = list(table.columns)
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c == "trainable params":
                cells.append(f"{int(v):,}")
            elif isinstance(v, float) and math.isnan(v):
                cells.append("n/a")
            else:
                cells.append(f"{v:+.1f}" if "change" in c else f"{v:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
