"""compare(): Base / RT / RT w/o OE (several seeds) / RT w/o CE, as frames and a figure."""

from __future__ import annotations

import torch
from conftest import make_model
from test_routerlens_tuning import examples

from moe_interp.evaluation import evaluate
from moe_interp.routerlens.compare import compare, paired_difference, paper_conditions
from moe_interp.routerlens.experts import identify_experts
from moe_interp.routerlens.masking import mask_experts
from moe_interp.routerlens.tuning import applied_router_weights, router_parameter_names


def test_compare_paper_conditions(tmp_path, tokenizer):
    model = make_model("olmoe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    weights = {
        n: before[n] + torch.randn(before[n].shape, generator=g) for n in router_parameter_names(model)
    }
    counts = torch.randint(0, 100, (3, 8), generator=g)
    experts = identify_experts(counts, layers=[0, 1, 2], k=2)
    conds = paper_conditions(weights, experts, oe_seeds=(0, 1))
    exs = examples(4)
    kw = dict(max_new_tokens=2, batch_size=4, progress=False)
    res = compare(model, tokenizer, exs, conds, out=tmp_path, **kw)
    assert list(res.runs["condition"]) == ["Base", "RT", "RT w/o OE", "RT w/o OE", "RT w/o CE"]
    assert list(res.summary["condition"]) == ["Base", "RT", "RT w/o OE", "RT w/o CE"]
    assert {"Pc", "Pc_se", "Pc_sd", "dPc_vs_base", "dPc_vs_RT_se", "EM", "F1", "Po"} <= set(
        res.summary.columns
    )
    assert res.summary.loc[res.summary.condition == "RT", "dPc_vs_RT"].item() == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with applied_router_weights(model, weights), mask_experts(model, experts.ce()):
        ref = evaluate(model, tokenizer, exs, **kw)
    assert list(ref["prediction"]) == list(res.frames["RT_wo_CE"]["prediction"])
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == sorted(f"{c.key}.jsonl" for c in conds)
    again = compare(model, tokenizer, exs, conds, out=tmp_path, **kw)  # resumed from the files
    assert again.runs.equals(res.runs)
    assert len(res.figure().data) == 4
    d, se = paired_difference(res.frames["RT"], res.frames["Base"], "Pc")
    assert abs(d - (res.frames["RT"]["pc"].mean() - res.frames["Base"]["pc"].mean())) < 1e-12
