"""The same seed gives the same router weights, CE set, metrics and figure data."""

from __future__ import annotations

import torch
from conftest import make_model

import moe_interp
from moe_interp import routerlens
from moe_interp.data import QAExample
from moe_interp.plotting import plot_selection_heatmap

EXAMPLES = [
    QAExample(
        id=f"e{i}",
        context=f"The capital of Xland is Paris{i % 3}.",
        question="The capital of Xland is",
        answers=(f"Paris{i % 3}",),
        memorised_answer="Rome",
        counterfactual_answer=f"Paris{i % 3}",
        source="test",
    )
    for i in range(6)
]


def _pipeline(tokenizer):
    model = make_model("mixtral")
    cfg = routerlens.RouterTuningConfig(epochs=1, batch_size=2, seed=3)
    result = routerlens.tune_routers(model, tokenizer, EXAMPLES, EXAMPLES[:2], config=cfg, progress=False)
    base = routerlens.count_selections(model, tokenizer, EXAMPLES, spans=("all",), progress=False)
    with routerlens.applied_router_weights(model, result.weights):
        tuned = routerlens.count_selections(model, tokenizer, EXAMPLES, spans=("all",), progress=False)
        frame = moe_interp.evaluate(model, tokenizer, EXAMPLES, max_new_tokens=3, progress=False)
    experts = routerlens.identify_experts(tuned, base, span="all", method="diff", oe_seed=5)
    return result, experts, frame, tuned


def test_same_seed_same_results(tokenizer):
    a, b = _pipeline(tokenizer), _pipeline(tokenizer)
    assert a[0].weights.keys() == b[0].weights.keys()
    assert all(torch.equal(a[0].weights[k], b[0].weights[k]) for k in a[0].weights)
    assert a[1].ce() == b[1].ce() and a[1].oe(5) == b[1].oe(5)
    assert a[2].equals(b[2])
    fig_a = plot_selection_heatmap(a[3].counts["all"], layers=a[3].layers)
    fig_b = plot_selection_heatmap(b[3].counts["all"], layers=b[3].layers)
    assert (fig_a.data[0].z == fig_b.data[0].z).all()
