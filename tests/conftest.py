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
}


def make_model(model_type: str, attn: str = "sdpa", seed: int = 0, dtype=torch.float32):
    cls_name, extra = TINY[model_type]
    config = getattr(transformers, cls_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    with torch.no_grad():  # routers start at zero in some models: give them signal
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0, 0.5)
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
