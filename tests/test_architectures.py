"""The architecture registry: published configs at real size (meta device), registration, routing details."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import make_model

import moe_interp
from moe_interp.routing import RoutingRule, near_ties

# Published configurations (values from each model's config.json on the Hugging Face hub).
REAL = {
    "OLMoE-1B-7B": (
        "OlmoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            vocab_size=50304,
            max_position_embeddings=4096,
        ),
        16,
        64,
        8,
        list(range(16)),
    ),
    "Mixtral-8x7B": (
        "MixtralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            max_position_embeddings=32768,
        ),
        32,
        8,
        2,
        list(range(32)),
    ),
    "Qwen1.5-MoE-A2.7B": (
        "Qwen2MoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=60,
            num_experts_per_tok=4,
            vocab_size=151936,
            decoder_sparse_step=1,
            max_position_embeddings=8192,
        ),
        24,
        60,
        4,
        list(range(24)),
    ),
    "DeepSeek-V2-Lite": (
        "DeepseekV2Config",
        dict(
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            v_head_dim=128,
            qk_nope_head_dim=128,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            vocab_size=102400,
            max_position_embeddings=163840,
        ),
        26,
        64,
        6,
        list(range(1, 27)),
    ),
    "GPT-OSS-20B": (
        "GptOssConfig",
        dict(
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            vocab_size=201088,
            sliding_window=128,
            max_position_embeddings=131072,
        ),
        24,
        32,
        4,
        list(range(24)),
    ),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_configs_on_meta_device(name):
    cls, values, n_moe, n_experts, k, numbers = REAL[name]
    config = getattr(transformers, cls)(**values)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    arch = moe_interp.get_architecture(model)
    layers = arch.moe_layers(model)
    assert len(layers) == n_moe and [m.number for m in layers] == numbers
    assert arch.num_experts(model.config) == n_experts and arch.top_k(model.config) == k
    assert all(m.router.weight.shape[0] == n_experts for m in layers)
    assert (layers[0].shared_expert is not None) == (arch.shared_expert is not None)


def test_every_registered_type_is_tested():
    from conftest import TINY

    assert set(moe_interp.supported_architectures()) == set(TINY)


def test_applied_weights_match_router_scores_for_rule_based_models(tokenizer):
    """Llama-4 passes no weights to its experts: the rule's weights must equal its router's own scores."""
    model = make_model("llama4_text")
    arch = moe_interp.get_architecture(model)
    got = {}
    handles = [
        m.router.register_forward_hook(lambda mod, a, o, n=m.number: got.__setitem__(n, o[0]))
        for m in arch.moe_layers(model)
    ]
    try:
        t = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    finally:
        for h in handles:
            h.remove()
    for li, number in enumerate(t.layers):
        dense = torch.zeros_like(got[number]).scatter_(-1, t.topk_indices[li], t.topk_weights[li])
        torch.testing.assert_close(dense, got[number].float(), atol=1e-6, rtol=0)


def test_deepseek_v3_records_bias_corrected_selection_scores(tokenizer):
    model = make_model("deepseek_v3")
    t = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    layer = moe_interp.get_architecture(model).moe_layers(model)[0]
    expected = torch.sigmoid(t.router_logits[0]) + layer.router.e_score_correction_bias
    torch.testing.assert_close(t.selection_scores[0], expected, atol=1e-6, rtol=0)
    assert not torch.equal(t.selection_scores[0], t.router_probs[0])


def test_near_ties_flag_close_kth_scores():
    scores = torch.tensor([[0.5, 0.3, 0.2999, 0.0], [0.5, 0.3, 0.1, 0.1]])
    assert near_ties(scores, 2, 1e-3).tolist() == [True, False]
    assert near_ties(scores, 3, 1e-3).tolist() == [False, True]


def test_blocked_experts_are_never_chosen():
    logits = torch.randn(50, 8)
    blocked = torch.zeros(8, dtype=torch.bool)
    blocked[[0, 3]] = True
    config = transformers.DeepseekV3Config(n_group=4, topk_group=2, n_routed_experts=8)
    for rule in (
        RoutingRule(),
        RoutingRule(score="logits", weights="softmax_topk"),
        moe_interp.get_architecture(config).rule,
    ):
        _, idx = rule.route(logits, config, 2, router=None, blocked=blocked)
        assert not torch.isin(idx, torch.tensor([0, 3])).any()


def test_register_a_new_architecture(tokenizer):
    model = make_model("olmoe")
    model.config.model_type = "my_moe"  # as a trust_remote_code model would report itself
    with pytest.raises(moe_interp.UnsupportedModelError, match="'my_moe' is not a supported"):
        moe_interp.trace(model, "Paris", tokenizer=tokenizer)
    from moe_interp.architectures import _REGISTRY

    arch = moe_interp.MoEArchitecture("my_moe", rule=RoutingRule(renormalize="norm_topk_prob"))
    try:
        moe_interp.register_architecture(arch)
        with pytest.raises(ValueError, match="already registered"):
            moe_interp.register_architecture(arch)
        t = moe_interp.trace(model, "Paris", tokenizer=tokenizer)
        assert t.model_type == "my_moe" and t.layers == [0, 1, 2]
    finally:
        _REGISTRY.pop("my_moe", None)


def test_device_map_auto_model_traces_in_place(tmp_path, tokenizer):
    pytest.importorskip("accelerate")
    make_model("mixtral").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="auto", use_safetensors=True
    )
    devices = {n: p.device for n, p in model.named_parameters()}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    a = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    b = moe_interp.trace(ref, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    assert {n: p.device for n, p in model.named_parameters()} == devices
    torch.testing.assert_close(a.router_logits, b.router_logits, atol=1e-6, rtol=0)


def test_bf16_model_records_float32_routing(tokenizer):
    model = make_model("qwen3_moe", dtype=torch.bfloat16)
    t = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    assert t.router_logits.dtype == t.topk_weights.dtype == t.router_probs.dtype == torch.float32
    assert t.near_tie.dtype == torch.bool


def _dense_from_jetmoe(output, n_tokens: int, n_experts: int, k: int) -> torch.Tensor:
    """JetMoE's router returns gates sorted by expert: rebuild the [T, E] weights."""
    sorted_index, _, gates, expert_size, _ = output
    experts = torch.repeat_interleave(torch.arange(n_experts), torch.tensor(expert_size))
    dense = torch.zeros(n_tokens, n_experts)
    dense[sorted_index // k, experts] = gates.float()
    return dense


def test_jetmoe_mlp_and_attention_experts_match_their_routers(tokenizer, tmp_path):
    model = make_model("jetmoe")
    arch = moe_interp.get_architecture(model)
    got: dict[tuple[str, int], tuple] = {}
    routers = [("mlp", m.number, m.router) for m in arch.moe_layers(model)]
    routers += [("attention", n, r) for n, r in arch.extra_router_modules(model)["attention"]]
    handles = [
        r.register_forward_hook(lambda mod, a, o, key=(kind, n): got.__setitem__(key, o))
        for kind, n, r in routers
    ]
    try:
        t = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tokenizer)
    finally:
        for h in handles:
            h.remove()
    n, e, k = len(t.tokens), t.num_experts, t.top_k
    for li, number in enumerate(t.layers):
        dense = torch.zeros(n, e).scatter_(-1, t.topk_indices[li], t.topk_weights[li])
        torch.testing.assert_close(
            dense, _dense_from_jetmoe(got[("mlp", number)], n, e, k), atol=1e-6, rtol=0
        )
    extra = t.extra_routing["attention"]
    for li, number in enumerate(extra["layers"].tolist()):
        dense = torch.zeros(n, e).scatter_(-1, extra["topk_indices"][li], extra["topk_weights"][li])
        torch.testing.assert_close(
            dense, _dense_from_jetmoe(got[("attention", number)], n, e, k), atol=1e-6, rtol=0
        )
    t.save(tmp_path / "t")
    again = moe_interp.MoETrace.load(tmp_path / "t")
    assert torch.equal(again.extra_routing["attention"]["topk_indices"], extra["topk_indices"])
