"""CEFT targets and deltas: exact slices, exact counts, bit-identical untouched elements."""

from __future__ import annotations

import pytest
import torch
from ceft_helpers import qa_records
from conftest import make_model

from moe_interp.architectures import get_architecture
from moe_interp.ceft import (
    CEFTConfig,
    all_experts,
    applied_deltas,
    attention_only,
    ceft,
    count_trainable,
    full_fine_tuning,
    lora_all_experts,
    merge_deltas,
    random_experts,
    resolve_targets,
    router_tuning,
    train,
)
from moe_interp.errors import InputError

torch.set_num_threads(1)


def _layers(model) -> list[int]:
    return [m.number for m in get_architecture(model).moe_layers(model)]


@pytest.mark.parametrize("model_type", ["olmoe", "dbrx", "gpt_oss", "qwen2_moe", "jetmoe", "qwen3_next"])
def test_trainable_counts_are_exact(model_type):
    model = make_model(model_type)
    arch = get_architecture(model)
    layers = arch.moe_layers(model)
    n_exp = arch.num_experts(model.config)
    spec = {layers[0].number: [1, 3], layers[-1].number: [0]}
    per_expert = sum(p.numel() for m in arch.expert_modules(layers[0]) for p in m.parameters()) // n_exp
    assert count_trainable(resolve_targets(model, ceft(spec))) == 3 * per_expert
    total = sum(p.numel() for p in model.parameters())
    assert count_trainable(resolve_targets(model, full_fine_tuning())) == total
    router = sum(p.numel() for m in layers for p in m.router.parameters())
    assert count_trainable(resolve_targets(model, router_tuning())) == router
    # LoRA: r * (a + b) per expert matrix, biases frozen
    expected = sum(
        n_exp * 2 * (p.shape[0] // n_exp + p.shape[-1])
        if p.shape[0] != n_exp
        else n_exp * 2 * (p.shape[-2] + p.shape[-1])
        for m in layers
        for module in arch.expert_modules(m)
        for p in module.parameters()
        if p.dim() - (p.shape[0] == n_exp) == 2
    )
    assert count_trainable(resolve_targets(model, lora_all_experts(2))) == expected
    experts = sum(p.numel() for m in layers for module in arch.expert_modules(m) for p in module.parameters())
    assert count_trainable(resolve_targets(model, all_experts())) == experts
    # every token mixer by name: attention, and linear attention where the model has it (Qwen3-Next)
    mixers = ("self_attn.", "self_attention.", "linear_attn.", "attn.Wqkv", "attn.out_proj")
    by_name = sum(p.numel() for n, p in model.named_parameters() if any(f".{m}" in n for m in mixers))
    assert by_name and count_trainable(resolve_targets(model, attention_only())) == by_name


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3"])
def test_attention_only_changes_only_attention(model_type, tokenizer):
    """The attention control trains exactly the attention modules' parameters (nothing else moves)."""
    model = make_model(model_type)
    attn = {id(p) for _, a in get_architecture(model).attention_modules(model) for p in a.parameters()}
    cfg = CEFTConfig(lr=1e-2, epochs=1, batch_size=4, weight_decay=0.1, warmup_ratio=0.0)
    res = train(model, tokenizer, qa_records(8), method=attention_only(), config=cfg, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_deltas(model, res.targets, res.deltas)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    expected = {n for n, p in model.named_parameters() if id(p) in attn}
    assert moved and moved <= expected
    assert {t.name for t in res.targets} == expected


def test_bad_specs_name_the_problem():
    model = make_model("qwen2_moe")  # layer 1 is dense
    with pytest.raises(InputError, match="layer 1"):
        resolve_targets(model, ceft({1: [0]}))
    with pytest.raises(InputError, match="expert id 9"):
        resolve_targets(model, ceft({0: [9]}))
    with pytest.raises(InputError, match="lora_rank"):
        router_tuning(lora_rank=2)


def test_random_experts_seeded_same_shape():
    like = {0: [1, 2], 2: [5]}
    a, b = random_experts(like, 8, seed=3), random_experts(like, 8, seed=3)
    assert a == b and {k: len(v) for k, v in a.items()} == {0: 2, 2: 1}
    assert random_experts(like, 8, seed=3, exclude=like)[0] not in ([1, 2],)


@pytest.mark.parametrize("model_type", ["olmoe", "dbrx", "gpt_oss", "jetmoe"])
def test_ceft_changes_only_selected_slices(model_type, tokenizer):
    """AdamW with weight decay and momentum: still only the chosen experts' slices change."""
    model = make_model(model_type)
    layers = _layers(model)
    spec = {layers[0]: [1, 3]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CEFTConfig(lr=1e-2, epochs=2, batch_size=4, weight_decay=0.1, warmup_ratio=0.0)
    res = train(model, tokenizer, qa_records(8), method=ceft(spec), config=cfg, progress=False)
    # the caller's model is untouched (same objects, same bits)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    merge_deltas(model, res.targets, res.deltas)
    n_exp = get_architecture(model).num_experts(model.config)
    touched = {t.name for t in res.targets}
    changed_any = False
    for name, p in model.named_parameters():
        if name not in touched:
            assert torch.equal(before[name], p), name
            continue
        new = p.detach().reshape(n_exp, -1)
        old = before[name].reshape(n_exp, -1)
        for e in range(n_exp):
            if e in spec[layers[0]]:
                changed_any |= not torch.equal(new[e], old[e])
            else:
                assert torch.equal(new[e], old[e]), (name, e)
    assert changed_any
    assert res.trainable == count_trainable(res.targets)


def test_applied_deltas_restores_and_matches_training_forward(tokenizer):
    model = make_model("olmoe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CEFTConfig(lr=1e-2, epochs=1, batch_size=4)
    for method in (ceft({0: [2]}, lora_rank=2), lora_all_experts(2), router_tuning(), full_fine_tuning()):
        res = train(model, tokenizer, qa_records(8), method=method, config=cfg, progress=False)
        ids = torch.randint(0, 500, (2, 7))
        with applied_deltas(model, res.source):
            merged = model(input_ids=ids).logits
            assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), method.name
        assert merged.isfinite().all()


def test_load_experts_per_layer_follows_the_ranking(tmp_path):
    """``per_layer=K`` takes the K best-ranked experts of each layer, recomputed independently from the
    scores here; the file's own CE are its top-k."""
    import json

    from moe_interp.ceft import load_experts
    from moe_interp.routerlens.experts import identify_experts

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 1000, (3, 8), generator=g).float()  # [layers, experts], distinct almost surely
    sets = identify_experts(counts, method="count", k=2)
    path = sets.save(tmp_path / "experts.json")
    own = {layer: sorted(v) for layer, v in sets.ce().items()}
    assert load_experts(path) == load_experts(path, per_layer=2) == own
    layers = sorted(sets.ce())
    for k in (1, 3, 8):
        want = {layer: sorted(counts[i].topk(k).indices.tolist()) for i, layer in enumerate(layers)}
        assert load_experts(path, per_layer=k) == want
    with pytest.raises(InputError, match="per_layer=9"):
        load_experts(path, per_layer=9)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"0": [1]}))
    with pytest.raises(InputError, match="Router Lens experts file"):
        load_experts(plain, per_layer=1)


def test_run_methods_per_ce_count():
    """``--ce-per-layer 2,3`` gives one CEFT and its random controls per count, with matching sizes."""
    import argparse

    from moe_interp.ceft.run import _methods, ce_counts

    args = argparse.Namespace(random_seeds="0,1", ceft_lora=True, lora_rank=4, controls=False, methods=None)
    ces = {2: {0: [1, 2]}, 3: {0: [1, 2, 5]}}
    ms = {m.name: m for m in _methods(args, ces, 8)}
    assert {"CEFT-2", "CEFT-3", "Random-2-0", "Random-3-1", "CEFT-3-LoRA4", "FFT", "RT"} <= set(ms)
    assert len(ms["Random-3-1"].experts[0]) == 3 and ms["CEFT-2"].experts == {0: (1, 2)}
    default = {m.name for m in _methods(args, {None: {0: [1]}}, 8)}
    assert {"CEFT", "Random-0", "Random-1", "CEFT-LoRA4"} <= default
    assert ce_counts("2, 6") == [2, 6] and ce_counts(None) == []
    with pytest.raises(InputError, match="ce-per-layer"):
        ce_counts("two")
