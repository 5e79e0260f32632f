"""Turning records (demo splits, plain dicts) into :class:`~moe_interp.data.QAExample` for Router Lens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError

_ANSWER_KEYS = ("answers", "answer", "context_answer", "true_object")


def to_examples(records: Iterable[QAExample | Mapping[str, Any]]) -> list[QAExample]:
    """QAExamples from QAExamples or dicts.

    A dict needs ``question`` and one of ``answers`` / ``answer`` / ``context_answer`` / ``true_object``
    (first found); ``id`` (default: its
    index), ``context``, ``true_object`` / ``memorised_answer`` and ``counterfactual_object`` /
    ``counterfactual_answer`` are used when present (the demo splits' fields).
    """
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, QAExample):
            out.append(rec)
            continue
        if not isinstance(rec, Mapping):
            raise InputError(f"record {i} is a {type(rec).__name__}, not a QAExample or dict")
        if "question" not in rec:
            raise InputError(f"record {i} has no 'question' field (fields: {sorted(rec)})")
        answers = next((rec[k] for k in _ANSWER_KEYS if rec.get(k) is not None), None)
        if answers is None:
            raise InputError(f"record {i} has none of the answer fields {_ANSWER_KEYS}")
        out.append(
            QAExample(
                id=str(rec.get("id", i)),
                context=rec.get("context"),
                question=rec["question"],
                answers=(answers,) if isinstance(answers, str) else tuple(answers),
                memorised_answer=rec.get("memorised_answer", rec.get("true_object")),
                counterfactual_answer=rec.get("counterfactual_answer", rec.get("counterfactual_object")),
                source=str(rec.get("source", "")),
            )
        )
    return out


def demo_examples(split: str, limit: int | None = None) -> list[QAExample]:
    """A demo split (``moe_interp.demo.load_split``) as QAExamples; conflict splits keep the memorised
    (true) object as ``memorised_answer`` so that Po can be measured."""
    from moe_interp.demo import load_split

    records: Sequence[Mapping[str, Any]] = load_split(split)
    return to_examples(records[:limit] if limit is not None else records)
