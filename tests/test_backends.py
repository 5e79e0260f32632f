"""The nnsight and TransformerLens backends give the same trace as the plain transformers path."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_model
from transformers import PreTrainedTokenizerFast

import moe_interp
from moe_interp.errors import InputError, UnsupportedModelError

CONTEXT = "The Eiffel Tower is in Paris."
PROMPTS = [f"Context: {CONTEXT} Question: Where is the Eiffel Tower? Answer:", "The mother tongue is"]
SPANS = dict(context=[CONTEXT, None], answer=["Paris", None])


def _assert_same(a: moe_interp.MoETrace, b: moe_interp.MoETrace) -> None:
    assert a.layers == b.layers and a.tokens == b.tokens and a.spans == b.spans
    for name in ("router_logits", "router_probs", "topk_weights", "next_token_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    assert torch.equal(a.topk_indices.sort(-1).values, b.topk_indices.sort(-1).values)
    if a.attn_to_spans is not None or b.attn_to_spans is not None:
        torch.testing.assert_close(a.attn_to_spans, b.attn_to_spans, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_nnsight_matches_transformers(model_type, tokenizer):
    nnsight = pytest.importorskip("nnsight")
    model = make_model(model_type)
    ref = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer, **SPANS)
    wrapped = nnsight.NNsight(model)
    got = moe_interp.trace(wrapped, PROMPTS, tokenizer=tokenizer, **SPANS)
    _assert_same(ref, got)
    if moe_interp.get_architecture(model).expert_outputs:
        a = moe_interp.trace(model, PROMPTS[1], tokenizer=tokenizer, expert_outputs=True)
        b = moe_interp.trace(wrapped, PROMPTS[1], tokenizer=tokenizer, expert_outputs=True)
        torch.testing.assert_close(a.expert_outputs, b.expert_outputs, atol=1e-6, rtol=0)


def test_nnsight_remote_is_routing_only(tokenizer):
    nnsight = pytest.importorskip("nnsight")
    wrapped = nnsight.NNsight(make_model("olmoe"))
    with pytest.raises(InputError, match="attention=False"):
        moe_interp.trace(wrapped, PROMPTS, tokenizer=tokenizer, remote=True, **SPANS)
    with pytest.raises(InputError, match="needs an nnsight model"):
        moe_interp.trace(make_model("olmoe"), PROMPTS, tokenizer=tokenizer, remote=True)


#: model types whose TransformerLens bridge exposes router logits, expert indices and weights
LENS_MOE_HOOKS = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_transformer_lens_bridge_matches_transformers(model_type, tokenizer, tmp_path):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    model = make_model(model_type)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path)  # the bridge reads the config (and tokenizer) from a folder
    tokenizer.save_pretrained(tmp_path)
    ref = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer, **SPANS)
    own = PreTrainedTokenizerFast.from_pretrained(tmp_path)  # the bridge edits its tokenizer's init kwargs
    try:
        bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=model, tokenizer=own)
    except Exception as exc:  # the bridge itself has no adapter for this architecture
        assert model_type not in LENS_MOE_HOOKS, exc
        pytest.skip(f"transformer-lens has no bridge for {model_type}: {exc}")
    if model_type not in LENS_MOE_HOOKS:
        expected = f"no MoE routing hooks for model type '{model_type}'"
        with pytest.raises(UnsupportedModelError, match=expected):
            moe_interp.trace(bridge, PROMPTS, tokenizer=tokenizer)
        return
    got = moe_interp.trace(bridge, PROMPTS, tokenizer=tokenizer, **SPANS)
    _assert_same(ref, got)
