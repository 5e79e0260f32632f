"""Tiny random MoE models of every registered architecture, built offline from their Config classes."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 512

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
)

# model_type -> (config class, extra config values)
TINY = {
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=6)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1]
        ),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=24, norm_topk_prob=True)),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            num_experts=8,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            head_dim=8,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "full_attention"],
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            n_shared_experts=1,
            moe_intermediate_size=24,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            n_shared_experts=1,
            moe_intermediate_size=24,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        ),
    ),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=8, head_dim=8, sliding_window=8)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=8)),
    "dbrx": (
        "DbrxConfig",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=3,
            max_seq_len=128,
            vocab_size=VOCAB,
            ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2),
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            intermediate_size_mlp=64,
            head_dim=8,
            moe_layers=[0, 2],
        ),
    ),
    "jetmoe": ("JetMoeConfig", dict(num_local_experts=8, kv_channels=8, num_key_value_heads=4)),
}
#: the architectures built from plain ``_COMMON`` values (DBRX names its sizes differently)
_OWN_SIZES = {"dbrx"}
#: architectures whose transformers implementation has no sdpa path
_EAGER_ONLY = {"gpt_oss"}


def make_model(model_type: str, attn: str = "sdpa", seed: int = 0, dtype=torch.float32):
    cls_name, extra = TINY[model_type]
    values = extra if model_type in _OWN_SIZES else {**_COMMON, **extra}
    config = getattr(transformers, cls_name)(**values)
    torch.manual_seed(seed)
    if model_type in _EAGER_ONLY:
        attn = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    with torch.no_grad():  # routers start at zero in some models: give them signal
        for name, p in model.named_parameters():
            if name.endswith(
                ("gate.weight", "router.weight", "router.layer.weight")
            ):  # (JetMoE: router.layer)
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():  # DeepSeek-V3's choice-only bias is a buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory (no download possible here)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Based on the context below, output the correct answer for the following question.",
        "Context: The Eiffel Tower is in Paris. Question: Where is the Eiffel Tower? Answer: Paris",
        "The mother tongue of Danielle Darrieux is French. Ünïcode café naïve 東京",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=sorted(TINY))
def model_type(request) -> str:
    return request.param
