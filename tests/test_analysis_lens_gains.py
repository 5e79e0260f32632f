"""Logit lens (vs the model's own logits), CAG/AAG/APG formulas, figures."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from moe_interp.analysis import (
    answer_lens,
    answer_probability_gain,
    apg_figure,
    attention_gains,
    attention_gains_per_example,
    decode_residual,
    gains_figure,
    token_attention,
    token_attention_difference,
    token_difference_figure,
)
from moe_interp.analysis.encode import Encoded, make_batch
from moe_interp.analysis.lens import LensResult, residual_rows
from moe_interp.analysis.spans import SpanAttention
from moe_interp.data.example import QAExample
from tests.conftest import make_model

CTX = "The Eiffel Tower is in Paris."
EXAMPLES = [
    QAExample("a", CTX, "Where is the Eiffel Tower?", ("Paris",)),
    QAExample("b", CTX, "Where?", ("Paris",)),
]


@pytest.mark.parametrize("model_type", ["olmoe", "dbrx", "granitemoe", "gpt_oss", "qwen3_next"])
def test_lens_last_layer_is_model_output(model_type: str) -> None:
    """Different final-norm paths (DBRX), logit scaling (Granite), sinks, hybrid attention."""
    model = make_model(model_type)
    items = [Encoded("a", list(range(5, 17)), 12, 0), Encoded("b", list(range(30, 38)), 8, 0)]
    batch = make_batch(items, 0)
    layers, hidden, own = residual_rows(model, batch, batch.last)
    assert layers == list(range(model.config.num_hidden_layers if model_type != "dbrx" else 3))
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.mask).logits[torch.arange(2), batch.last]
        torch.testing.assert_close(decode_residual(model, hidden[-1]), ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(own, ref.float())


def test_answer_lens(tokenizer) -> None:
    model = make_model("olmoe")
    closed_book = QAExample("c", None, "Where is the Eiffel Tower?", ("Paris",))  # no context needed
    res = answer_lens(model, tokenizer, [*EXAMPLES, closed_book], batch_size=1)
    assert res.prob.shape == (3, 3) and res.ids == ["a", "b", "c"]
    torch.testing.assert_close(res.prob[:, -1], res.final, atol=1e-6, rtol=1e-5)
    assert list(res.frame().columns) == ["layer", "prob"]


def _att(per: torch.Tensor, ids=("x", "y")) -> SpanAttention:
    return SpanAttention(
        [0, 1], ("context", "answer"), per.double().sum(0), per.shape[0], per, list(ids), "last"
    )


def test_gain_formulas() -> None:
    # [N=2, L=2, H=2, S=2]; head means: base ctx = 0.2 / 0.4, tuned ctx = 0.3 / 0.4 (layer 0)
    base = torch.zeros(2, 2, 2, 2)
    tuned = torch.zeros(2, 2, 2, 2)
    base[0, 0, :, 0], tuned[0, 0, :, 0] = torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.3])
    base[1, 0, :, 0], tuned[1, 0, :, 0] = 0.4, 0.4
    base[0, 0, :, 1], tuned[0, 0, :, 1] = 0.05, 0.1  # answer present only in example 0
    g = attention_gains(_att(base), _att(tuned))
    cag = g[(g.measure == "CAG") & (g.layer == 0)].iloc[0]
    assert cag.base == pytest.approx(0.3) and cag.tuned == pytest.approx(0.35)
    assert cag.abs_gain == pytest.approx(0.05)
    assert cag.rel_gain == pytest.approx((0.1 / 0.2 + 0) / 2)
    assert cag.rel_gain_of_means == pytest.approx(0.05 / 0.3)
    aag = g[(g.measure == "AAG") & (g.layer == 0)].iloc[0]
    assert aag.n == 1 and aag.rel_gain == pytest.approx(1.0)
    per = attention_gains_per_example(_att(base), _att(tuned))
    assert len(per) == 2 * 2 * 2 and set(per.measure) == {"CAG", "AAG"}
    with pytest.raises(ValueError, match="different examples"):
        attention_gains(_att(base), _att(tuned, ids=("x", "z")))
    assert isinstance(gains_figure(g), go.Figure)


def test_apg() -> None:
    b = LensResult([0, 1], torch.tensor([[0.1, 0.2], [0.3, 0.4]]), ["x", "y"], torch.tensor([0.2, 0.4]))
    t = LensResult([0, 1], torch.tensor([[0.1, 0.5], [0.3, 0.6]]), ["x", "y"], torch.tensor([0.5, 0.6]))
    apg = answer_probability_gain(b, t)
    assert apg["abs_gain"].tolist() == pytest.approx([0.0, 0.25])
    assert apg["rel_gain_of_means"].tolist()[1] == pytest.approx(0.25 / 0.3)
    assert isinstance(apg_figure(apg), go.Figure)


def test_token_figure(tokenizer) -> None:
    model = make_model("olmoe")
    a = token_attention(model, tokenizer, EXAMPLES[0])
    fig = token_difference_figure(token_attention_difference(a, a), per_line=8)
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    with pytest.raises(ValueError, match="lacks column"):
        gains_figure(token_attention_difference(a, a))
