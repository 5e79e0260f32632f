"""Every paper figure from the demo model, as interactive HTML and static PNG, in one consistent style.

    python -m moe_interp.figures [--runs runs] [--out figures] [--fast]

The figures are drawn from the outputs of the three pipelines, found in ``--runs``:
``routerlens/`` (:mod:`moe_interp.routerlens.run`), ``analysis/`` (:mod:`moe_interp.analysis.run`) and
``ceft/`` (:mod:`moe_interp.ceft.run`). A pipeline whose output is missing is run first (they are resumable,
so an interrupted run continues). ``--fast`` runs missing pipelines with small limits into ``<runs>/fast/``
(a few minutes on a laptop CPU) and still prefers complete full-size outputs where they exist.

Each ``*_figure`` function below takes plain data (frames, counts) and returns a styled
``plotly.graph_objects.Figure``; :func:`render_all` draws them all from loaded :class:`Inputs`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from moe_interp.analysis.figures import apg_figure, expert_heatmap, gains_figure, token_difference_figure
from moe_interp.plotting import INK, MUTED, plot_selection_heatmap, plot_token_routing, style

if TYPE_CHECKING:
    from moe_interp.moetrace import MoETrace
    from moe_interp.routerlens.counting import SelectionCounts
    from moe_interp.routerlens.experts import ExpertSets

# ---------------------------------------------------------------------------------------------- style
CONDITION_COLOURS = {"Base": "#8c8c8c", "RT": "#1f77b4", "RT w/o OE": "#2ca02c", "RT w/o CE": "#d62728"}
SET_COLOURS = {"CE": "#d62728", "OE": "#2ca02c", "": "#c9ced6"}
SET_NAMES = {"CE": "CE (context-faithful)", "OE": "OE (control, seed 0)", "": "other experts"}
LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def _zero_aligned(left: Iterable[float], right: Iterable[float], pad: float = 0.08) -> tuple[list, list]:
    """Ranges for two y-axes that put both zeros at the same height (each range includes its data)."""
    spans = []
    for values in (list(left), list(right)):
        lo, hi = min(0.0, *values), max(0.0, *values)
        width = (hi - lo) or 1.0
        spans.append((lo - pad * width * (lo < 0), hi + pad * width * (hi > 0) if hi > lo else 1.0))
    fracs = [-lo / (hi - lo) for lo, hi in spans]
    f = min(max((max(fracs) + min(fracs)) / 2, 0.02), 0.98)  # share of the axis below zero
    out = []
    for lo, hi in spans:
        r = max(-lo / f, hi / (1 - f))
        out.append([-f * r, (1 - f) * r])
    return out[0], out[1]


def _pct(q: float) -> str:
    return f"{q:.0f}" if q >= 10 else f"{q:.1f}" if q >= 1 else f"{q:.2g}"


def _si(n: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


# ---------------------------------------------------------------------------------------------- figures
def routing_heatmap_figure(
    base: SelectionCounts, tuned: SelectionCounts | None = None, *, span: str = "all"
) -> go.Figure:
    """Layer x expert selection share (each row sums to 1) of the base model, and of the router-tuned one
    beside it on the same colour scale."""
    panels = [("base routers", base)] + ([("router-tuned (RT)", tuned)] if tuned is not None else [])
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[p for p, _ in panels], horizontal_spacing=0.07
    )
    zmax = max(float(c.share(span).max()) for _, c in panels)
    for col, (_, counts) in enumerate(panels, start=1):
        trace = plot_selection_heatmap(counts.counts[span], layers=counts.layers).data[0]
        trace.update(
            zmin=0, zmax=zmax, showscale=col == len(panels), colorbar=dict(title="share"), xgap=1, ygap=1
        )
        fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text="expert", type="category", dtick=1, showgrid=False, row=1, col=col)
        fig.update_yaxes(autorange="reversed", type="category", showgrid=False, row=1, col=col)
    fig.update_yaxes(title_text="MoE layer", row=1, col=1)
    n = base.counts[span].shape[1]
    return style(
        fig,
        "Expert selection frequency per layer",
        subtitle=f"share of top-{base.top_k} selections over {span!r} tokens of {base.n_examples} "
        "conflict_tune examples",
        height=170 + 60 * len(base.layers),
        width=max(620, 200 + 26 * n * len(panels)),
        headroom=16,
    )


def routing_difference_figure(
    base: SelectionCounts, tuned: SelectionCounts, *, span: str = "all"
) -> go.Figure:
    """Tuned-minus-base selection share per layer and expert (diverging, centred at 0)."""
    diff = (tuned.share(span) - base.share(span)).float()
    fig = plot_selection_heatmap(diff, layers=tuned.layers, normalize=False, diverging=True)
    lim = float(diff.abs().max()) or 1.0
    fig.data[0].update(
        zmin=-lim,
        zmax=lim,
        customdata=None,
        xgap=1,
        ygap=1,
        colorbar=dict(title="Δ share"),
        hovertemplate="layer %{y}<br>expert %{x}<br>tuned - base share %{z:+.4f}<extra></extra>",
    )
    fig.update_xaxes(dtick=1, showgrid=False)
    fig.update_yaxes(showgrid=False)
    return style(
        fig,
        "Router tuning shifts selections: tuned − base",
        subtitle=f"difference of selection shares over {span!r} tokens (blue = chosen more after tuning)",
        height=170 + 60 * len(tuned.layers),
        width=max(620, 220 + 34 * diff.shape[1]),
    )


def token_routing_figure(trace: MoETrace, example: int = 0, *, max_tokens: int = 80) -> go.Figure:
    """Tokens x layers of one prompt, colour = top-1 expert (hover: top-k experts, weights, span)."""
    fig = plot_token_routing(trace, example, max_tokens=max_tokens)
    n = min(len(trace.tokens), max_tokens)
    fig.update_xaxes(zeroline=False)
    return style(
        fig,
        "Per-token routing of one conflict prompt",
        subtitle=f"colour = top-1 expert; the band under the grid marks the context and answer spans; hover "
        f"for the top-{trace.top_k} experts and their weights",
        height=330 + 40 * len(trace.layers),
        width=max(900, 140 + 17 * n),
        legend=True,
    )


def ce_oe_figure(experts: ExpertSets) -> go.Figure:
    """Per layer, each expert's selection share under the tuned routers (bars, coloured by CE / OE / other)
    and under the base routers (ticks)."""
    frame = experts.frame.copy()
    layers = sorted(frame["layer"].unique())
    fig = make_subplots(
        rows=len(layers),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[f"layer {n}: CE = experts {experts.ce().get(int(n), [])}" for n in layers],
    )
    shown: set[str] = set()
    for row, layer in enumerate(layers, start=1):
        part = frame[frame["layer"] == layer].sort_values("expert")
        tuned = part["count_tuned"] / max(part["count_tuned"].sum(), 1)
        for name in ("CE", "OE", ""):
            sel = part["set"] == name
            fig.add_trace(
                go.Bar(
                    x=part.loc[sel, "expert"].astype(str),
                    y=tuned[sel],
                    name=SET_NAMES[name],
                    marker_color=SET_COLOURS[name],
                    legendgroup=name,
                    showlegend=name not in shown,
                    hovertemplate="expert %{x}: tuned share %{y:.3f}<extra>" + SET_NAMES[name] + "</extra>",
                ),
                row=row,
                col=1,
            )
            shown.add(name)
        if part["count_base"].notna().all():
            base = part["count_base"] / max(part["count_base"].sum(), 1)
            fig.add_trace(
                go.Scatter(
                    x=part["expert"].astype(str),
                    y=base,
                    mode="markers",
                    name="base routers",
                    marker=dict(symbol="line-ew-open", size=18, color=INK, line=dict(width=2.5, color=INK)),
                    legendgroup="base",
                    showlegend=row == 1,
                    hovertemplate="expert %{x}: base share %{y:.3f}<extra></extra>",
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(title_text="share", rangemode="tozero", row=row, col=1)
    fig.update_xaxes(
        type="category", categoryorder="array", categoryarray=[str(e) for e in range(experts.num_experts)]
    )
    fig.update_xaxes(title_text="expert", row=len(layers), col=1)
    fig.update_layout(barmode="overlay", bargap=0.25)
    return style(
        fig,
        "Context-faithful experts (CE) and the control set (OE)",
        subtitle=f"selection share of each expert with tuned routers (bars) and base routers (ticks); "
        f"CE = top {experts.k} per layer by the {experts.method!r} rule",
        height=190 + 180 * len(layers),
        width=900,
        legend=True,
        headroom=18,
    )


def masking_figure(summary: pd.DataFrame, metrics: Sequence[str] = ("EM", "F1")) -> go.Figure:
    """Grouped bars (in %): one group per metric, one bar per condition (Base, RT, RT w/o OE, RT w/o CE);
    error bars = standard error (OE: combined with the spread over seeds)."""
    fig = go.Figure()
    for _, row in summary.iterrows():
        name = str(row["condition"])
        err = []
        for m in metrics:
            se = float(row.get(f"{m}_se", math.nan))
            sd = float(row.get(f"{m}_sd", 0.0) or 0.0)
            err.append(0.0 if math.isnan(se) else 100 * math.hypot(se, sd))
        ys = [100 * float(row[m]) for m in metrics]
        runs = int(row.get("runs", 1))
        fig.add_bar(
            name=name + (f" (mean of {runs} seeds)" if runs > 1 else ""),
            x=list(metrics),
            y=ys,
            error_y=dict(type="data", array=err, color=MUTED, thickness=1.2, width=6),
            marker_color=CONDITION_COLOURS.get(name),
            text=[f"{y:.1f}" for y in ys],
            textposition="inside",
            insidetextanchor="start",
            textfont=dict(color="white"),
            hovertemplate="%{x}: %{y:.1f}% ± %{error_y.array:.1f}<extra>" + name + "</extra>",
        )
    top = max((b.y[i] + b.error_y.array[i] for b in fig.data for i in range(len(b.y))), default=100)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="score (%)", range=[0, min(100, top * 1.08 + 2)])
    fig.update_xaxes(title_text="metric on conflict_test", showgrid=False)
    n = int(summary["n"].iloc[0]) if "n" in summary else None
    return style(
        fig,
        "Masking experts of the router-tuned model",
        subtitle="RT w/o CE: context-faithful experts masked; RT w/o OE: as many other experts masked"
        + (f"; n = {n} examples, error bars = SE" if n else ""),
        height=520,
        width=820,
        legend=True,
    )


GAIN_LABELS = {
    "rel_gain_of_means": "relative change of the mean",
    "rel_gain": "mean per-example relative change",
    "abs_gain": "absolute change",
}


def gains_lines_figure(
    gains: pd.DataFrame, *, value: str = "rel_gain_of_means", comparison: str = ""
) -> go.Figure:
    """CAG (left axis) and AAG (right axis) per layer, zeros aligned; each axis coloured like its line.

    The default ``value`` is the relative change of the per-layer mean attention: the per-example mean
    (``rel_gain``) is dominated by examples whose base attention to the span is near zero."""
    fig = gains_figure(gains, value=value)
    label = GAIN_LABELS.get(value, value)
    for trace, colour in zip(fig.data, LINE_COLOURS, strict=False):
        trace.update(line=dict(color=colour, width=2.5), marker=dict(size=8))
    left, right = _zero_aligned(fig.data[0].y, fig.data[1].y)
    axis = dict(zeroline=True, zerolinecolor="#9aa3ad", zerolinewidth=1.5, tickmode="auto")
    fig.update_yaxes(
        title_text=f"CAG: context attention gain<br>({label})",
        range=left,
        title_font=dict(color=LINE_COLOURS[0]),
        tickfont=dict(color=LINE_COLOURS[0]),
        secondary_y=False,
        **axis,
    )
    fig.update_yaxes(
        title_text=f"AAG: answer attention gain<br>({label})",
        range=right,
        title_font=dict(color=LINE_COLOURS[1]),
        tickfont=dict(color=LINE_COLOURS[1]),
        showgrid=False,
        secondary_y=True,
        **axis,
    )
    fig.update_xaxes(title_text="layer", showgrid=False, zeroline=False)
    fig = style(
        fig,
        "Attention amplification per layer (CAG / AAG)",
        subtitle=comparison or None,
        height=480,
        width=820,
        legend=True,
    )
    return fig.update_layout(margin=dict(r=90))


def apg_line_figure(apg: pd.DataFrame, *, value: str = "abs_gain", comparison: str = "") -> go.Figure:
    """APG per layer (left axis) with the logit-lens answer probability of both models (right axis)."""
    fig = apg_figure(apg, value=value)
    for trace, colour in zip(fig.data, (LINE_COLOURS[2], LINE_COLOURS[0], LINE_COLOURS[1]), strict=False):
        trace.update(line=dict(color=colour, width=2.5 if trace.name == "APG" else 2))
    fig.data[0].update(marker=dict(size=8))
    names = {"p(base)": "p(answer), base", "p(tuned)": "p(answer), tuned"}
    for trace in fig.data[1:]:
        trace.update(name=names.get(trace.name, trace.name))
    fig.update_yaxes(
        title_text=f"APG: answer probability gain ({value})",
        zeroline=True,
        zerolinecolor="#9aa3ad",
        title_font=dict(color=LINE_COLOURS[2]),
        tickfont=dict(color=LINE_COLOURS[2]),
        secondary_y=False,
    )
    fig.update_yaxes(
        title_text="p(context answer), logit lens", showgrid=False, tickmode="auto", secondary_y=True
    )
    fig.update_xaxes(title_text="layer", showgrid=False, zeroline=False)
    fig = style(
        fig,
        "Answer probability gain per layer (APG)",
        subtitle=comparison or None,
        height=480,
        width=820,
        legend=True,
    )
    return fig.update_layout(margin=dict(r=90))


def token_difference_text_figure(
    diff: pd.DataFrame, *, layers: Iterable[int] | None = None, per_line: int = 14, comparison: str = ""
) -> go.Figure:
    """The prompt's tokens in reading order, each cell coloured by tuned − base attention of the last
    prompt token to it (red = more attention after tuning), one panel per layer."""
    if layers is not None:
        diff = diff[diff["layer"].isin(list(layers))]
    fig = token_difference_figure(diff, per_line=per_line)
    n_layers = diff["layer"].nunique()
    lines = math.ceil((diff["position"].max() + 1) / per_line)
    for trace in fig.data:
        trace.update(textfont=dict(size=12), xgap=2, ygap=2, colorbar=dict(title="tuned − base", len=0.5))
    fig.update_xaxes(showgrid=False, zeroline=False, showline=False)
    fig.update_yaxes(showgrid=False, zeroline=False, showline=False)
    return style(
        fig,
        "Attention difference over a prompt (tuned − base)",
        subtitle=(comparison + "; " if comparison else "")
        + "colour = change in the last prompt token's attention to each token (red = more)",
        height=110 + n_layers * (50 + 28 * lines),
        width=1100,
        headroom=16,
    )


def ceft_figure(table: pd.DataFrame) -> go.Figure:
    """CEFT vs FFT and the baselines: EM per data set (left) and trainable parameters (right, log scale),
    from the CEFT pipeline's ``table.csv`` (index = method)."""
    methods = [str(m) for m in table.index]
    scores = [c for c in table.columns if str(c).endswith(" EM") and "change" not in str(c)]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1)
    colours = ("#1f77b4", "#8c8c8c", "#ff7f0e", "#2ca02c")
    for col, colour in zip(scores, colours, strict=False):
        label = str(col).replace(" EM", "").replace("closed-book", "facts, closed-book (forgetting)")
        fig.add_trace(
            go.Bar(
                x=methods,
                y=table[col],
                name=f"EM on {label}",
                marker_color=colour,
                text=[f"{v:.1f}" for v in table[col]],
                textposition="outside",
                textfont=dict(color=INK, size=11),
                cliponaxis=False,
                hovertemplate="%{x}: %{y:.1f}%<extra>" + label + "</extra>",
            ),
            row=1,
            col=1,
        )
    params = table["trainable params"].astype(float)
    pct = table["% of FFT"] if "% of FFT" in table else pd.Series(math.nan, index=table.index)
    keep = (params > 0).tolist()
    kept = [m for m, k in zip(methods, keep, strict=True) if k]
    fig.add_trace(
        go.Bar(
            x=kept,
            y=params[keep],
            name="trainable parameters",
            marker_color=["#d62728" if m.startswith("CEFT") else "#6e7781" for m in kept],
            text=[
                _si(p) if math.isnan(q) else f"{_si(p)}<br>{_pct(q)}% of FFT"
                for p, q in zip(params[keep], pct[keep], strict=True)
            ],
            textposition="outside",
            textfont=dict(color=INK, size=11),
            cliponaxis=False,
            showlegend=False,
            hovertemplate="%{x}: %{y:,} trainable<extra></extra>",
        ),
        row=1,
        col=2,
    )
    top = float(table[scores].max().max()) if scores else 100.0
    fig.update_yaxes(title_text="EM (%)", range=[0, min(115, top * 1.12 + 2)], row=1, col=1)
    lo = math.log10(max(params[keep].min(), 1)) if any(keep) else 0.0
    hi = math.log10(max(params[keep].max(), 10)) if any(keep) else 1.0
    fig.update_yaxes(
        type="log", range=[lo - 0.6, hi + 0.9], dtick=1, title_text="trainable parameters (log)", row=1, col=2
    )
    fig.update_xaxes(title_text="method", showgrid=False)
    fig.update_layout(barmode="group", bargap=0.2)
    return style(
        fig,
        "CEFT vs full fine-tuning and baselines",
        subtitle="same data and budget; left: accuracy (EM) on conflict_test and on memorised facts "
        "closed-book (forgetting); right: parameters trained",
        height=540,
        width=1150,
        legend=True,
    )


def attribution_figure(
    effects: pd.DataFrame, *, value: str = "delta_logprob", ce: Mapping[int, Sequence[int]] | None = None
) -> go.Figure:
    """Layer x expert heatmap of the exact effect of masking each expert on log p(context answer)
    (red = masking hurts); ``ce`` cells (e.g. Router Lens CE) are circled."""
    fig = expert_heatmap(effects, value=value)
    fig.data[0].update(
        y=[f"L{y}" for y in fig.data[0].y],
        colorbar=dict(title="Δ log p" if value == "delta_logprob" else value),
        hovertemplate="layer %{y}<br>expert %{x}<br>" + value + " %{z:.4f}<extra></extra>",
        xgap=1,
        ygap=1,
    )
    if ce:
        fig.add_trace(
            go.Scatter(
                x=[str(e) for layer in sorted(ce) for e in ce[layer]],
                y=[f"L{layer}" for layer in sorted(ce) for _ in ce[layer]],
                mode="markers",
                name="Router Lens CE (circled)",
                marker=dict(symbol="circle-open", size=22, color=INK, line=dict(width=2.5, color=INK)),
                hovertemplate="CE: layer %{y}, expert %{x}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="expert", type="category", showgrid=False)
    fig.update_yaxes(title_text="MoE layer", type="category", autorange="reversed", showgrid=False)
    n_layers, n_experts = effects["layer"].nunique(), effects["expert"].nunique()
    return style(
        fig,
        "Per-expert attribution: effect of masking one expert",
        subtitle="change in log p(context answer) when the expert is masked (exact, mean over examples; "
        "red = the expert helps the context answer)",
        height=170 + 60 * n_layers + (36 if ce else 0),
        width=max(700, 220 + 36 * n_experts),
        legend=bool(ce),
    )


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything the figures are drawn from (each part optional; missing parts skip their figures)."""

    counts_base: SelectionCounts | None = None
    counts_tuned: SelectionCounts | None = None
    experts: ExpertSets | None = None
    masking: pd.DataFrame | None = None
    gains: pd.DataFrame | None = None
    apg: pd.DataFrame | None = None
    token_diff: pd.DataFrame | None = None
    effects: pd.DataFrame | None = None
    ceft_table: pd.DataFrame | None = None
    trace: MoETrace | None = None
    comparison: str = ""
    sources: dict[str, str] = field(default_factory=dict)


def load_inputs(routerlens: Path | None, analysis: Path | None, ceft: Path | None) -> Inputs:
    """Read the pipelines' output folders (any may be None or incomplete)."""
    from moe_interp.routerlens.counting import SelectionCounts
    from moe_interp.routerlens.experts import ExpertSets

    inp = Inputs()
    if routerlens is not None:
        inp.sources["routerlens"] = str(routerlens)
        if (routerlens / "counts_base.json").is_file():
            inp.counts_base = SelectionCounts.load(routerlens / "counts_base.json")
        if (routerlens / "counts_tuned.json").is_file():
            inp.counts_tuned = SelectionCounts.load(routerlens / "counts_tuned.json")
        if (routerlens / "experts_count_all.json").is_file():
            inp.experts = ExpertSets.load(routerlens / "experts_count_all.json")
        if (routerlens / "compare_count_all" / "summary.csv").is_file():
            inp.masking = pd.read_csv(routerlens / "compare_count_all" / "summary.csv")
    if analysis is not None:
        inp.sources["analysis"] = str(analysis)
        for attr, name in (
            ("gains", "cag_aag"),
            ("apg", "apg"),
            ("token_diff", "token_difference"),
            ("effects", "expert_effects"),
        ):
            if (analysis / f"{name}.csv").is_file():
                frame = pd.read_csv(analysis / f"{name}.csv", keep_default_na=name != "token_difference")
                setattr(inp, attr, frame)
        if (analysis / "summary.json").is_file():
            inp.comparison = json.loads((analysis / "summary.json").read_text()).get("comparison", "")
    if ceft is not None and (ceft / "table.csv").is_file():
        inp.sources["ceft"] = str(ceft)
        inp.ceft_table = pd.read_csv(ceft / "table.csv", index_col=0)
    return inp


def demo_trace(router_weights: Path | None = None, index: int = 0) -> MoETrace:
    """Trace one conflict_test prompt through the demo model (with tuned routers if given)."""
    from contextlib import nullcontext

    import moe_interp
    from moe_interp.demo import load_split
    from moe_interp.prompts import build_prompt
    from moe_interp.routerlens.tuning import applied_router_weights

    model, tok = moe_interp.load_demo()
    ex = load_split("conflict_test")[index]
    ctx = applied_router_weights(model, router_weights) if router_weights is not None else nullcontext()
    with ctx:
        return moe_interp.trace(
            model,
            build_prompt(ex["context"], ex["question"]),
            context=ex["context"],
            answer=ex["context_answer"],
            tokenizer=tok,
        )


# (file stem, what it shows): the order of figures/README.md
FIGURES: dict[str, str] = {
    "routing_heatmap": "Layer x expert selection share on conflict_tune, base and router-tuned routers.",
    "routing_difference": "Tuned − base selection share per layer and expert (diverging colour scale).",
    "token_routing": "Per-token routing of one conflict_test prompt: top-1 expert per token and layer, "
    "context / answer spans marked.",
    "ce_oe_selection": "Per layer, each expert's selection share (tuned bars, base ticks); CE, OE coloured.",
    "masking_comparison": "EM and F1 on conflict_test for Base, RT, RT w/o OE, RT w/o CE (Router Lens).",
    "cag_aag": "Context and answer attention gains per layer (two y-axes).",
    "apg": "Answer probability gain per layer (logit lens), with both models' answer probability.",
    "token_attention_difference": "The prompt as coloured text: change in the last token's attention to each "
    "token, per layer.",
    "ceft_vs_fft": "CEFT vs FFT, RT, random experts and LoRA: EM and trainable parameters.",
    "expert_attribution": "Exact effect on log p(context answer) of masking each expert; Router Lens CE "
    "circled.",
}


def render_all(inp: Inputs) -> dict[str, go.Figure]:
    """Every figure the inputs allow, by file stem (see :data:`FIGURES`)."""
    figs: dict[str, go.Figure] = {}
    span = "all"
    if inp.counts_base is not None:
        figs["routing_heatmap"] = routing_heatmap_figure(inp.counts_base, inp.counts_tuned, span=span)
        if inp.counts_tuned is not None:
            figs["routing_difference"] = routing_difference_figure(
                inp.counts_base, inp.counts_tuned, span=span
            )
    if inp.trace is not None:
        figs["token_routing"] = token_routing_figure(inp.trace)
    if inp.experts is not None:
        figs["ce_oe_selection"] = ce_oe_figure(inp.experts)
    if inp.masking is not None:
        figs["masking_comparison"] = masking_figure(inp.masking)
    if inp.gains is not None:
        figs["cag_aag"] = gains_lines_figure(inp.gains, comparison=inp.comparison)
    if inp.apg is not None:
        figs["apg"] = apg_line_figure(inp.apg, comparison=inp.comparison)
    if inp.token_diff is not None:
        figs["token_attention_difference"] = token_difference_text_figure(inp.token_diff)
    if inp.ceft_table is not None:
        figs["ceft_vs_fft"] = ceft_figure(inp.ceft_table)
    if inp.effects is not None:
        ce = inp.experts.ce() if inp.experts is not None else None
        figs["expert_attribution"] = attribution_figure(inp.effects, ce=ce)
    return {k: figs[k] for k in FIGURES if k in figs}


def write_figures(
    figs: Mapping[str, go.Figure], out: Path, *, png: bool = True, scale: float = 2.0
) -> list[Path]:
    """``<stem>.html`` for each figure (plotly.js written once beside them: offline, small files) and, when
    kaleido finds a Chrome/Chromium, ``<stem>.png``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figs.items():
        fig.write_html(out / f"{stem}.html", include_plotlyjs="directory", full_html=True)
        written.append(out / f"{stem}.html")
    if png and figs:
        import plotly.io as pio

        paths = [out / f"{stem}.png" for stem in figs]
        try:
            sizes = [(f.layout.width or 700, f.layout.height or 500) for f in figs.values()]
            pio.write_images(
                list(figs.values()),
                paths,
                scale=scale,
                width=[w for w, _ in sizes],
                height=[h for _, h in sizes],
            )
            written += paths
        except Exception as exc:  # noqa: BLE001 - kaleido / Chrome missing: the HTML files are there
            warnings.warn(f"PNG export skipped ({type(exc).__name__}: {exc})", stacklevel=2)
    return written


# ---------------------------------------------------------------------------------------------- pipelines
FAST = {
    "routerlens": ["--epochs", "1", "--limit", "40", "--oe-seeds", "0,1"],
    "analysis": ["--limit", "32", "--attr-limit", "16"],
    "ceft": ["--epochs", "1", "--test-limit", "40", "--memorised-limit", "40", "--eval-batch-size", "40"],
}
# the full CEFT run: the paper's CE count (the model's top-k) and two larger budgets, each with a random
# control of the same size, plus the every-expert and attention-only controls
FULL_CEFT = ["--controls", "--ce-per-layer", "2,4,6"]
DONE = {"routerlens": "compare_count_all/summary.csv", "analysis": "summary.json", "ceft": "table.csv"}


def _log(msg: str) -> None:
    print(f"[figures {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pipeline_folder(runs: Path, name: str, fast: bool) -> Path:
    """``<runs>/<name>`` when complete (or for a full run), else ``<runs>/fast/<name>`` with ``fast``."""
    full = runs / name
    return full if (full / DONE[name]).is_file() or not fast else runs / "fast" / name


def _warn_if_stale(folder: Path, name: str) -> None:
    """Warn when the demo weights are newer than a reused pipeline output (it may describe another model)."""
    from moe_interp.demo import WEIGHTS_DIR

    weights, done = Path(WEIGHTS_DIR) / "model.safetensors", folder / DONE[name]
    if weights.is_file() and done.is_file() and weights.stat().st_mtime > done.stat().st_mtime:
        _log(f"warning: {folder} predates the demo weights; delete it to recompute with the current model")


def ensure_pipelines(runs: Path, *, fast: bool, threads: int = 1) -> dict[str, Path | None]:
    """Find (or run, when incomplete) the Router Lens, analysis and CEFT pipelines; returns their folders."""
    thr = ["--threads", str(threads)]
    rl = pipeline_folder(runs, "routerlens", fast)
    _warn_if_stale(rl, "routerlens")
    if not (rl / DONE["routerlens"]).is_file():
        from moe_interp.routerlens import run as rl_run

        _log(f"running Router Lens into {rl}")
        rl_run.main(["--out", str(rl), *thr, *(FAST["routerlens"] if fast else [])])
    an = pipeline_folder(runs, "analysis", fast)
    _warn_if_stale(an, "analysis")
    if not (an / DONE["analysis"]).is_file():
        from moe_interp.analysis import run as an_run

        _log(f"running the attention analysis into {an}")
        an_run.main(["--out", str(an), "--tuned", str(rl / "rt"), *thr, *(FAST["analysis"] if fast else [])])
    ce: Path | None = pipeline_folder(runs, "ceft", fast)
    assert ce is not None
    _warn_if_stale(ce, "ceft")
    if not (ce / DONE["ceft"]).is_file():
        try:
            from moe_interp.ceft import run as ce_run
        except ImportError as exc:
            _log(f"CEFT unavailable ({exc}); its figure is skipped")
            return {"routerlens": rl, "analysis": an, "ceft": None}
        _log(f"running CEFT and baselines into {ce}")
        ce_run.main(
            [
                "--out",
                str(ce),
                "--experts",
                str(rl / "experts_count_all.json"),
                *thr,
                *(FAST["ceft"] if fast else FULL_CEFT),
            ]
        )
    return {"routerlens": rl, "analysis": an, "ceft": ce}


def write_readme(out: Path, figs: Mapping[str, go.Figure], sources: Mapping[str, str], command: str) -> Path:
    """``figures/README.md``: each figure, what it shows, the data it came from and the command."""
    lines = [
        "# Paper figures on the demo model",
        "",
        f"Made with `{command}`. `python -m moe_interp.figures` (or `moe-interp figures`) reuses the "
        "pipeline outputs in `--runs` (default `runs/`) and runs the missing ones at full size; `--fast` "
        "runs them with small limits into `<runs>/fast/` (about 3 minutes on 2 CPU cores; noisy numbers).",
        "Each figure is an interactive `.html` (plotly.js in `plotly.min.js` beside it; works offline) and a "
        "static `.png`.",
        "",
        "| figure | what it shows |",
        "|---|---|",
    ]
    lines += [f"| `{stem}` | {FIGURES[stem]} |" for stem in figs]
    missing = [s for s in FIGURES if s not in figs]
    if missing:
        lines += ["", f"Not drawn (input missing): {', '.join(missing)}."]
    lines += ["", "Data: " + "; ".join(f"{k} `{v}`" for k, v in sources.items()) + "."]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line: regenerate every paper figure (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m moe_interp.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="pipeline outputs (read, and written where missing)")
    p.add_argument("--out", default="figures", help="where the figures go")
    p.add_argument(
        "--fast", action="store_true", help="run missing pipelines with small limits into <runs>/fast/"
    )
    p.add_argument("--no-png", action="store_true", help="HTML only")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    folders = ensure_pipelines(Path(args.runs), fast=args.fast, threads=args.threads)
    inp = load_inputs(folders["routerlens"], folders["analysis"], folders["ceft"])
    inp.trace = demo_trace()
    figs = render_all(inp)
    out = Path(args.out)
    written = write_figures(figs, out, png=not args.no_png)
    shown = ["--runs", args.runs] if args.runs != "runs" else []
    shown += ["--out", args.out] if args.out != "figures" else []
    command = "python -m moe_interp.figures " + shlex.join([*shown, *(["--fast"] if args.fast else [])])
    written.append(write_readme(out, figs, inp.sources, command.strip()))
    _log(f"{len(figs)} figures in {out} ({time.time() - t0:.0f} s)")
    return written


if __name__ == "__main__":
    from moe_interp.errors import run_main

    run_main("python -m moe_interp.figures", main)
