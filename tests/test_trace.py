"""trace() against independent references, on tiny random models of every registered architecture."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import make_model
from safetensors.torch import load_file, save_file

import moe_interp
from moe_interp.errors import InputError, UnsupportedModelError
from moe_interp.routing import near_ties

CONTEXT = "The Eiffel Tower is in Paris. Paris is in France."
PROMPTS = [
    f"Context: {CONTEXT} Question: Where is the Eiffel Tower? Answer:",
    "The mother tongue of Danielle Darrieux is",
    "Question: café naïve 東京?",
]


def _padded(tokenizer, prompts):
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def test_router_logits_match_model_output(model_type, tokenizer):
    model = make_model(model_type)
    t = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer)
    ids, mask = _padded(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    valid = mask.flatten().bool()
    ref = torch.stack([r for r in out.router_logits])[:, valid].float()
    if t.extra_routing:  # JetMoE returns (attention router, MLP router) logits for every layer, interleaved
        attention = t.extra_routing["attention"]["router_logits"]
        torch.testing.assert_close(attention, ref[0::2], atol=1e-6, rtol=0)
        ref = ref[1::2]
    assert t.router_logits.shape == ref.shape == (len(t.layers), int(mask.sum()), t.num_experts)
    torch.testing.assert_close(t.router_logits, ref, atol=1e-6, rtol=0)
    # next-token logits at each prompt's last real token
    last = mask.sum(1) - 1
    torch.testing.assert_close(t.next_token_logits, out.logits[torch.arange(3), last], atol=1e-6, rtol=0)
    arch = moe_interp.get_architecture(model)
    probs = torch.sigmoid(ref) if arch.rule.score == "sigmoid" else torch.softmax(ref, -1)
    torch.testing.assert_close(t.router_probs, probs, atol=1e-6, rtol=0)


def test_routing_rule_reproduces_the_model(model_type, tokenizer):
    """The declarative rule, applied to the logits, gives the experts and weights the model applied."""
    model = make_model(model_type)
    arch = moe_interp.get_architecture(model)
    t = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer)
    for li, layer in enumerate(arch.moe_layers(model)):
        weights, indices = arch.rule.route(t.router_logits[li], model.config, t.top_k, layer.router)
        order_t, order_r = t.topk_indices[li].argsort(-1), indices.argsort(-1)
        assert torch.equal(t.topk_indices[li].gather(-1, order_t), indices.gather(-1, order_r))
        torch.testing.assert_close(
            t.topk_weights[li].gather(-1, order_t), weights.gather(-1, order_r), atol=1e-6, rtol=1e-6
        )
    assert (t.selection_scores is not None) == (model_type == "deepseek_v3")
    # near ties: the k-th and (k+1)-th of the scores the rule chooses by (among the experts the group limit
    # leaves eligible; the model's choices lie among them), recomputed from the logits
    ms = arch.moe_layers(model)
    choice = torch.stack([arch.rule.choice_scores(t.router_logits[i], m.router) for i, m in enumerate(ms)])
    eligible, group_gap = choice, torch.full(choice.shape[:-1], float("inf"))
    if t.near_tie_groups is not None:
        n_group, topk_group, how = t.near_tie_groups
        grouped = choice.unflatten(-1, (n_group, -1))  # [L, N, G, E / G]
        group_scores = grouped.amax(-1) if how == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        ranked = group_scores.sort(-1, descending=True)
        top_groups = ranked.indices[..., :topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, top_groups, True)
        eligible = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)
        chosen_sets = eligible.topk(t.top_k, dim=-1).indices.sort(-1).values
        assert torch.equal(chosen_sets, t.topk_indices.sort(-1).values)  # the model chose among them
        group_gap = ranked.values[..., topk_group - 1] - ranked.values[..., topk_group]
    if choice.shape[-1] > t.top_k:
        top = eligible.topk(t.top_k + 1, dim=-1).values
        gap = torch.minimum(top[..., t.top_k - 1] - top[..., t.top_k], group_gap)
        assert torch.equal(t.near_tie, gap <= 1e-3)
        tol = float(gap.median())  # about half the tokens flagged: a wrong score field would show
        half = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer, near_tie_tol=tol).near_tie
        assert torch.equal(half, gap <= tol) and 0 < int(half.sum()) < half.numel()
        t.near_tie_tol = tol  # a changed tolerance is applied when the flags are read again
        assert torch.equal(t.near_tie, half)
        t.near_tie_tol = 1e-3
    assert t.near_tie.shape == t.topk_indices.shape[:2] and t.near_tie.dtype == torch.bool
    assert torch.equal(t[1].near_tie, t.near_tie[:, t.token_slice(1)])


#: expert weights laid out as gate_up_proj [E, 2I, d] (gate then up), down_proj [E, d, I], no biases
STANDARD_EXPERTS = {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3"}


def test_expert_outputs_recombine_to_block_output(model_type, tokenizer):
    model = make_model(model_type)
    arch = moe_interp.get_architecture(model)
    if not arch.expert_outputs:
        with pytest.raises(ValueError, match=f"not available for model type '{model_type}'"):
            moe_interp.trace(model, PROMPTS, tokenizer=tokenizer, expert_outputs=True)
        return
    layers = arch.moe_layers(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(number):
        def hook(module, args, output):
            seen[number] = (args[0], output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layer.block.register_forward_hook(keep(layer.number)) for layer in layers]
    try:
        t = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer, expert_outputs=True)
    finally:
        for h in handles:
            h.remove()
    valid = _padded(tokenizer, PROMPTS)[1].flatten().bool()
    for li, layer in enumerate(layers):
        block_in, block_out = seen[layer.number]
        block_in = block_in.reshape(-1, block_in.shape[-1])[valid]
        block_out = block_out.reshape(-1, block_out.shape[-1])[valid]
        torch.testing.assert_close(t.block_outputs[li], block_out, atol=1e-6, rtol=0)
        if model_type in STANDARD_EXPERTS:  # independent recomputation from the fused 3-D weights
            ex = layer.experts
            for slot in range(t.top_k):
                e = t.topk_indices[li, :, slot]
                gate, up = torch.einsum("nd,nfd->nf", block_in, ex.gate_up_proj[e]).chunk(2, dim=-1)
                ref = torch.einsum("nf,ndf->nd", ex.act_fn(gate) * up, ex.down_proj[e])
                torch.testing.assert_close(t.expert_outputs[li, :, slot], ref, atol=1e-5, rtol=1e-5)
        shared = t.shared_outputs[li] if t.shared_outputs is not None else 0.0
        weights = 1.0 if t.weights_scale_input else t.topk_weights[li, ..., None]  # Llama-4 scales the input
        recon = (weights * t.expert_outputs[li]).sum(1) + shared
        torch.testing.assert_close(recon, block_out, atol=1e-5, rtol=0)
    assert (t.shared_outputs is not None) == (arch.shared_expert is not None or model_type == "jetmoe")


def test_dense_layers_keep_model_numbering(tokenizer):
    model = make_model("qwen2_moe")  # mlp_only_layers=[1]
    t = moe_interp.trace(model, PROMPTS[0], tokenizer=tokenizer)
    assert t.layers == [0, 2]
    assert t.layer_index(2) == 1
    with pytest.raises(InputError, match="not an MoE layer"):
        t.layer_index(1)


@pytest.mark.parametrize("mode", ["with-maps", "spans-only", "spans-sliced", "spans-fused", "eager-kernel"])
def test_attention_to_spans_matches_eager_maps(model_type, tokenizer, mode, monkeypatch):
    """Span masses from the probabilities (with maps, or spans only, by one bmm or by sums over each span's
    key columns, used for long prompts; forced here), from the fused kernel with span indicators as values
    (used for large maps; forced here), or taken from an eager kernel's own output, against transformers'
    eager attention maps."""
    full = mode == "with-maps"
    if mode == "spans-fused":
        monkeypatch.setattr(moe_interp.attention, "FUSED_CPU_BYTES", 0)
    if mode == "spans-sliced":
        monkeypatch.setattr(moe_interp.recording, "SLICED_FROM_KEYS", 0)
    recomputed = []
    if mode == "eager-kernel":
        own = moe_interp.attention.attention_probs
        monkeypatch.setattr(
            moe_interp.attention, "attention_probs", lambda *a, **k: recomputed.append(1) or own(*a, **k)
        )
    sdpa = make_model(model_type, attn="sdpa")
    eager = make_model(model_type, attn="eager")
    answers = ["Paris", None, None]
    contexts = [CONTEXT, None, None]
    t = moe_interp.trace(
        eager if mode == "eager-kernel" else sdpa,
        PROMPTS,
        context=contexts,
        answer=answers,
        tokenizer=tokenizer,
        full_attention=full,
    )
    if mode == "eager-kernel":  # eager's own probabilities were recorded (GPT-OSS' include its sinks)
        assert bool(recomputed) == (model_type == "gpt_oss")
    ids, mask = _padded(tokenizer, PROMPTS)
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert t.span_names == ("context", "answer")
    assert len(t.spans[0]["answer"]) == 2  # both occurrences of "Paris" inside the context
    n0 = int(mask[0].sum())
    span_tok = torch.zeros(len(t.span_names), n0)
    for s, name in enumerate(t.span_names):
        for a, b in t.spans[0][name]:
            span_tok[s, a:b] = 1
    # transformers returns maps only for softmax-attention layers (Qwen3-Next also has linear attention)
    by_layer = dict(zip(t.attention_layers, ref, strict=True)) if len(ref) == len(t.attention_layers) else ref
    for li, layer in enumerate(t.attention_layers):
        probs = by_layer[layer][0, :, :n0, :n0]  # [H, T, T]
        if full:
            torch.testing.assert_close(t.attention_maps[0][li], probs, atol=1e-5, rtol=0)
        else:
            assert t.attention_maps is None
        mass = torch.einsum("hqk,sk->qhs", probs, span_tok)
        torch.testing.assert_close(t.attn_to_spans[li, t.token_slice(0)], mass, atol=1e-5, rtol=0)
    # prompts without spans pay no attention to them
    assert t.attn_to_spans[:, t.token_slice(1)].abs().max() == 0


def test_spans_are_exact_tokens(tokenizer):
    model = make_model("olmoe")
    prompt = PROMPTS[0]
    t = moe_interp.trace(model, prompt, context=CONTEXT, answer="Paris", tokenizer=tokenizer)
    ctx = "".join("".join(t.tokens[a:b]) for a, b in t.spans[0]["context"])
    assert ctx.strip() == CONTEXT
    assert all("".join(t.tokens[a:b]).strip() == "Paris" for a, b in t.spans[0]["answer"])
    assert int(t.span_mask("answer").sum()) >= 2


def test_batched_equals_unbatched(model_type, tokenizer):
    model = make_model(model_type)
    batch = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer)
    for i, p in enumerate(PROMPTS):
        one = moe_interp.trace(model, p, tokenizer=tokenizer)
        sl = batch.token_slice(i)
        torch.testing.assert_close(batch.router_logits[:, sl], one.router_logits, atol=1e-5, rtol=0)
        assert torch.equal(batch.token_ids[sl], one.token_ids)
        assert batch.tokens[sl] == one.tokens


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3", "jetmoe"])
def test_indexing_a_trace_gives_each_prompt_alone(model_type, tokenizer):
    """t[i] holds what tracing prompt i on its own records (every field, spans and attention included)."""
    model = make_model(model_type)
    ctx = [CONTEXT, None, None]
    ans = ["Paris", None, None]
    kw = dict(tokenizer=tokenizer, full_attention=True, expert_outputs=True)
    batch = moe_interp.trace(model, PROMPTS, context=ctx, answer=ans, **kw)
    assert [t.prompts for t in batch] == [[p] for p in PROMPTS]  # iteration stops at the end
    for i, p in enumerate(PROMPTS):
        one = moe_interp.trace(model, p, context=ctx[i], answer=ans[i], **kw)
        sub = batch[i - len(PROMPTS)] if i == 2 else batch[i]  # negative indices too
        assert sub.tokens == one.tokens and sub.spans == one.spans and torch.equal(sub.example, one.example)
        for name in ("router_logits", "router_probs", "topk_weights", "next_token_logits", "block_outputs"):
            torch.testing.assert_close(getattr(sub, name), getattr(one, name), atol=1e-4, rtol=1e-4)
        assert torch.equal(sub.topk_indices, one.topk_indices)
        torch.testing.assert_close(sub.attention_maps[0], one.attention_maps[0], atol=1e-5, rtol=0)
        if one.span_names:
            torch.testing.assert_close(sub.attn_to_spans, one.attn_to_spans, atol=1e-5, rtol=0)
        for name, parts in one.extra_routing.items():
            torch.testing.assert_close(sub.extra_routing[name]["router_logits"], parts["router_logits"])
        assert torch.equal(sub.selection_counts(), one.selection_counts())

    assert batch[np.int64(1)].prompts == batch[torch.tensor(1)].prompts == [PROMPTS[1]]
    # counting's span names: "context_answer" only where a prompt has a context, "last" one token each
    assert batch.span_mask("context_answer").sum() == batch.span_mask("answer")[batch.token_slice(0)].sum()
    assert not batch.span_mask("context_answer")[batch.token_slice(1)].any()
    assert batch.span_mask("last").sum() == 3 and torch.equal(
        batch.span_mask("prompt"), batch.span_mask("all")
    )
    mixed = moe_interp.trace(
        model, PROMPTS[:2], context=[CONTEXT, None], answer=["Paris", "Danielle"], tokenizer=tokenizer
    )
    assert mixed.span_mask("answer")[mixed.token_slice(1)].any()  # in the prompt: no context given
    assert not mixed.span_mask("context_answer")[mixed.token_slice(1)].any()
    with pytest.raises(IndexError, match="out of range for a trace of 3 prompts"):
        batch[3]
    for wrong in ("0", True):
        with pytest.raises(TypeError, match="prompt number"):
            batch[wrong]
    assert batch.token_slice(np.int64(1)) == batch.token_slice(1)


def test_padding_never_counted(tokenizer):
    model = make_model("mixtral")
    t = moe_interp.trace(model, PROMPTS, tokenizer=tokenizer)
    n_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert len(t.tokens) == n_tokens
    assert t.selection_counts().sum(1).tolist() == [n_tokens * t.top_k] * len(t.layers)
    assert tokenizer.pad_token_id not in t.token_ids.tolist()


def _state(model):
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    configs = [getattr(m, "config", None) for m in model.modules()]
    return (
        hooks,
        [m.training for m in model.modules()],
        [id(c) for c in configs],
        model.config._attn_implementation,
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def _same(a, b):
    assert a[:4] == b[:4]
    assert a[5] == b[5]
    assert a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def test_no_side_effects_and_identical_outputs(model_type, tokenizer):
    model = make_model(model_type)
    model.train()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    before = _state(model)
    ids, mask = _padded(tokenizer, PROMPTS)
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    model.train()
    moe_interp.trace(
        model,
        PROMPTS,
        context=[CONTEXT, None, None],
        answer=["Paris", None, None],
        tokenizer=tokenizer,
        expert_outputs=moe_interp.get_architecture(model).expert_outputs,
        full_attention=True,
    )
    _same(before, _state(model))
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, after)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_hooks_removed_when_forward_raises(tokenizer, exc):
    model = make_model("olmoe")
    target = model.model.layers[1].mlp.experts

    def boom(module, args):
        raise exc("boom")

    handle = target.register_forward_pre_hook(boom)
    before = _state(model)
    with pytest.raises(exc):
        moe_interp.trace(
            model, PROMPTS, context=[CONTEXT, None, None], tokenizer=tokenizer, expert_outputs=True
        )
    _same(before, _state(model))
    handle.remove()


def test_trace_is_equal_on_an_eval_or_train_model(tokenizer):
    model = make_model("mixtral")
    a = moe_interp.trace(model, PROMPTS[0], tokenizer=tokenizer)
    model.train()
    b = moe_interp.trace(model, PROMPTS[0], tokenizer=tokenizer)
    assert model.training
    assert torch.equal(a.router_logits, b.router_logits)


def test_from_pretrained_local_folder(tmp_path, tokenizer):
    model = make_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert (tmp_path / "model.safetensors").is_file()
    a = moe_interp.trace(model, PROMPTS[1], tokenizer=tokenizer)
    b = moe_interp.trace(loaded, PROMPTS[1], tokenizer=tokenizer)
    assert torch.equal(a.router_logits, b.router_logits)


# ---------------------------------------------------------------------------------------------- bad input
def test_not_moe_model_is_named(tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    dense = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*Supported: .*mixtral.*olmoe"):
        moe_interp.trace(dense, "hello", tokenizer=tokenizer)
    with pytest.raises(UnsupportedModelError, match="Linear has no config.model_type"):
        moe_interp.trace(torch.nn.Linear(2, 2), "hello", tokenizer=tokenizer)


def test_bad_prompts_and_spans(tokenizer):
    model = make_model("olmoe")
    with pytest.raises(ValueError, match="'Berlin' not found in the context"):
        moe_interp.trace(model, PROMPTS[0], context=CONTEXT, answer="Berlin", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="context 'Rome is in Italy.' not found"):
        moe_interp.trace(model, PROMPTS[0], context="Rome is in Italy.", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty"):
        moe_interp.trace(model, "   ", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        moe_interp.trace(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        moe_interp.trace(model, PROMPTS, context=[CONTEXT, None], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="128 positions"):
        moe_interp.trace(model, "Paris " * 200, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        moe_interp.trace(model, "Paris")
    with pytest.raises(InputError, match="tokenizer must be a loaded tokenizer object, got str 'gpt2'"):
        moe_interp.trace(model, "Paris", tokenizer="gpt2")
    with pytest.raises(InputError, match="full_attention must be True or False, got 'yes'"):
        moe_interp.trace(model, "Paris", tokenizer=tokenizer, full_attention="yes")
    with pytest.raises(InputError, match="full_attention=True records attention maps: it needs attention"):
        moe_interp.trace(model, "Paris", tokenizer=tokenizer, attention=False, full_attention=True)
    for tol in (-1e-3, "0.1", float("nan"), float("inf"), True, torch.tensor(0.1)):
        with pytest.raises(InputError, match="near_tie_tol must be a finite number >= 0"):
            moe_interp.trace(model, "Paris", tokenizer=tokenizer, near_tie_tol=tol)
    assert (
        moe_interp.trace(model, "Paris", tokenizer=tokenizer, near_tie_tol=np.float32(0.5)).near_tie_tol
        == 0.5
    )
    with pytest.raises(InputError, match="near_tie_scores must name a recorded score field"):
        dataclasses.replace(
            moe_interp.trace(model, "Paris", tokenizer=tokenizer), near_tie_scores="selection_scores"
        )


# ---------------------------------------------------------------------------------------------- views
def test_routing_frame_is_consistent(tokenizer):
    model = make_model("qwen2_moe")
    t = moe_interp.trace(
        model, PROMPTS[:2], context=[CONTEXT, None], answer=["Paris", None], tokenizer=tokenizer
    )
    df = t.routing_frame()
    n = len(t.tokens)
    assert len(df) == len(t.layers) * n * t.num_experts
    assert set(df.columns) >= {
        "layer",
        "position",
        "token",
        "expert",
        "logit",
        "prob",
        "rank",
        "selected",
        "span",
    }
    assert df.groupby(["layer", "example", "position"])["selected"].sum().eq(t.top_k).all()
    assert df.groupby(["layer", "example", "position"])["prob"].sum().sub(1).abs().max() < 1e-5
    top = df[df["rank"] == 0]
    assert (top["logit"].to_numpy() == t.router_logits.max(-1).values.flatten().numpy()).all()
    assert set(df.loc[df.span == "answer", "token"].str.strip()) == {"Paris"}
    assert sorted(df.layer.unique()) == t.layers


def test_save_load_roundtrip(tmp_path, tokenizer):
    model = make_model("olmoe")
    t = moe_interp.trace(
        model, PROMPTS[:2], context=[CONTEXT, None], tokenizer=tokenizer, full_attention=True
    )
    t.save(tmp_path / "t")
    u = moe_interp.MoETrace.load(tmp_path / "t")
    assert u.spans == t.spans and u.tokens == t.tokens and u.layers == t.layers
    assert torch.equal(u.router_logits, t.router_logits) and torch.equal(u.attn_to_spans, t.attn_to_spans)
    assert all(torch.equal(a, b) for a, b in zip(u.attention_maps, t.attention_maps, strict=True))
    assert (u.near_tie_tol, u.near_tie_scores) == (t.near_tie_tol, t.near_tie_scores)
    assert torch.equal(u.near_tie, t.near_tie)
    # a trace saved when near-tie flags were stored as a tensor (no tolerance in meta.json) keeps them
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    del meta["near_tie_tol"], meta["near_tie_scores"], meta["near_tie_groups"]
    tensors = load_file(str(tmp_path / "t" / "tensors.safetensors"))
    stored = torch.ones_like(t.near_tie)  # flags a recomputation would not give
    (tmp_path / "old").mkdir()
    save_file({**tensors, "near_tie": stored}, str(tmp_path / "old" / "tensors.safetensors"))
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    old = moe_interp.MoETrace.load(tmp_path / "old")
    assert torch.equal(old.near_tie, stored) and old.near_tie_scores == "router_probs"
    old.near_tie_tol = 0.5  # a new tolerance recomputes them
    assert torch.equal(old.near_tie, near_ties(old.router_probs, old.top_k, 0.5))
    with pytest.raises(ValueError, match="not a saved MoETrace"):
        moe_interp.MoETrace.load(tmp_path)
    (tmp_path / "t" / "meta.json").write_text("{not json")
    with pytest.raises(InputError, match="damaged MoETrace"):
        moe_interp.MoETrace.load(tmp_path / "t")
    with pytest.raises(InputError, match="prompt index"):
        t.token_slice(1.0)
    with pytest.raises(InputError, match="max_tokens"):
        t.plot_routing(0, max_tokens=0)


def test_plots_render(tokenizer):
    model = make_model("mixtral")
    t = moe_interp.trace(model, PROMPTS[0], context=CONTEXT, answer="Paris", tokenizer=tokenizer)
    fig = t.plot_routing()
    heat = fig.data[0]
    assert heat.z.shape == (len(t.layers), len(t.tokens))
    assert (heat.z == t.topk_indices[:, :, 0].numpy()).all()
    sel = t.plot_selection()
    assert abs(sel.data[0].z.sum(1) - 1).max() < 1e-6


def test_answer_spans_are_whole_words_and_inputs_are_checked(tokenizer):
    model = make_model("olmoe")
    prompt = "The USSR and the US met."
    t = moe_interp.trace(model, prompt, answer="US", tokenizer=tokenizer, attention=False)
    ((start, end),) = t.spans[0]["answer"]
    assert "".join(t.tokens[start:end]).strip() == "US"
    for bad in (5, None, {"a": "hello"}, b"hello"):
        with pytest.raises(InputError, match="prompt must be a string"):
            moe_interp.trace(model, bad, tokenizer=tokenizer)
    with pytest.raises(InputError, match=r"context\[0\] must be a string"):
        moe_interp.trace(model, [prompt], context=[5], tokenizer=tokenizer)
    with pytest.raises(InputError, match="answer must be a string"):
        moe_interp.trace(model, prompt, answer=5, tokenizer=tokenizer)


def test_repr_lists_shapes_not_values(tokenizer):
    model = make_model("olmoe")
    t = moe_interp.trace(
        model, PROMPTS, context=[CONTEXT, None, None], answer=["Paris", None, None], tokenizer=tokenizer
    )
    text = repr(t)
    assert text.startswith("MoETrace(olmoe, 3 prompt(s)")
    assert f"router_logits={list(t.router_logits.shape)}" in text
    assert f"attn_to_spans={list(t.attn_to_spans.shape)}" in text
    assert "tensor(" not in text and len(text) < 1000
