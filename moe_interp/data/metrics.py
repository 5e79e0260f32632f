"""QA metrics (SQuAD-style EM / F1) and knowledge-conflict metrics (Pc, Po, memorisation ratio).

Normalisation follows the official SQuAD script (lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace) with three documented extensions for non-ASCII text:
    * NFC first, so composed and decomposed accents compare equal (accents are *kept*: "é" != "e");
    * punctuation = ASCII ``string.punctuation`` plus every Unicode punctuation character (category P*),
      e.g. "，", "。", "—", "“";
    * for F1 tokens, every CJK ideograph / kana / hangul character is its own token (text without spaces
      would otherwise be a single token).
For ASCII input the results equal the official SQuAD v1.1/v2.0 script.

Empty answers follow SQuAD v2: an empty gold list means "unanswerable" (gold = ``""``); EM/F1 of an empty
normalised prediction against an empty normalised gold is 1, against a non-empty one 0.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)
_CJK = re.compile(
    "([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f])"
)

MatchMode = Literal["em", "contains"]


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (see module doc): NFC, lowercase, no punctuation/articles, single spaces."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of the normalised text for F1: whitespace split, CJK characters split individually."""
    return _CJK.sub(r" \1 ", normalize_answer(text)).split()


def _golds(answers: str | Iterable[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    return golds or [""]


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold, else 0.0 (no golds = unanswerable)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(answers)))


def _f1_single(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: str | Iterable[str]) -> float:
    """Token-level F1 (bag of tokens), maximum over the golds."""
    pred = answer_tokens(prediction)
    return max(_f1_single(pred, answer_tokens(g)) for g in _golds(answers))


def contains_answer(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if some non-empty normalised gold occurs in the normalised prediction on token boundaries
    (``"paris"`` in ``"it is paris france"``, but not in ``"parisian"``), else 0.0.
    An empty gold list / empty golds fall back to :func:`exact_match` (only an empty prediction matches)."""
    golds = [normalize_answer(g) for g in _golds(answers)]
    if not any(golds):
        return exact_match(prediction, "")
    pred = f" {' '.join(answer_tokens(prediction))} "
    return float(any(g and f" {' '.join(answer_tokens(g))} " in pred for g in golds))


def _match(prediction: str, answers: str | Iterable[str], mode: MatchMode) -> bool:
    if mode == "em":
        return exact_match(prediction, answers) == 1.0
    if mode == "contains":
        return contains_answer(prediction, answers) == 1.0
    raise InputError(f"unknown match mode {mode!r}; expected 'em' or 'contains'")


@dataclass(frozen=True)
class ConflictOutcome:
    """Per-example knowledge-conflict outcome.

    ``pc``: prediction matches an answer the context supports; ``po``: it matches the memorised answer
    (``None`` when the example has no memorised answer). Both can be true (e.g. with ``contains``).
    """

    pc: bool
    po: bool | None


def conflict_outcome(
    prediction: str, example: QAExample, *, match: MatchMode = "contains"
) -> ConflictOutcome:
    """Score one prediction for a knowledge-conflict example (see :class:`ConflictOutcome`)."""
    pc = _match(prediction, example.answers, match)
    po = None if example.memorised_answer is None else _match(prediction, example.memorised_answer, match)
    return ConflictOutcome(pc=pc, po=po)


@dataclass(frozen=True)
class ConflictScores:
    """Aggregate knowledge-conflict scores.

    Attributes:
        n: Number of examples.
        pc: Fraction of all examples whose prediction matches the context answer.
        po: Fraction of the ``n_memorised`` examples with a memorised answer whose prediction matches it
            (NaN if there are none).
        mr: Memorisation ratio ``Po / (Po + Pc)`` computed on the ``n_memorised`` examples only
            (counts, so both fractions share a denominator). NaN when undefined: no examples with a
            memorised answer, or none of them matched either answer.
        n_memorised: Examples that have a memorised answer.
    """

    n: int
    pc: float
    po: float
    mr: float
    n_memorised: int


def aggregate_conflict(outcomes: Sequence[ConflictOutcome]) -> ConflictScores:
    """Aggregate per-example outcomes to Pc, Po and MR (NaN-safe, see :class:`ConflictScores`)."""
    n = len(outcomes)
    with_mem = [o for o in outcomes if o.po is not None]
    n_pc_mem = sum(o.pc for o in with_mem)
    n_po = sum(bool(o.po) for o in with_mem)
    pc = sum(o.pc for o in outcomes) / n if n else math.nan
    po = n_po / len(with_mem) if with_mem else math.nan
    mr = n_po / (n_po + n_pc_mem) if (n_po + n_pc_mem) else math.nan
    return ConflictScores(n=n, pc=pc, po=po, mr=mr, n_memorised=len(with_mem))


def knowledge_conflict_scores(
    predictions: Sequence[str], examples: Sequence[QAExample], *, match: MatchMode = "contains"
) -> ConflictScores:
    """Pc, Po and memorisation ratio of ``predictions`` (aligned with ``examples``).

    ``match="contains"`` (default; suits free-form generations) or ``"em"`` (exact match after
    normalisation)."""
    if len(predictions) != len(examples):
        raise InputError(f"{len(predictions)} predictions for {len(examples)} examples")
    return aggregate_conflict(
        [conflict_outcome(p, e, match=match) for p, e in zip(predictions, examples, strict=True)]
    )


@dataclass(frozen=True)
class QAScores:
    """Mean exact match and F1 (NaN for zero examples)."""

    n: int
    exact_match: float
    f1: float


def qa_scores(predictions: Sequence[str], examples: Sequence[QAExample]) -> QAScores:
    """Mean SQuAD EM and F1 of ``predictions`` against ``examples[i].answers``."""
    if len(predictions) != len(examples):
        raise InputError(f"{len(predictions)} predictions for {len(examples)} examples")
    n = len(examples)
    if n == 0:
        return QAScores(0, math.nan, math.nan)
    em = sum(exact_match(p, e.answers) for p, e in zip(predictions, examples, strict=True)) / n
    f1 = sum(f1_score(p, e.answers) for p, e in zip(predictions, examples, strict=True)) / n
    return QAScores(n, em, f1)
