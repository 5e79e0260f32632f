"""No public entry point changes the caller's model, whether it returns or raises (KeyboardInterrupt too)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import make_model

import moe_interp
from moe_interp.data import QAExample

EXAMPLES = [
    QAExample(
        id=f"e{i}",
        context=f"The capital of Xland is Paris{i % 2}.",
        question="The capital of Xland is",
        answers=(f"Paris{i % 2}",),
        memorised_answer="Rome",
        counterfactual_answer=f"Paris{i % 2}",
        source="test",
    )
    for i in range(4)
]
PROMPT = "Context: The Eiffel Tower is in Paris. Answer:"


def _entry_points() -> dict[str, Callable]:
    from moe_interp import analysis, routerlens
    from moe_interp.ceft import engine, targets

    def ceft(model, tok):
        arch = moe_interp.get_architecture(model)
        spec = {layer.number: [0, 1] for layer in arch.moe_layers(model)}
        engine.train(
            model,
            tok,
            EXAMPLES,
            EXAMPLES[:2],
            method=targets.ceft(spec),
            config=engine.CEFTConfig(epochs=1, batch_size=2),
            progress=False,
        )

    def masked_trace(model, tok):
        with routerlens.mask_experts(model, {0: [0]}):
            moe_interp.trace(model, PROMPT, tokenizer=tok)

    return {
        "trace": lambda m, t: moe_interp.trace(
            m,
            PROMPT,
            context="The Eiffel Tower is in Paris.",
            answer="Paris",
            tokenizer=t,
            expert_outputs=True,
            full_attention=True,
        ),
        "mask_experts": masked_trace,
        "tune_routers": lambda m, t: routerlens.tune_routers(
            m,
            t,
            EXAMPLES,
            EXAMPLES[:2],
            config=routerlens.RouterTuningConfig(epochs=1, batch_size=2),
            progress=False,
        ),
        "count_selections": lambda m, t: routerlens.count_selections(m, t, EXAMPLES, progress=False),
        "evaluate": lambda m, t: moe_interp.evaluate(m, t, EXAMPLES, max_new_tokens=2, progress=False),
        "span_attention": lambda m, t: analysis.span_attention(m, t, EXAMPLES),
        "answer_lens": lambda m, t: analysis.answer_lens(m, t, EXAMPLES),
        "masking_effects": lambda m, t: analysis.masking_effects(m, t, EXAMPLES[:2], layers=[0]),
        "gradient_effects": lambda m, t: analysis.gradient_effects(m, t, EXAMPLES[:2]),
        "ceft_train": ceft,
    }


ENTRY_POINTS = sorted(_entry_points())


def _state(model) -> tuple:
    return (
        sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        [m.training for m in model.modules()],
        [id(getattr(m, "config", None)) for m in model.modules()],
        model.config._attn_implementation,
        getattr(model.config, "_experts_implementation", None),
        [(n, p.requires_grad, id(p)) for n, p in model.named_parameters()],
        [p.grad is None for p in model.parameters()],
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(before: tuple, weights: dict, model) -> None:
    assert _state(model) == before
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_model_unchanged(name, outcome, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_model("olmoe")
    model.train()
    model.model.layers[0].requires_grad_(False)
    before, weights = _state(model), _weights(model)
    fn = _entry_points()[name]
    if outcome == "returns":
        fn(model, tokenizer)
    else:
        calls = {"n": 0}

        def interrupt(module, args):
            calls["n"] += 1
            if calls["n"] >= 1:
                raise KeyboardInterrupt

        handle = model.model.layers[1].mlp.register_forward_pre_hook(interrupt)
        before = _state(model)
        try:
            with pytest.raises(KeyboardInterrupt):
                fn(model, tokenizer)
        finally:
            handle.remove()
        before = (before[0] - 1, *before[1:])
    _same(before, weights, model)


def test_model_patch_restores_every_kind_of_attribute():
    """Plain attributes (written to the instance dict directly), submodules and parameters (through
    nn.Module.__setattr__) and attributes of plain objects all come back, or go again if they were new."""
    from types import SimpleNamespace

    from torch import nn

    from moe_interp.hooks import ModelPatch

    lin, holder = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))
    lin.config = "original"
    sub, weight, ns = holder[0], lin.weight, SimpleNamespace(a=1)
    new_weight = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(RuntimeError), ModelPatch() as patch:
        patch.set_attr(lin, "config", "patched")
        patch.set_attr(lin, "_tag", ("recorder", 3))
        patch.set_attr(holder, "0", nn.Identity())
        patch.set_attr(lin, "weight", new_weight)
        patch.set_attr(ns, "a", 2)
        assert lin.config == "patched" and lin._tag == ("recorder", 3) and ns.a == 2
        assert isinstance(holder[0], nn.Identity) and lin._parameters["weight"] is new_weight
        raise RuntimeError("boom")
    assert lin.config == "original" and not hasattr(lin, "_tag") and ns.a == 1
    assert holder[0] is sub and holder._modules["0"] is sub
    assert lin.weight is weight and lin._parameters["weight"] is weight and "weight" not in lin.__dict__
    assert set(lin.__dict__) == set(nn.Linear(2, 2).__dict__) | {"config"}


def test_model_patch_restores_attributes_whose_kind_changed():
    """A plain attribute swapped for a parameter or submodule (and back), a property with a setter (a
    config's ``_attn_implementation``), and every other undo still running when one of them fails."""
    import transformers
    from torch import nn

    from moe_interp.hooks import ModelPatch

    m = nn.Linear(2, 2)
    m.scale, m.extra = 1.0, None
    config = transformers.OlmoeConfig()
    before = (config._attn_implementation, m.bias)
    with ModelPatch() as patch:
        patch.forward_hook(m, lambda *a: None)
        patch.set_attr(m, "scale", nn.Parameter(torch.ones(1)))
        patch.set_attr(m, "extra", nn.Identity())
        patch.set_attr(m, "bias", None)
        patch.set_attr(config, "_attn_implementation", "eager")
        assert "scale" in m._parameters and "extra" in m._modules and m.bias is None
        assert config._attn_implementation == "eager"
    assert m.scale == 1.0 and m.extra is None and "scale" not in m._parameters and "extra" not in m._modules
    assert config._attn_implementation == before[0] and not m._forward_hooks
    assert m.bias is before[1] and m._parameters["bias"] is before[1]
    assert set(m.state_dict()) == {"weight", "bias"}

    class Fails:
        def __init__(self):
            self.x = 1

    broken = Fails()
    with pytest.raises(RuntimeError, match="undo failed"), ModelPatch() as patch:
        patch.forward_hook(m, lambda *a: None)
        patch.set_attr(broken, "x", 2)
        patch._undo.append(lambda: (_ for _ in ()).throw(RuntimeError("undo failed")))
        patch.set_attr(m, "scale", 3.0)
    assert broken.x == 1 and m.scale == 1.0 and not m._forward_hooks  # the rest was still undone
