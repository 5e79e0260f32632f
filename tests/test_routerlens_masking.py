"""mask_experts: masked experts are never selected, under every registered architecture's own rule."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import make_model

from moe_interp.architectures import get_architecture
from moe_interp.errors import InputError
from moe_interp.routerlens.masking import active_masks, expert_spec, mask_experts
from moe_interp.trace import trace

PROMPTS = [
    "Context: The Eiffel Tower is in Paris. Question: Where is the Eiffel Tower? Answer:",
    "The mother tongue of Danielle Darrieux is",
]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("renormalize", [False, True], ids=["keep-softmax", "renormalize"])
def test_masked_experts_never_selected(model_type, tokenizer, renormalize):
    model = make_model(model_type)
    before, hooks = _state(model), _hooks(model)
    base = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    k = base.top_k
    # mask, per layer, the experts the unmasked model uses most (so masking must change the routing)
    counts = base.selection_counts()
    spec = {
        layer: torch.argsort(counts[i], descending=True, stable=True)[: max(1, k)].tolist()
        for i, layer in enumerate(base.layers)
    }
    with mask_experts(model, spec, renormalize=renormalize) as used:
        assert used == {layer: sorted(v) for layer, v in spec.items()}
        masked = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    for i, layer in enumerate(masked.layers):
        chosen = set(masked.topk_indices[i].flatten().tolist())
        assert not chosen & set(spec[layer]), (model_type, layer)
        assert torch.isfinite(masked.topk_weights[i]).all()
    assert not torch.equal(masked.topk_indices, base.topk_indices)
    assert _hooks(model) == hooks and active_masks(model) == {}
    after = _state(model)
    assert all(torch.equal(before[k_], after[k_]) for k_ in before)
    again = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    assert torch.equal(again.topk_indices, base.topk_indices)
    assert torch.equal(again.next_token_logits, base.next_token_logits)


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3", "llama4_text", "dbrx"])
def test_empty_mask_changes_nothing(model_type, tokenizer):
    model = make_model(model_type)
    base = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    hooks = _hooks(model)
    with mask_experts(model, {}):
        assert _hooks(model) == hooks
        same = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    assert torch.equal(same.topk_indices, base.topk_indices)
    assert torch.equal(same.next_token_logits, base.next_token_logits)
    layer = base.layers[0]
    # a mask on one layer leaves the routing of every earlier layer unchanged
    with mask_experts(model, {base.layers[-1]: [0]}):
        part = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
    assert torch.equal(part.topk_indices[0], base.topk_indices[0]) or layer == base.layers[-1]


def test_nested_masks_union_and_exception_safety(tokenizer):
    model = make_model("olmoe")
    hooks = _hooks(model)
    with mask_experts(model, {0: [1]}):
        with mask_experts(model, {0: [2], 1: [3]}):
            assert active_masks(model) == {0: [1, 2], 1: [3]}
            t = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
            assert not {1, 2} & set(t.topk_indices[0].flatten().tolist())
            assert 3 not in t.topk_indices[1].flatten().tolist()
        assert active_masks(model) == {0: [1]}
    assert active_masks(model) == {} and _hooks(model) == hooks
    with pytest.raises(RuntimeError, match="boom"), mask_experts(model, {0: [1]}):
        raise RuntimeError("boom")
    assert _hooks(model) == hooks


def test_frame_spec_and_errors():
    model = make_model("qwen2_moe")  # MoE layers 0 and 2 (layer 1 is dense)
    frame = pd.DataFrame({"layer": [0, 0, 2], "expert": [5, 1, 7], "set": ["CE"] * 3})
    assert expert_spec(model, frame) == {0: [1, 5], 2: [7]}
    with pytest.raises(InputError, match="layer 1 is not an MoE layer"):
        expert_spec(model, {1: [0]})
    with pytest.raises(InputError, match="expert id 8"):
        expert_spec(model, {0: [8]})
    import numpy as np  # numpy / torch integers are integers; floats and bools are not

    assert expert_spec(model, {np.int64(0): np.array([3, 1]), 2: torch.tensor([2])}) == {0: [1, 3], 2: [2]}
    assert expert_spec(model, {0: np.int64(4), 2: torch.tensor(5)}) == {0: [4], 2: [5]}
    for bad, why in (
        ({0: 1.0}, "int or a list"),
        ({0: [True]}, "not an integer"),
        ({0: [1.5]}, "not an integer"),
    ):
        with pytest.raises(InputError, match=why):
            expert_spec(model, bad)
    with pytest.raises(InputError, match="mixes sets"):
        expert_spec(model, pd.DataFrame({"layer": [0, 0], "expert": [1, 2], "set": ["CE", "OE"]}))
    with pytest.raises(InputError, match="top-k"):
        with mask_experts(model, {0: list(range(7))}):
            pass
    assert get_architecture(model).model_type == "qwen2_moe"


def test_renormalize_softmax_over_remaining_experts(tokenizer):
    """OLMoE (softmax, then top-k, no renormalisation): kept weights are the softmax over all experts, or,
    with renormalize=True, over the unmasked experts only; recomputed here from the recorded logits."""
    model = make_model("olmoe")
    spec = {m.number: [0, 1] for m in get_architecture(model).moe_layers(model)}
    for renormalize in (False, True):
        with mask_experts(model, spec, renormalize=renormalize):
            t = trace(model, PROMPTS, tokenizer=tokenizer, attention=False)
        logits = t.router_logits.clone()
        # the trace shows the routing applied: removed experts have probability 0, the rest sum to 1
        assert t.router_probs[..., [0, 1]].eq(0).all() == renormalize
        torch.testing.assert_close(t.router_probs.sum(-1), torch.ones(t.router_probs.shape[:-1]))
        if renormalize:
            assert torch.isinf(logits[..., [0, 1]]).all()
            logits[..., [0, 1]] = float("-inf")
        probs = logits.softmax(-1)
        probs[..., [0, 1]] = -1.0  # never chosen
        want, idx = probs.topk(t.top_k, dim=-1)
        torch.testing.assert_close(t.topk_weights, want, atol=1e-6, rtol=0)
        assert torch.equal(t.topk_indices, idx)
    with mask_experts(model, spec), pytest.raises(InputError, match="renormalize"):
        with mask_experts(model, spec, renormalize=True):
            pass
    assert active_masks(model) == {}


def test_degenerate_inputs_are_refused(tokenizer):
    from moe_interp.answer_loss import encode_answer_loss
    from moe_interp.data.example import QAExample
    from moe_interp.routerlens import count_selections

    model = make_model("olmoe")
    with pytest.raises(InputError, match="not integral"):
        expert_spec(model, pd.DataFrame({"layer": [0.0], "expert": [1.5]}))
    with pytest.raises(InputError, match="no examples"):
        count_selections(model, tokenizer, [], progress=False)
    ex = QAExample(id="a", question="Where?", answers=("Paris",), context="It is in Paris.")
    with pytest.raises(InputError, match="max_length must be >= 2"):
        encode_answer_loss(tokenizer, [ex], max_length=1)
    empty = QAExample(id="b", question="Where?", answers=(" ",), context="x")
    with pytest.raises(InputError, match=r"\[0\] \(id 'b'\) has no answer"):
        encode_answer_loss(tokenizer, [empty])
