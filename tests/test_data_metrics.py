"""SQuAD-style EM/F1 and knowledge-conflict metrics, with hand-computed values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_interp.data.example import QAExample
from moe_interp.data.metrics import (
    ConflictOutcome,
    aggregate_conflict,
    answer_tokens,
    conflict_outcome,
    contains_answer,
    exact_match,
    f1_score,
    knowledge_conflict_scores,
    normalize_answer,
    qa_scores,
)
from moe_interp.errors import InputError


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("  An apple, a day ") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("U.S. $5") == "us 5"
    assert normalize_answer("«Paris» — “France”。") == "paris france"  # unicode punctuation


def test_unicode_accents_and_nfc():
    assert exact_match("Röntgen", "Röntgen") == 1.0
    assert exact_match("Ro\u0308ntgen", "R\u00f6ntgen") == 1.0  # decomposed == composed
    assert exact_match("Rontgen", "Röntgen") == 0.0  # accents are kept
    assert exact_match("CAFÉ", "café") == 1.0


def test_cjk_tokens():
    assert answer_tokens("北京大学") == ["北", "京", "大", "学"]
    assert f1_score("北京大学", "北京") == pytest.approx(2 / 3)  # P = 2/4, R = 1
    assert exact_match("北京。", "北京") == 1.0
    assert f1_score("東京 tower", "東京") == pytest.approx(0.8)  # P = 2/3, R = 1


def test_f1_hand_computed():
    assert f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)  # multiset: common = 2
    assert f1_score("a b b", "b b c") == pytest.approx(0.8)  # "a" is an article: P = 1, R = 2/3
    assert f1_score("Berlin", "Paris") == 0.0


def test_several_golds_take_the_max():
    golds = ["London", "Paris city", "Paris, France, Europe"]
    assert exact_match("paris CITY", golds) == 1.0
    assert f1_score("Paris", golds) == pytest.approx(2 / 3)  # vs "Paris city": P = 1, R = 1/2
    assert f1_score("Paris France", golds) == pytest.approx(0.8)  # vs the 3-token gold


def test_empty_prediction_and_answers():
    assert exact_match("", "") == 1.0
    assert exact_match("", "Paris") == 0.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("Paris", "") == 0.0
    assert f1_score("", "") == 1.0
    # No golds = unanswerable (SQuAD v2): only an empty prediction is right.
    assert exact_match("", []) == 1.0 and f1_score("", []) == 1.0
    assert exact_match("Paris", []) == 0.0 and f1_score("Paris", []) == 0.0


def test_punctuation_and_articles_only():
    assert exact_match("!!!", "...") == 1.0  # both normalise to ""
    assert f1_score("?!", "") == 1.0
    assert exact_match("the", "") == 1.0
    assert exact_match("!!!", "Paris") == 0.0 and f1_score("...", "Paris") == 0.0


def test_contains_answer():
    assert contains_answer("It is Paris, France.", "paris") == 1.0
    assert contains_answer("A Parisian café", "Paris") == 0.0  # token boundaries
    assert contains_answer("New York City", ["York City", "LA"]) == 1.0
    assert contains_answer("北京大学", "北京") == 1.0
    assert contains_answer("", []) == 1.0 and contains_answer("x", []) == 0.0


@given(st.text(max_size=30), st.text(max_size=30))
@settings(max_examples=80, deadline=None)
def test_metric_properties(a, b):
    assert exact_match(a, a) == 1.0 and f1_score(a, a) == 1.0
    assert 0.0 <= f1_score(a, b) <= 1.0
    assert f1_score(a, b) == pytest.approx(f1_score(b, a))
    assert exact_match(a, b) <= f1_score(a, b)


def _ex(answer: str, memorised: str | None) -> QAExample:
    return QAExample("x", "ctx", "q?", (answer,), memorised_answer=memorised, counterfactual_answer=answer)


def test_conflict_outcome_modes():
    ex = _ex("baseball", "basketball")
    assert conflict_outcome("He plays baseball.", ex) == ConflictOutcome(pc=True, po=False)
    assert conflict_outcome("basketball", ex, match="em") == ConflictOutcome(pc=False, po=True)
    assert conflict_outcome("He plays baseball.", ex, match="em") == ConflictOutcome(pc=False, po=False)
    assert conflict_outcome("baseball, not basketball", ex) == ConflictOutcome(pc=True, po=True)
    assert conflict_outcome("baseball", _ex("baseball", None)) == ConflictOutcome(pc=True, po=None)
    with pytest.raises(InputError):
        conflict_outcome("x", ex, match="f1")  # type: ignore[arg-type]


def test_knowledge_conflict_aggregate_hand_computed():
    examples = [_ex("baseball", "basketball")] * 5
    preds = ["baseball", "baseball", "basketball", "golf", "baseball or basketball"]
    s = knowledge_conflict_scores(preds, examples)
    # pc: 1,1,0,0,1 -> 3/5; po: 0,0,1,0,1 -> 2/5; MR = 2 / (2 + 3)
    assert (s.n, s.n_memorised) == (5, 5)
    assert s.pc == pytest.approx(0.6) and s.po == pytest.approx(0.4) and s.mr == pytest.approx(0.4)
    s_em = knowledge_conflict_scores(preds, examples, match="em")
    assert s_em.pc == pytest.approx(0.4) and s_em.po == pytest.approx(0.2) and s_em.mr == pytest.approx(1 / 3)


def test_knowledge_conflict_nan_cases():
    # No memorised answers (NQ-Swap): Pc defined, Po and MR undefined.
    s = aggregate_conflict([ConflictOutcome(True, None), ConflictOutcome(False, None)])
    assert s.pc == 0.5 and math.isnan(s.po) and math.isnan(s.mr) and s.n_memorised == 0
    # Nothing matched either answer: Po = Pc = 0, MR undefined.
    s = aggregate_conflict([ConflictOutcome(False, False)])
    assert s.pc == 0.0 and s.po == 0.0 and math.isnan(s.mr)
    # MR uses only examples with a memorised answer.
    s = aggregate_conflict([ConflictOutcome(True, None), ConflictOutcome(False, True)])
    assert s.pc == 0.5 and s.po == 1.0 and s.mr == 1.0
    s = aggregate_conflict([])
    assert s.n == 0 and all(math.isnan(v) for v in (s.pc, s.po, s.mr))
    with pytest.raises(InputError):
        knowledge_conflict_scores(["a"], [])


def test_qa_scores():
    examples = [_ex("Paris", None), QAExample("y", None, "q", ("London", "UK"))]
    s = qa_scores(["Paris France", "uk"], examples)
    assert s.n == 2 and s.exact_match == 0.5 and s.f1 == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(qa_scores([], []).f1)
    with pytest.raises(InputError):
        qa_scores(["a"], [])
