"""The paper-figure pipeline's rendering on small synthetic inputs: every figure shows exactly its data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, make_tokenizer

from moe_interp import figures as F
from moe_interp.routerlens.counting import SelectionCounts
from moe_interp.routerlens.experts import identify_experts

L, E = 3, 6


def _counts(seed: int) -> SelectionCounts:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 50, (L, E), generator=g)
    return SelectionCounts({"all": c}, {"all": int(c.sum()) // 2}, [0, 1, 3], E, 2, 10)


@pytest.fixture(scope="module")
def inputs() -> F.Inputs:
    base, tuned = _counts(0), _counts(1)
    masking = pd.DataFrame(
        {
            "condition": ["Base", "RT", "RT w/o OE", "RT w/o CE"],
            "runs": [1, 1, 2, 1],
            "n": [20] * 4,
            **{m: [0.4, 0.5, 0.45, 0.3] for m in ("EM", "F1")},
            **{f"{m}_se": [0.1, 0.1, 0.1, 0.1] for m in ("EM", "F1")},
            **{f"{m}_sd": [0.0, 0.0, 0.02, 0.0] for m in ("EM", "F1")},
        }
    )
    gains = pd.DataFrame(
        {
            "layer": [0, 1, 3, 0, 1, 3],
            "measure": ["CAG"] * 3 + ["AAG"] * 3,
            "rel_gain": [0.0, 0.2, -0.1, 0.05, -0.4, 0.9],
            "rel_gain_of_means": [0.0, 0.1, -0.05, 0.02, -0.3, 0.5],
        }
    )
    apg = pd.DataFrame(
        {"layer": [0, 1, 3], "base": [0.1, 0.2, 0.3], "tuned": [0.1, 0.3, 0.5], "abs_gain": [0.0, 0.1, 0.2]}
    )
    tokens = ["Context", ":", " The", " sky", " is", " green", ".", "\n", "Answer", ":"]
    diff = pd.DataFrame(
        [
            {"layer": lay, "position": p, "token": t, "diff": 0.01 * (p - 4) * (lay + 1)}
            for lay in (0, 1)
            for p, t in enumerate(tokens)
        ]
    )
    effects = pd.DataFrame(
        [{"layer": lay, "expert": e, "delta_logprob": -0.1 * e + lay} for lay in (0, 1, 3) for e in range(E)]
    )
    table = pd.DataFrame(
        {
            "conflict_test EM": [40.0, 55.0, 60.0, 45.0],
            "conflict_test F1": [41.0, 56.0, 61.0, 46.0],
            "memorised closed-book EM": [99.0, 98.0, 95.0, 99.0],
            "memorised change vs Base": [0.0, -1.0, -4.0, 0.0],
            "trainable params": [0, 1000, 100000, 64],
            "% of FFT": [0.0, 1.0, 100.0, 0.064],
        },
        index=pd.Index(["Base", "CEFT", "FFT", "RT"], name="method"),
    )
    return F.Inputs(
        counts_base=base,
        counts_tuned=tuned,
        experts=identify_experts(tuned, base, span="all"),
        masking=masking,
        gains=gains,
        apg=apg,
        token_diff=diff,
        effects=effects,
        ceft_table=table,
        comparison="tuned vs base",
    )


@pytest.fixture(scope="module")
def figs(inputs: F.Inputs):
    return F.render_all(inputs)


def test_every_figure_but_token_routing_is_drawn(figs):
    assert list(figs) == [k for k in F.FIGURES if k != "token_routing"]
    for fig in figs.values():  # one style: opaque white paper, dark text, a title and a fixed size
        assert fig.layout.paper_bgcolor == "white" and fig.layout.font.color == F.INK
        assert fig.layout.title.text and fig.layout.width and fig.layout.height


def test_routing_heatmaps_show_the_counts(inputs, figs):
    base, tuned = inputs.counts_base.counts["all"], inputs.counts_tuned.counts["all"]
    left, right = figs["routing_heatmap"].data
    for trace, c in ((left, base), (right, tuned)):
        np.testing.assert_allclose(np.asarray(trace.customdata), c.numpy())
        np.testing.assert_allclose(np.asarray(trace.z), (c / c.sum(1, keepdim=True)).numpy(), rtol=1e-6)
        assert list(trace.y) == ["L0", "L1", "L3"]
    assert left.zmax == right.zmax  # one colour scale for both panels
    heat = figs["routing_difference"].data[0]
    expected = inputs.counts_tuned.share("all") - inputs.counts_base.share("all")
    np.testing.assert_allclose(np.asarray(heat.z), expected.numpy(), atol=1e-6)
    assert heat.zmid == 0 and heat.zmin == -heat.zmax


def test_ce_oe_bars_are_the_tuned_shares(inputs, figs):
    fig = figs["ce_oe_selection"]
    frame = inputs.experts.frame
    for trace in fig.data:
        if trace.type != "bar":
            continue
        layer = [0, 1, 3][int((trace.xaxis or "x").lstrip("x") or 1) - 1]
        part = frame[frame["layer"] == layer].set_index("expert")
        share = part["count_tuned"] / part["count_tuned"].sum()
        name = {v: k for k, v in F.SET_NAMES.items()}[trace.name]
        assert sorted(int(x) for x in trace.x) == sorted(part.index[part["set"] == name])
        np.testing.assert_allclose(trace.y, share.loc[[int(x) for x in trace.x]].to_numpy())
    assert {t.name for t in fig.data if t.showlegend is not False} >= {*F.SET_NAMES.values(), "base routers"}


def test_masking_bars_equal_the_summary(inputs, figs):
    bars = figs["masking_comparison"].data
    assert [b.name.split(" (")[0] for b in bars] == list(inputs.masking["condition"])
    for bar, (_, row) in zip(bars, inputs.masking.iterrows(), strict=True):
        assert list(bar.x) == ["EM", "F1"]
        np.testing.assert_allclose(bar.y, [100 * row["EM"], 100 * row["F1"]])
        assert bar.marker.color == F.CONDITION_COLOURS[row["condition"]]
    oe = bars[2].error_y.array[0]
    assert oe == pytest.approx(100 * np.hypot(0.1, 0.02))  # SE combined with the spread over seeds


def test_gain_lines_use_two_axes_with_aligned_zeros(inputs, figs):
    fig = figs["cag_aag"]
    cag, aag = fig.data  # the relative change of the mean attention, not the per-example mean
    np.testing.assert_allclose(cag.y, [0.0, 0.1, -0.05])
    np.testing.assert_allclose(aag.y, [0.02, -0.3, 0.5])
    assert cag.yaxis == "y" and aag.yaxis == "y2"
    (a0, a1), (b0, b1) = fig.layout.yaxis.range, fig.layout.yaxis2.range
    assert -a0 / (a1 - a0) == pytest.approx(-b0 / (b1 - b0))
    assert a0 <= -0.05 and a1 >= 0.1 and b0 <= -0.3 and b1 >= 0.5
    per_example = F.gains_lines_figure(inputs.gains, value="rel_gain")
    np.testing.assert_allclose(per_example.data[1].y, [0.05, -0.4, 0.9])
    apg = figs["apg"].data
    np.testing.assert_allclose(apg[0].y, inputs.apg["abs_gain"])
    np.testing.assert_allclose(apg[2].y, inputs.apg["tuned"])


@pytest.mark.parametrize("values", [([1.0, 2.0], [-3.0, -1.0]), ([0.0, 0.0], [5.0, 1.0]), ([-2.0], [4.0])])
def test_zero_aligned_ranges_hold_the_data(values):
    left, right = F._zero_aligned(*values)
    for (lo, hi), vals in zip((left, right), values, strict=True):
        assert lo <= min(vals) and hi >= max(vals) and lo <= 0 <= hi
    assert -left[0] / (left[1] - left[0]) == pytest.approx(-right[0] / (right[1] - right[0]))


def test_token_difference_cells_are_the_differences(inputs, figs):
    fig = figs["token_attention_difference"]
    assert len(fig.data) == 2  # one panel per layer
    for trace, layer in zip(fig.data, (0, 1), strict=True):
        part = inputs.token_diff[inputs.token_diff["layer"] == layer]
        cells = [z for row in trace.z for z in row if z is not None]
        np.testing.assert_allclose(cells, part.sort_values("position")["diff"])
        words = [w for row in trace.text for w in row if w]
        assert words[3] == " sky" and "⏎" in words


def test_ceft_bars_equal_the_table(inputs, figs):
    fig = figs["ceft_vs_fft"]
    table = inputs.ceft_table
    scores = [b for b in fig.data if b.xaxis == "x"]
    assert [b.name for b in scores] == [
        "EM on conflict_test",
        "EM on memorised facts, closed-book (forgetting)",
    ]
    np.testing.assert_allclose(scores[0].y, table["conflict_test EM"])
    np.testing.assert_allclose(scores[1].y, table["memorised closed-book EM"])
    params = next(b for b in fig.data if b.xaxis == "x2")
    assert list(params.x) == ["CEFT", "FFT", "RT"]  # Base trains nothing: no bar on the log axis
    np.testing.assert_allclose(params.y, [1000, 100000, 64])
    assert params.text[0] == "1k<br>1.0% of FFT" and fig.layout.yaxis2.type == "log"


def test_attribution_heatmap_and_ce_marks(inputs, figs):
    fig = figs["expert_attribution"]
    heat, marks = fig.data
    grid = inputs.effects.pivot_table(index="layer", columns="expert", values="delta_logprob")
    np.testing.assert_allclose(np.asarray(heat.z), grid.to_numpy())
    ce = inputs.experts.ce()
    assert sorted(zip(marks.y, marks.x, strict=True)) == sorted(
        (f"L{layer}", str(e)) for layer, es in ce.items() for e in es
    )


def test_token_routing_of_a_traced_prompt():
    import moe_interp

    model, tok = make_model("olmoe"), make_tokenizer()
    t = moe_interp.trace(
        model, "Context: the sky is green. Answer:", context="the sky is green", tokenizer=tok
    )
    fig = F.token_routing_figure(t)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), t.topk_indices[:, :, 0].numpy())
    assert fig.layout.title.text.startswith("Per-token routing")


def test_write_figures_and_readme(figs, inputs, tmp_path: Path):
    out = tmp_path / "figs"
    written = F.write_figures({"masking_comparison": figs["masking_comparison"]}, out, png=False)
    assert written == [out / "masking_comparison.html"]
    assert (out / "plotly.min.js").is_file()  # plotly.js once beside the HTML files: offline
    html = (out / "masking_comparison.html").read_text()
    assert 'src="plotly.min.js"' in html and len(html) < 200_000
    readme = F.write_readme(out, figs, {"routerlens": "runs/routerlens"}, "python -m moe_interp.figures")
    text = readme.read_text()
    assert "python -m moe_interp.figures" in text and "Not drawn (input missing): token_routing." in text
    assert all(f"`{stem}`" in text for stem in figs)


def test_load_inputs_reads_the_pipeline_layout(inputs, tmp_path: Path):
    rl, an, ce = tmp_path / "routerlens", tmp_path / "analysis", tmp_path / "ceft"
    inputs.counts_base.save(rl / "counts_base.json")
    inputs.counts_tuned.save(rl / "counts_tuned.json")
    inputs.experts.save(rl / "experts_count_all.json")
    (rl / "compare_count_all").mkdir()
    inputs.masking.to_csv(rl / "compare_count_all" / "summary.csv", index=False)
    an.mkdir()
    inputs.gains.to_csv(an / "cag_aag.csv", index=False)
    inputs.apg.to_csv(an / "apg.csv", index=False)
    inputs.token_diff.to_csv(an / "token_difference.csv", index=False)
    inputs.effects.to_csv(an / "expert_effects.csv", index=False)
    (an / "summary.json").write_text(json.dumps({"comparison": "tuned vs base"}))
    ce.mkdir()
    inputs.ceft_table.to_csv(ce / "table.csv")
    got = F.load_inputs(rl, an, ce)
    assert torch.equal(got.counts_tuned.counts["all"], inputs.counts_tuned.counts["all"])
    assert got.experts.ce() == inputs.experts.ce() and got.comparison == "tuned vs base"
    pd.testing.assert_frame_equal(got.ceft_table, inputs.ceft_table)
    pd.testing.assert_frame_equal(got.token_diff, inputs.token_diff)
    assert list(F.render_all(got)) == list(F.render_all(inputs))
    # complete outputs are reused: the pipelines are not run again
    assert F.pipeline_folder(tmp_path, "routerlens", fast=True) == rl
    assert (
        F.pipeline_folder(tmp_path / "empty", "analysis", fast=True)
        == tmp_path / "empty" / "fast" / "analysis"
    )
