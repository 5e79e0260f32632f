"""Tests for the embedded demo model, its data splits and its model card (fast, offline)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from moe_interp.demo import SPLIT_NAMES, WEIGHTS_DIR, load_demo, load_split
from moe_interp.demo.evaluate import TEST_SAMPLE_N, exact_match, measure, normalize
from moe_interp.prompts import ANSWER_CUE, build_prompt

MAX_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def demo():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    model, tok = load_demo()
    return model, tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((WEIGHTS_DIR / "card.json").read_text())


@pytest.fixture(scope="module")
def sample_metrics(demo) -> dict:
    model, tok, _ = demo
    torch.manual_seed(0)
    return measure(model, tok, TEST_SAMPLE_N)


def test_load_demo(demo) -> None:
    from transformers import PreTrainedTokenizerFast, Qwen2MoeForCausalLM

    model, tok, seconds = demo
    print(f"load_demo took {seconds:.2f} s")
    assert seconds < 10
    assert isinstance(model, Qwen2MoeForCausalLM) and isinstance(tok, PreTrainedTokenizerFast)
    # the recipe's one architectural choice: layer 0 sees only a short window, later layers everything
    assert model.config.layer_types[0] == "sliding_attention" and model.config.sliding_window == 8
    assert set(model.config.layer_types[1:]) == {"full_attention"}
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


def test_weight_files() -> None:
    files = [p for p in WEIGHTS_DIR.iterdir() if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "card.json"} <= names
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".pkl"} for p in files)
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_prompt_format() -> None:
    p = build_prompt("Paris is in France.", "Paris is in")
    assert p.startswith("Based on the context below, output the correct answer for the following question.")
    assert p.endswith("Question:\nParis is in" + ANSWER_CUE)
    assert build_prompt(None, "Paris is in") == "Question:\nParis is in" + ANSWER_CUE


def test_tokenizer_offsets(demo) -> None:
    _, tok, _ = demo
    text = build_prompt("The mother tongue of Danielle Darrieux is French.", "The mother tongue of X is")
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    start = text.index("French")
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= start < b]
    assert len(hit) == 1
    assert tok.decode(enc["input_ids"]) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in tok("Ünïcødé — 東京 ✓")["input_ids"]


def test_exact_match() -> None:
    assert normalize(" The  French.") == "french"
    assert exact_match(" French", "French") and exact_match(" french people", "French")
    assert not exact_match(" Frenchman", "French") and not exact_match("", "French")


def test_splits_present_and_disjoint() -> None:
    data = {name: load_split(name) for name in SPLIT_NAMES}
    for name, recs in data.items():
        assert recs, name
        for r in recs:
            assert {"id", "subject", "question", "true_object", "counterfactual_object"} <= set(r), name
    subjects = {name: {r["subject"].lower() for r in recs} for name, recs in data.items()}
    groups = {
        "memorised": subjects["memorised"],
        "context_pool": subjects["context_pool"],
        "held_out": subjects["support_test"] | subjects["support_test_distractor"] | subjects["support_dev"],
    }
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not groups[a] & groups[b], (a, b)
    assert not subjects["support_test"] & subjects["support_dev"]
    mem_role = {r["id"]: r["role"] for r in data["memorised"]}
    conflict_ids = []
    for name in ("conflict_tune", "conflict_dev", "conflict_test"):
        for r in data[name]:
            assert mem_role[r["id"]] == name
            assert r["context_answer"] == r["counterfactual_object"] != r["true_object"]
            assert f"{r['question']} {r['counterfactual_object']}." in r["context"]
            conflict_ids.append(r["id"])
    assert len(conflict_ids) == len(set(conflict_ids))
    assert len(data["conflict_test"]) >= 300 and 500 <= len(data["conflict_tune"]) <= 1000
    assert [r["id"] for r in data["support_test"]] == [r["id"] for r in data["support_test_distractor"]]
    assert all(r["n_distractors"] == 0 for r in data["support_test"])
    assert all(r["n_distractors"] == 1 for r in data["support_test_distractor"])
    for r in data["support_test"] + data["support_test_distractor"]:
        assert r["context_answer"] == r["true_object"]
        assert f"{r['question']} {r['true_object']}." in r["context"]


def test_load_split_unknown() -> None:
    with pytest.raises(KeyError, match="conflict_test"):
        load_split("nope")


def _tolerance(p: float, n: int) -> float:
    """Three standard errors of a proportion (p clipped to [0.05, 0.95]) plus a 0.02 margin."""
    q = min(max(p, 0.05), 0.95)
    return 3 * math.sqrt(q * (1 - q) / n) + 0.02


@pytest.mark.parametrize("metric", ["closed_book", "support", "pc", "po"])
def test_card_numbers_reproduce(sample_metrics: dict, card: dict, metric: str) -> None:
    got = sample_metrics[metric]
    want = card["metrics"][metric]["value"]
    assert abs(got["value"] - want) <= _tolerance(want, got["n"]), (metric, got, want)


def test_card_floors(card: dict) -> None:
    m = card["metrics"]
    assert m["closed_book"]["value"] >= 0.90
    assert m["support"]["value"] >= 0.90
    assert 0.10 <= m["pc"]["value"] <= 0.70
    assert all(layer["used_frac"] >= 0.75 for layer in m["expert_usage"])


def test_expert_load(sample_metrics: dict) -> None:
    for layer in sample_metrics["expert_usage"]:
        assert layer["used_frac"] >= 0.75, sample_metrics["expert_usage"]


def test_window_layer_attention_matches_eager(demo) -> None:
    """The demo's sliding-window layer 0 and full layers 1-3: attention to the context / answer spans
    recorded by ``trace`` on the sdpa model equals the eager model's own ``output_attentions`` maps."""
    import copy

    import moe_interp

    model, tok, _ = demo
    recs = load_split("conflict_test")[:3]
    prompts = [build_prompt(r["context"], r["question"]) for r in recs]
    t = moe_interp.trace(
        model,
        prompts,
        context=[r["context"] for r in recs],
        answer=[r["context_answer"] for r in recs],
        tokenizer=tok,
    )
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            maps = eager(input_ids=ids, output_attentions=True).attentions  # L x [1, H, T, T]
        span_tok = torch.zeros(len(t.span_names), ids.shape[1])
        for s, name in enumerate(t.span_names):
            for a, b in t.spans[i][name]:
                span_tok[s, a:b] = 1
        for li, layer in enumerate(t.attention_layers):
            mass = torch.einsum("hqk,sk->qhs", maps[layer][0], span_tok)
            torch.testing.assert_close(t.attn_to_spans[li, t.token_slice(i)], mass, atol=1e-5, rtol=0)
        # layer 0 sees the last 8 tokens only: the final prompt token cannot reach the context
        assert t.attn_to_spans[0, t.token_slice(i).stop - 1, :, 0].abs().max() == 0


def test_demo_job_writes_figures_and_counts_every_prompt_token(tmp_path, demo):
    """The main job (``make demo``) at a small size: two batches (the second padded), figures sharing one
    plotly.js, and a summary whose token count is the prompts' own token count (padding excluded)."""
    from moe_interp import demo_job

    _, tok, _ = demo
    summary = demo_job.run(n_examples=6, batch_size=4, out_dir=tmp_path)
    records = load_split("conflict_test")[:6]
    tokens = sum(len(tok(build_prompt(r["context"], r["question"]))["input_ids"]) for r in records)
    assert f"prompt tokens traced (padding excluded): {tokens}\n" in summary
    assert (tmp_path / "demo_summary.txt").read_text() == summary
    for name in ("demo_routing_heatmap.html", "demo_token_routing.html"):
        html = (tmp_path / name).read_text()
        assert 'src="plotly.min.js"' in html and len(html) < 1_000_000  # plotly.js once, beside them
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert "Pc, first token" in summary and "layer 3:" in summary
