"""Plotly figures: CAG/AAG lines (two y-axes), APG line, coloured-text token differences, expert heatmap."""

from __future__ import annotations

import html
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moe_interp.errors import InputError
from moe_interp.plotting import style


def _need(frame: pd.DataFrame, cols: set[str], what: str) -> None:
    missing = cols - set(frame.columns)
    if missing:
        raise InputError(f"{what}: frame lacks column(s) {sorted(missing)}; it has {list(frame.columns)}")


def gains_figure(gains: pd.DataFrame, *, value: str = "rel_gain", title: str = "CAG / AAG") -> go.Figure:
    """CAG (left axis) and AAG (right axis) per layer from :func:`~moe_interp.analysis.attention_gains`."""
    _need(gains, {"layer", "measure", value}, "gains_figure")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for measure, secondary, dash in (("CAG", False, "solid"), ("AAG", True, "dash")):
        part = gains[gains["measure"] == measure].sort_values("layer")
        fig.add_trace(
            go.Scatter(
                x=part["layer"], y=part[value], name=measure, mode="lines+markers", line={"dash": dash}
            ),
            secondary_y=secondary,
        )
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text=f"CAG ({value})", secondary_y=False)
    fig.update_yaxes(title_text=f"AAG ({value})", secondary_y=True)
    return style(fig, title, height=420, width=720, legend=True)


def apg_figure(apg: pd.DataFrame, *, value: str = "abs_gain", title: str = "APG") -> go.Figure:
    """APG per layer from :func:`~moe_interp.analysis.answer_probability_gain`, with base/tuned lines."""
    _need(apg, {"layer", value, "base", "tuned"}, "apg_figure")
    apg = apg.sort_values("layer")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=apg["layer"], y=apg[value], name="APG", mode="lines+markers"))
    for col, dash in (("base", "dot"), ("tuned", "dash")):
        fig.add_trace(
            go.Scatter(x=apg["layer"], y=apg[col], name=f"p({col})", mode="lines", line={"dash": dash}),
            secondary_y=True,
        )
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text=f"APG ({value})", secondary_y=False)
    fig.update_yaxes(title_text="answer probability (logit lens)", secondary_y=True)
    return style(fig, title, height=420, width=720, legend=True)


def token_difference_figure(diff: pd.DataFrame, *, per_line: int = 16, title: str = "") -> go.Figure:
    """Coloured text: the prompt's tokens in reading order, coloured by tuned - base attention, one panel
    per layer (frame from :func:`~moe_interp.analysis.token_attention_difference`)."""
    _need(diff, {"layer", "position", "token", "diff"}, "token_difference_figure")
    layers = sorted(diff["layer"].unique())
    bound = float(diff["diff"].abs().max()) or 1.0
    fig = make_subplots(rows=len(layers), cols=1, subplot_titles=[f"layer {n}" for n in layers])
    for r, layer in enumerate(layers, start=1):
        part = diff[diff["layer"] == layer].sort_values("position")
        n_lines = math.ceil(len(part) / per_line)
        z = [[None] * per_line for _ in range(n_lines)]
        text = [[""] * per_line for _ in range(n_lines)]
        for pos, tok, d in zip(part["position"], part["token"], part["diff"], strict=True):
            z[pos // per_line][pos % per_line] = d
            text[pos // per_line][pos % per_line] = html.escape(tok.replace("\n", "⏎"))
        fig.add_trace(
            go.Heatmap(
                z=z,
                text=text,
                texttemplate="%{text}",
                colorscale="RdBu",
                reversescale=True,
                zmin=-bound,
                zmax=bound,
                showscale=r == 1,
                hovertemplate="%{text}: %{z:.4f}<extra></extra>",
                colorbar={"title": "tuned - base"},
            ),
            row=r,
            col=1,
        )
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=r, col=1)
        fig.update_xaxes(showticklabels=False, row=r, col=1)
    return style(
        fig, title or "attention difference per token", height=220 * len(layers) + 80, width=900, headroom=20
    )


def expert_heatmap(effects: pd.DataFrame, *, value: str = "delta_logprob", title: str = "") -> go.Figure:
    """Layer x expert heatmap of an expert-effects frame (:meth:`ExpertEffects.frame`)."""
    _need(effects, {"layer", "expert", value}, "expert_heatmap")
    grid = effects.pivot_table(index="layer", columns="expert", values=value)
    bound = float(grid.abs().max().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[str(c) for c in grid.columns],
            y=[str(i) for i in grid.index],
            colorscale="RdBu",
            zmin=-bound,
            zmax=bound,
            colorbar={"title": value},
        )
    )
    fig.update_layout(xaxis_title="expert", yaxis_title="layer")
    return style(
        fig,
        title or f"effect of masking each expert ({value})",
        height=140 + 45 * len(grid.index),
        width=max(560, 160 + 34 * len(grid.columns)),
    )
