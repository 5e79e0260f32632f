"""Interactive plotly figures of routing. Each function returns a ``plotly.graph_objects.Figure``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import torch

from moe_interp.errors import InputError

if TYPE_CHECKING:
    from moe_interp.moetrace import MoETrace

SPAN_COLOURS = ("#e45756", "#2ca02c", "#9467bd")


def save_figure(
    fig: go.Figure, stem: str | Path, *, png: bool = True, scale: float = 2.0, shared_js: bool = False
) -> list[Path]:
    """Write ``stem.html`` (interactive, works offline) and, when a static exporter is available (kaleido
    with a Chrome/Chromium), ``stem.png``. Returns the paths written.

    plotly.js (4.8 MB) is embedded in the HTML, or with ``shared_js`` written once as ``plotly.min.js``
    beside it and referenced (for folders of figures; keep the two files together).
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs="directory" if shared_js else True)
    if png:
        try:
            fig.write_image(stem.with_suffix(".png"), scale=scale)
            written.append(stem.with_suffix(".png"))
        except Exception as exc:  # noqa: BLE001 - kaleido / Chrome missing: HTML is still there
            warnings.warn(f"PNG export skipped for {stem.name} ({type(exc).__name__}: {exc})", stacklevel=2)
    return written


INK = "#1f2328"  # text: dark on the opaque white paper, so the figures read the same in dark notebooks
MUTED = "#57606a"
GRID = "#e4e7eb"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=13, color=INK)


def style(
    fig: go.Figure,
    title: str,
    *,
    height: int,
    width: int,
    subtitle: str | None = None,
    legend: bool = False,
    headroom: int = 0,
) -> go.Figure:
    """The common look: white template, opaque white paper and plot, dark text, a left-aligned title and
    grey subtitle pinned to the top, margins that grow to fit labels, a fixed size (also the PNG's).

    ``legend``: one horizontal row under the subtitle (the top margin grows to hold it); ``headroom``: extra
    top margin in pixels, e.g. for subplot titles above the first row.
    """
    title_spec: dict[str, Any] = dict(
        text=title,
        x=0.01,
        xanchor="left",
        yref="container",
        y=1,
        yanchor="top",
        pad=dict(t=14),
        font=dict(size=17, color=INK),
    )
    top = 52 + (22 if subtitle else 0)
    if subtitle:
        title_spec["subtitle"] = dict(text=subtitle, font=dict(size=12, color=MUTED))
    fig.update_layout(
        template="plotly_white",
        font=FONT,
        paper_bgcolor="white",
        plot_bgcolor="white",
        title=title_spec,
        height=height,
        width=width,
        margin=dict(l=80, r=40, t=top + (34 if legend else 0) + headroom, b=70),
        legend=dict(bgcolor="rgba(255,255,255,0.9)", font=dict(color=INK)),
        hoverlabel=dict(bgcolor="white", font=dict(color=INK)),
    )
    if legend:
        fig.update_layout(
            showlegend=True,
            legend=dict(
                orientation="h",
                x=0.01,
                xanchor="left",
                yref="container",
                y=1 - (top + 4) / height,
                yanchor="top",
            ),
        )
    fig.update_xaxes(automargin=True, gridcolor=GRID, linecolor="#8c959f", title_font=dict(color=INK))
    fig.update_yaxes(automargin=True, gridcolor=GRID, linecolor="#8c959f", title_font=dict(color=INK))
    fig.update_annotations(font=dict(color=INK))
    return fig


def plot_selection_heatmap(
    counts: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    normalize: bool = True,
    title: str = "Expert selection frequency",
    diverging: bool = False,
) -> go.Figure:
    """Layer x expert heatmap of selection counts.

    Args:
        counts: [L, E] selection counts (or a difference of frequencies when ``diverging``).
        layers: decoder-layer numbers of the L rows (default 0..L-1).
        normalize: show each layer's share of selections instead of raw counts.
        diverging: centre the colour scale at zero (for tuned-minus-base differences).
    """
    counts = counts.float()
    z = counts / counts.sum(dim=1, keepdim=True).clamp(min=1) if normalize and not diverging else counts
    layers = list(layers) if layers is not None else list(range(counts.shape[0]))
    label = "share of selections" if normalize and not diverging else "value"
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=[str(e) for e in range(counts.shape[1])],
            y=[f"L{n}" for n in layers],
            customdata=counts.numpy(),
            colorscale="RdBu" if diverging else "Viridis",
            zmid=0 if diverging else None,
            colorbar=dict(title=dict(text=label, side="right")),
            hovertemplate="layer %{y}<br>expert %{x}<br>"
            + label
            + " %{z:.3f}<br>count %{customdata}<extra></extra>",
        )
    )
    fig.update_xaxes(title="expert", type="category")
    fig.update_yaxes(title="MoE layer", autorange="reversed", type="category")
    return style(fig, title, height=120 + 45 * len(layers), width=max(520, 160 + 38 * counts.shape[1]))


def plot_token_routing(trace: MoETrace, example: int = 0, *, max_tokens: int = 120, title: str | None = None):
    """Tokens x layers grid of one prompt; colour = top-1 expert, hover = top-k experts, weights and span.

    Spans (context, answer) are outlined under the token axis.
    """
    sl = trace.token_slice(example)
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    n = min(sl.stop - sl.start, max_tokens)
    sl = slice(sl.stop - n, sl.stop)  # keep the end of long prompts: the question and answer cue live there
    idx = trace.topk_indices[:, sl]  # [L, n, k]
    w = trace.topk_weights[:, sl]
    tokens = trace.tokens[sl]
    spans = trace.span_labels()[sl]
    hover = [
        [
            f"token {trace.position[sl.start + t].item()}: {tokens[t]!r}"
            + (f" [{spans[t]}]" if spans[t] else "")
            + "<br>"
            + "<br>".join(
                f"expert {int(e)}: w={float(x):.3f}" for e, x in zip(idx[lay, t], w[lay, t], strict=True)
            )
            for t in range(n)
        ]
        for lay in range(idx.shape[0])
    ]
    labels = [t.strip() or t.replace("\n", "⏎").replace(" ", "␣") for t in tokens]
    x = list(range(n))
    palette = _palette(trace.num_experts)
    fig = go.Figure(
        go.Heatmap(
            z=idx[:, :, 0].numpy(),
            x=x,
            y=[f"L{m}" for m in trace.layers],
            text=hover,
            hoverinfo="text",
            colorscale=palette,
            zmin=-0.5,
            zmax=trace.num_experts - 0.5,
            xgap=1,
            ygap=1,
            colorbar=dict(
                title=dict(text="top-1 expert", side="right"), tickvals=list(range(trace.num_experts))
            ),
        )
    )
    n_layers = len(trace.layers)
    for name, colour in zip(trace.span_names, SPAN_COLOURS, strict=False):
        for t in range(n):
            if spans[t] == name:  # a band under the grid marks the token's (innermost) span
                fig.add_shape(
                    type="rect",
                    x0=t - 0.5,
                    x1=t + 0.5,
                    y0=n_layers - 0.45,
                    y1=n_layers - 0.15,
                    line=dict(width=0),
                    fillcolor=colour,
                )
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{name} span",
                marker=dict(symbol="square", color=colour, size=12),
            )
        )
    fig.update_yaxes(range=[n_layers - 0.1, -0.5])
    fig.update_xaxes(tickvals=x, ticktext=labels, tickangle=-60, title="token", showgrid=False)
    fig.update_yaxes(title="MoE layer", showgrid=False, zeroline=False)
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    title = (
        title or f"Per-token routing, prompt {example} (colour = top-1 expert; hover for top-{trace.top_k})"
    )
    return style(fig, title, height=200 + 40 * len(trace.layers), width=max(700, 120 + 16 * n))


def _palette(n: int) -> list[list]:
    """A discrete colour scale with one colour band per expert id."""
    base = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
        "#aec7e8",
        "#ffbb78",
        "#98df8a",
        "#ff9896",
        "#c5b0d5",
        "#c49c94",
    ]
    colours = [base[i % len(base)] for i in range(n)]
    scale = []
    for i, c in enumerate(colours):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale
