"""Per-expert attribution: exact masking effects, gradient estimates, amplification; no side effects."""

from __future__ import annotations

import pytest
import torch

from moe_interp.analysis import (
    amplification_by_experts,
    ce_oe_sets,
    expert_heatmap,
    gradient_effects,
    masking_effects,
    rank_agreement,
    spearman,
)
from moe_interp.analysis.attribution import _Leaves, _moe_layers
from moe_interp.analysis.encode import encode
from moe_interp.data.example import QAExample
from moe_interp.evaluation import score_answers
from moe_interp.hooks import ModelPatch
from moe_interp.prompts import format_example
from moe_interp.routerlens.masking import mask_experts
from tests.conftest import make_model

CTX = "The Eiffel Tower is in Paris. The mother tongue of Danielle Darrieux is French."
EXAMPLES = [
    QAExample("a", CTX, "Where is the Eiffel Tower?", ("Paris",)),
    QAExample("b", CTX, "The mother tongue of Danielle Darrieux is", ("French",)),
]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def olmoe():
    return make_model("olmoe")


def test_exact_matches_masked_scoring(olmoe, tokenizer) -> None:
    eff = masking_effects(olmoe, tokenizer, EXAMPLES, layers=[1], batch_size=2)
    assert eff.delta_logprob.shape == (1, 8, 2) and eff.layers == [1]
    prompts = [format_example(e).text for e in EXAMPLES]
    answers = [" " + e.answers[0] for e in EXAMPLES]
    base = score_answers(olmoe, tokenizer, prompts, answers).logprob
    torch.testing.assert_close(eff.base_logprob, base, atol=1e-4, rtol=0)
    for expert in (int(eff.delta_logprob[0].abs().sum(-1).argmax()),):
        with mask_experts(olmoe, {1: [expert]}):
            masked = score_answers(olmoe, tokenizer, prompts, answers).logprob
        torch.testing.assert_close(eff.delta_logprob[0, expert].double(), masked - base, atol=1e-4, rtol=0)
    frame = eff.frame()
    assert len(frame) == 8 and set(frame.columns) >= {
        "layer",
        "expert",
        "delta_logprob",
        "delta_context_rate",
    }
    assert expert_heatmap(frame) is not None


def test_gradient_weight_is_derivative(olmoe, tokenizer) -> None:
    """-(g * w) summed over an expert's slots equals d/d(eps) of scaling its weights by (1 - eps)."""
    est = gradient_effects(olmoe, tokenizer, EXAMPLES, layers=[1], batch_size=2)
    assert all(p.grad is None for p in olmoe.parameters())
    layer = _moe_layers(olmoe, [1])[0]
    expert, eps = int(est.delta_logprob[0].abs().sum(-1).argmax()), 1e-3

    def score(scale: float) -> torch.Tensor:
        def pre(module, args, kwargs):
            hidden, idx, w = args
            return (hidden, idx, torch.where(idx == expert, w * scale, w)), kwargs

        with ModelPatch() as patch:
            patch.pre_hook(layer.experts, pre, with_kwargs=True)
            prompts = [format_example(e).text for e in EXAMPLES]
            return score_answers(olmoe, tokenizer, prompts, [" " + e.answers[0] for e in EXAMPLES]).logprob

    fd = (score(1 - eps) - score(1 + eps)) / 2  # ≈ -eps * d/dscale = eps * estimate
    torch.testing.assert_close(est.delta_logprob[0, expert].double(), fd / eps, atol=2e-3, rtol=2e-2)


def test_swap_and_agreement(olmoe, tokenizer) -> None:
    exact = masking_effects(olmoe, tokenizer, EXAMPLES, batch_size=2)
    swap = gradient_effects(olmoe, tokenizer, EXAMPLES, method="swap", batch_size=1)
    weight = gradient_effects(olmoe, tokenizer, EXAMPLES, batch_size=2)
    assert rank_agreement(exact, swap) > 0.8 and rank_agreement(exact, weight) > 0.5
    assert _hooks(olmoe) == 0


def test_hooks_removed_on_error(olmoe, tokenizer, monkeypatch) -> None:
    def boom(self, number):
        def hook(module, args, kwargs):
            raise RuntimeError("hook failed")

        return hook

    monkeypatch.setattr(_Leaves, "_pre", boom)
    with pytest.raises(RuntimeError, match="hook failed"):
        gradient_effects(olmoe, tokenizer, EXAMPLES)
    assert _hooks(olmoe) == 0 and all(p.grad is None for p in olmoe.parameters())
    with pytest.raises(ValueError, match="not MoE layers"):
        masking_effects(olmoe, tokenizer, EXAMPLES, layers=[9])
    with pytest.raises(ValueError, match="method"):
        gradient_effects(olmoe, tokenizer, EXAMPLES, method="nope")


def test_amplification(olmoe, tokenizer) -> None:
    eff = masking_effects(olmoe, tokenizer, EXAMPLES, layers=[0, 2], batch_size=2)
    sets = ce_oe_sets(eff, per_layer=2)
    assert set(sets) == {"CE", "OE"} and all(len(v) == 2 for v in sets["CE"].values())
    assert not set(sets["CE"][0]) & set(sets["OE"][0])
    frame = amplification_by_experts(olmoe, tokenizer, EXAMPLES, sets)
    assert set(frame["set"]) == {"CE", "OE"} and len(frame) == 2 * 3 * 2
    first = frame[frame.layer == 0]  # masking layer 0's experts cannot change layer 0's attention
    assert first["drop"].abs().max() < 1e-6
    assert _hooks(olmoe) == 0


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1])


def test_encode_rejects_missing_answer(tokenizer) -> None:
    with pytest.raises(ValueError, match="no gold answer"):
        encode(tokenizer, QAExample("z", CTX, "q", ()))
