"""Span attention streamed over examples: exact against eager attention maps; model left untouched."""

from __future__ import annotations

import pytest
import torch

from moe_interp.analysis.encode import batches, encode
from moe_interp.analysis.spans import span_attention
from moe_interp.analysis.tokens import token_attention, token_attention_difference
from moe_interp.data.example import QAExample
from moe_interp.routerlens.masking import mask_experts
from tests.conftest import make_model

CTX = "The Eiffel Tower is in Paris. The mother tongue of Danielle Darrieux is French."
EXAMPLES = [
    QAExample("a", CTX, "Where is the Eiffel Tower?", ("Paris",)),
    QAExample("b", CTX, "The mother tongue of Danielle Darrieux is", ("French",)),
    QAExample("c", "Context: The Eiffel Tower is in Paris.", "Where is it?", ("Paris",)),
]


def _reference(model_type: str, tokenizer, query: str) -> torch.Tensor:
    """[N, L, H, S] from full eager attention maps, one example at a time."""
    eager = make_model(model_type, attn="eager")
    out = []
    for ex in EXAMPLES:
        e = encode(tokenizer, ex)
        n = len(e.ids) if query == "answer" else e.prompt_len
        with torch.no_grad():
            maps = eager(input_ids=torch.tensor([e.ids[:n]]), output_attentions=True).attentions
        rows = [e.prompt_len - 1] if query == "last" else list(range(e.prompt_len - 1, len(e.ids) - 1))
        per_layer = []
        for a in maps:
            if a is None:
                continue
            spans = []
            for name in ("context", "answer"):
                keys = torch.zeros(n)
                for s, t in e.spans[name]:
                    keys[s:t] = 1
                spans.append((a[0][:, rows].float() @ keys).mean(-1))  # [H]
            per_layer.append(torch.stack(spans, -1))
        out.append(torch.stack(per_layer))
    return torch.stack(out)


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss"])
@pytest.mark.parametrize("query", ["last", "answer"])
def test_span_attention_exact(model_type: str, query: str, tokenizer) -> None:
    model = make_model(model_type)
    got = span_attention(model, tokenizer, EXAMPLES, query=query, batch_size=2)
    ref = _reference(model_type, tokenizer, query)
    assert got.ids == ["a", "b", "c"]
    torch.testing.assert_close(got.per_example, ref, atol=1e-5, rtol=0)
    mean = span_attention(model, tokenizer, EXAMPLES, query=query, batch_size=3, keep="mean")
    assert mean.per_example is None and mean.ids == []
    torch.testing.assert_close(mean.mean, ref.mean(0), atol=1e-5, rtol=0)
    frame = got.frame()
    assert list(frame.columns) == ["layer", "span", "attention"] and len(frame) == 2 * len(got.layers)


def test_spans_located(tokenizer) -> None:
    e = encode(tokenizer, EXAMPLES[0], tokens=True)
    (cs, ce), (as_, ae) = e.spans["context"][0], e.spans["answer"][0]
    assert cs <= as_ < ae <= ce < e.prompt_len
    assert "".join(e.tokens[as_:ae]).strip() == "Paris"
    assert tokenizer.decode(e.answer_ids).strip() == "Paris"
    b = next(batches(tokenizer, EXAMPLES, 3))
    assert b.input_ids.shape[0] == 3 and b.span_masks.shape[1] == 2


def test_model_untouched_on_error(tokenizer) -> None:
    model = make_model("olmoe")
    before = {n: m.config for n, m in model.named_modules() if hasattr(m, "config")}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def stream():
        yield EXAMPLES[0]
        raise RuntimeError("data broke")

    with pytest.raises(RuntimeError, match="data broke"):
        span_attention(model, tokenizer, stream(), batch_size=1)
    with pytest.raises(ValueError, match="no context"):
        span_attention(model, tokenizer, [QAExample("x", None, "q?", ("Paris",))])
    assert {n: m.config for n, m in model.named_modules() if hasattr(m, "config")} == before
    assert all(m.config is before[n] for n, m in model.named_modules() if hasattr(m, "config"))
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_answer_in_any_context_still_gives_cag(tokenizer) -> None:
    """CAG is defined without answer spans: a warning, and AAG rows are simply absent from the gains."""
    from moe_interp.analysis.gains import attention_gains

    model = make_model("olmoe")
    missing = [QAExample("m", CTX, "Where is the Eiffel Tower?", ("Berlin",))]
    with pytest.warns(UserWarning, match="none of the 1 examples.*AAG"):
        base = span_attention(model, tokenizer, missing)
    with pytest.warns(UserWarning), mask_experts(model, {0: [0]}):
        tuned = span_attention(model, tokenizer, missing)
    gains = attention_gains(base, tuned)
    assert set(gains["measure"]) == {"CAG"} and (gains["n"] == 1).all()
    assert base.per_example[..., 1].eq(0).all() and base.per_example[..., 0].gt(0).all()


def test_token_difference(tokenizer) -> None:
    model = make_model("olmoe")
    base = token_attention(model, tokenizer, EXAMPLES[0], layers=[1, 2])
    assert base.attention.shape == (2, len(base.tokens))
    torch.testing.assert_close(base.attention.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    full = span_attention(model, tokenizer, EXAMPLES[:1]).per_example[0].mean(1)  # [L, S]
    s, t = base.spans["context"][0]
    torch.testing.assert_close(base.attention[:, s:t].sum(-1), full[1:, 0], atol=1e-5, rtol=0)
    with mask_experts(model, {1: [0, 1, 2]}):
        tuned = token_attention(model, tokenizer, EXAMPLES[0], layers=[1, 2])
    diff = token_attention_difference(base, tuned)
    assert set(diff["span"]) == {"context", "answer", "other"}
    assert diff["diff"].abs().sum() > 0
    assert (
        diff[diff.layer == 1]["diff"].abs().max() == 0
    )  # masking layer 1's experts acts after its attention
    with pytest.raises(ValueError, match="no attention module"):
        token_attention(model, tokenizer, EXAMPLES[0], layers=[7])
