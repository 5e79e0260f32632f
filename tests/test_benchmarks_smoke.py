"""The benchmarks run at a tiny size, so they cannot rot (their numbers live in the README, not here)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_overhead_smoke(tmp_path):
    out = tmp_path / "r.json"
    _load("trace_overhead").main(
        ["--reps", "1", "--models", "olmoe", "--shapes", "1x16", "--threads", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    variants = {r["variant"] for r in result["rows"]}
    assert {"plain forward", "trace: routing", "trace: routing + attention to spans"} <= variants
    assert all(r["ratio"] > 0 for r in result["rows"])
    assert result["memory"][0]["ratio"] >= 1
    table = _load("readme_table").render(result)  # the README's table renders from the same JSON
    assert "| trace: routing |" in table and "olmoe 1x16" in table
    row = next(r for r in result["rows"] if r["variant"] == "trace: routing")
    assert f"{row['ratio']:.2f}x / {row['ratio_last_token_logits']:.2f}x" in table
    # --only: the two plain forwards and the named variants
    _load("trace_overhead").main(
        ["--reps", "1", "--models", "olmoe", "--shapes", "1x16", "--threads", "1", "--out", str(out)]
        + ["--only", "trace: routing + attention to spans|routers + eager"]
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {
        "plain forward",
        "plain forward, last-token logits (logits_to_keep)",
        "trace: routing + attention to spans",
        "trace: routing + attention to spans, eager-attention copy",
        "nnsight: routers + eager attention maps -> span masses",
        "nnsight from prompts: locate spans, routers + eager attention maps -> span masses",
    }


def test_routerlens_counting_smoke(tmp_path):
    out = tmp_path / "c.json"
    _load("routerlens_counting").main(
        ["--repeats", "1", "--limit", "16", "--batch-size", "8", "--memory-sizes", "12", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["examples"] == 16 and result["ratio"] > 0
    assert [row["examples"] for row in result["memory"]] == [12]
    row = result["memory"][0]
    assert len(row["chunk_peak_growth_mb"]) == 1 and row["later_chunks_peak_growth_mb"] is None


def test_nnsight_peer_records_the_same_quantities_as_trace(tmp_path):
    """The like-for-like nnsight peer returns exactly what ``trace: routing`` records (so their timings
    compare the same work): router logits, probabilities, applied top-k indices and weights, token strings."""
    import pytest

    pytest.importorskip("nnsight")
    import torch

    import moe_interp

    bench = _load("trace_overhead")
    model = bench._random_model("olmoe")
    tok = bench._tokenizer(model.config.vocab_size)
    prompts, contexts, answers = bench._prompts(tok, 2, 16)
    variants = bench._variants(model, tok, prompts, contexts, answers, tmp_path)
    (logits, probs, indices, weights), tokens, _ = variants[bench.NNSIGHT_SAME]()
    t = moe_interp.trace(model, prompts, tokenizer=tok, attention=False)
    torch.testing.assert_close(logits, t.router_logits)
    torch.testing.assert_close(probs, t.router_probs)
    assert torch.equal(indices.long(), t.topk_indices)
    torch.testing.assert_close(weights, t.topk_weights)
    assert tokens == t.tokens
    # with span masses, on the eager copy: the same quantities as trace with attention to spans
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    routing, tokens, _, mass = variants[bench.NNSIGHT_SPANS_SAME]()
    t = moe_interp.trace(eager, prompts, context=contexts, answer=answers, tokenizer=tok)
    recorded = (t.router_logits, t.router_probs, t.topk_indices, t.topk_weights)
    for mine, theirs in zip(recorded, routing, strict=True):
        torch.testing.assert_close(theirs.to(mine.dtype), mine)
    assert tokens == t.tokens and t.span_names == ("context", "answer")
    torch.testing.assert_close(mass, t.attn_to_spans)
