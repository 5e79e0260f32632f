"""Loaders for the evaluation data sets under ``shared/data`` and one registry, :func:`load_dataset`.

Data root: the ``root`` argument, else the environment variable ``MOE_INTERP_DATA``, else
``<repo root>/../shared/data`` resolved from this file's location.

Conventions (all loaders):
    * ``answers`` = what the context supports; closed-book sets: the true answer(s).
      Answer lists are de-duplicated, order kept (first = canonical answer).
    * ``counterfactual_answer`` is set where the context is counterfactual by construction
      (NQ-Swap, ConFiQA-MC: the file's ``answer``; CounterFact: ``target_new``).
    * ``memorised_answer`` is only known for CounterFact (``ground_truth``).
    * ids: official ids where they exist (HotpotQA, SQuAD v2), else ``"<dataset>/<split>/<key>"`` with
      key = CounterFact ``case_id`` or the 0-based record index.
    * ``source`` = ``"<dataset>:<path relative to the data root>"``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_interp.data.example import QAExample
from moe_interp.data.records import iter_located_records
from moe_interp.errors import DataError

DATA_ENV_VAR = "MOE_INTERP_DATA"
ALL_SPLITS = "all"


def default_data_root() -> Path:
    """``<repo root>/../shared/data`` where repo root is the folder holding the ``moe_interp`` package."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data root (argument > ``$MOE_INTERP_DATA`` > default); it must exist."""
    if root is not None:
        path, how = Path(root), "root argument"
    elif os.environ.get(DATA_ENV_VAR):
        path, how = Path(os.environ[DATA_ENV_VAR]), f"${DATA_ENV_VAR}"
    else:
        path, how = default_data_root(), "default location"
    if not path.is_dir():
        raise DataError(
            f"data root {path} (from {how}) does not exist or is not a directory; "
            f"pass root= or set ${DATA_ENV_VAR}"
        )
    return path


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _field(record: Any, where: str, *keys: str) -> Any:
    """``record[k1][k2]...`` or a DataError naming the record and field."""
    cur = record
    for i, key in enumerate(keys):
        if not isinstance(cur, Mapping) or key not in cur:
            raise DataError(f"{where}: missing field {'.'.join(keys[: i + 1])!r}")
        cur = cur[key]
    return cur


def _located(path: Path) -> Iterator[tuple[str, Any]]:
    for loc, record in iter_located_records(path):
        yield f"{path}: {loc}", record


# --- per-format parsers: (path, dataset, split, source) -> examples -----------------------------------


def iter_routerlens(
    path: Path, *, dataset: str, split: str, source: str, counterfactual: bool
) -> Iterator[QAExample]:
    """Router Lens JSON list of ``{context, question, answer}`` (NQ-Swap, ConFiQA-MC, SQuAD)."""
    for i, (where, rec) in enumerate(_located(path)):
        answer = _field(rec, where, "answer")
        yield QAExample(
            id=f"{dataset}/{split}/{i}",
            context=_field(rec, where, "context"),
            question=_field(rec, where, "question"),
            answers=(answer,),
            counterfactual_answer=answer if counterfactual else None,
            source=source,
        )


def iter_counterfact(path: Path, *, dataset: str, split: str, source: str) -> Iterator[QAExample]:
    """CounterFact (flattened). With ``fake_evidence``: counterfactual context, gold = ``target_new``.
    Without: closed-book, gold = ``ground_truth``. The question is the cloze ``prompt``."""
    for where, rec in _located(path):
        truth = _field(rec, where, "ground_truth")
        new = _field(rec, where, "target_new")
        evidence = rec.get("fake_evidence") if isinstance(rec, Mapping) else None
        yield QAExample(
            id=f"{dataset}/{split}/{_field(rec, where, 'case_id')}",
            context=evidence,
            question=_field(rec, where, "prompt"),
            answers=(new,) if evidence is not None else (truth,),
            memorised_answer=truth,
            counterfactual_answer=new,
            source=source,
        )


def iter_nq_open_oracle(path: Path, *, dataset: str, split: str, source: str) -> Iterator[QAExample]:
    """Lost-in-the-Middle NQ-Open oracle JSONL(.gz): context = ``"<title>\\n<text>"`` of ``ctxs[0]``."""
    for i, (where, rec) in enumerate(_located(path)):
        ctxs = _field(rec, where, "ctxs")
        if not isinstance(ctxs, list) or not ctxs:
            raise DataError(f"{where}: field 'ctxs' must be a non-empty list")
        title, text = _field(ctxs[0], where, "title"), _field(ctxs[0], where, "text")
        yield QAExample(
            id=f"{dataset}/{split}/{i}",
            context=f"{title}\n{text}",
            question=_field(rec, where, "question"),
            answers=_dedupe(_field(rec, where, "answers")),
            source=source,
        )


def iter_nq_open(path: Path, *, dataset: str, split: str, source: str) -> Iterator[QAExample]:
    """NQ-Open / EfficientQA JSONL ``{question, answer: [str]}``: closed-book."""
    for i, (where, rec) in enumerate(_located(path)):
        yield QAExample(
            id=f"{dataset}/{split}/{i}",
            context=None,
            question=_field(rec, where, "question"),
            answers=_dedupe(_field(rec, where, "answer")),
            source=source,
        )


def iter_hotpotqa(path: Path, *, dataset: str, split: str, source: str) -> Iterator[QAExample]:
    """HotpotQA rows-API page. Context = every paragraph as ``"<title>\\n<sentences joined>"``, paragraphs
    separated by a blank line, in the file's order (10 paragraphs; one row has only 2)."""
    for loc, item in iter_located_records(path, root="0.rows"):
        where = f"{path}: rows {loc}"
        row = _field(item, where, "row")
        ctx = _field(row, where, "context")
        titles, sentences = _field(ctx, where, "title"), _field(ctx, where, "sentences")
        if len(titles) != len(sentences):
            raise DataError(f"{where}: context has {len(titles)} titles but {len(sentences)} paragraphs")
        paragraphs = [f"{t}\n{''.join(s)}" for t, s in zip(titles, sentences, strict=True)]
        yield QAExample(
            id=str(_field(row, where, "id")),
            context="\n\n".join(paragraphs),
            question=_field(row, where, "question"),
            answers=(_field(row, where, "answer"),),
            source=source,
        )


def iter_squad_v2(
    path: Path, *, dataset: str, split: str, source: str, include_unanswerable: bool = False
) -> Iterator[QAExample]:
    """Official SQuAD v2 nesting. Unanswerable questions (``is_impossible``) are skipped unless
    ``include_unanswerable``; then they have ``answers == ()`` (metrics score them SQuAD-v2 style:
    only an empty prediction is right)."""
    for a_loc, article in iter_located_records(path, root="data"):
        for p_i, para in enumerate(_field(article, f"{path}: data {a_loc}", "paragraphs")):
            p_where = f"{path}: data {a_loc}, paragraph {p_i}"
            context = _field(para, p_where, "context")
            for q_i, qa in enumerate(_field(para, p_where, "qas")):
                where = f"{p_where}, question {q_i}"
                if qa.get("is_impossible", False) and not include_unanswerable:
                    continue
                answers = _dedupe(_field(a, where, "text") for a in _field(qa, where, "answers"))
                yield QAExample(
                    id=str(_field(qa, where, "id")),
                    context=context,
                    question=_field(qa, where, "question"),
                    answers=answers,
                    source=source,
                )


def iter_triviaqa(path: Path, *, dataset: str, split: str, source: str) -> Iterator[QAExample]:
    """TriviaQA with evidence: gold = ``answer.value`` then ``answer.aliases`` (de-duplicated)."""
    for i, (where, rec) in enumerate(_located(path)):
        value = _field(rec, where, "answer", "value")
        aliases = _field(rec, where, "answer", "aliases")
        yield QAExample(
            id=f"{dataset}/{split}/{i}",
            context=_field(rec, where, "context"),
            question=_field(rec, where, "question"),
            answers=_dedupe([value, *aliases]),
            source=source,
        )


# --- registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: split name -> file (relative to the data root) and its parser."""

    name: str
    splits: Mapping[str, str]
    default_split: str
    parser: Callable[..., Iterator[QAExample]]
    options: Mapping[str, Any]
    description: str


def _spec(
    name: str,
    splits: dict[str, str],
    default: str,
    parser: Callable[..., Iterator[QAExample]],
    description: str,
    **options: Any,
) -> DatasetSpec:
    return DatasetSpec(name, splits, default, parser, options, description)


_RL = "routerlens"
_CF = "counterfact"
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        _spec(
            "nq-swap",
            {k: f"{_RL}/nq-swap/{k}.json" for k in ("train", "dev", "test")},
            "test",
            iter_routerlens,
            "NQ-Swap, counterfactual contexts (Router Lens splits)",
            counterfactual=True,
        ),
        _spec(
            "confiqa-mc",
            {k: f"{_RL}/confiqa-mc/{k}.json" for k in ("dev", "test")},
            "test",
            iter_routerlens,
            "ConFiQA multi-conflict (Router Lens splits)",
            counterfactual=True,
        ),
        _spec(
            "squad",
            {"dev": f"{_RL}/squad/dev.json"},
            "dev",
            iter_routerlens,
            "SQuAD dev (Router Lens split), faithful contexts",
            counterfactual=False,
        ),
        _spec(
            "counterfact",
            {
                "evidence-1k": f"{_CF}/counterfact-edit-evidence-1k.json",
                "edit-1k": f"{_CF}/counterfact-edit-1k.json",
                "edit": f"{_CF}/counterfact-edit.json",
                "val": f"{_CF}/counterfact-val.json",
            },
            "evidence-1k",
            iter_counterfact,
            "CounterFact; evidence-1k has a counterfactual context, the others are closed-book",
        ),
        _spec(
            "nq-open-oracle",
            {"dev": "nq_open_oracle/nq-open-oracle.jsonl.gz"},
            "dev",
            iter_nq_open_oracle,
            "NQ-Open dev with the gold Wikipedia passage",
        ),
        _spec(
            "nq-open",
            {"dev": "nq_open/NQ-open.dev.jsonl", "efficientqa": "nq_open/NQ-open.efficientqa.dev.1.1.jsonl"},
            "dev",
            iter_nq_open,
            "NQ-Open / EfficientQA dev, closed-book",
        ),
        _spec(
            "hotpotqa",
            {"dev": "hotpotqa_dev100_context/hotpotqa_contextualbench_rows0-99.json"},
            "dev",
            iter_hotpotqa,
            "HotpotQA distractor dev rows 0-99 with 10 paragraphs",
        ),
        _spec(
            "squad-v2",
            {"dev": "squad_v2_dev_subset/small.json"},
            "dev",
            iter_squad_v2,
            "SQuAD v2 dev subset (2 articles); unanswerable skipped unless include_unanswerable=True",
        ),
        _spec(
            "triviaqa",
            {"dev": "triviaqa_100_context/final_triviaqa.json"},
            "dev",
            iter_triviaqa,
            "TriviaQA, 100 questions with an evidence passage",
        ),
    ]
}


def list_datasets() -> dict[str, tuple[str, ...]]:
    """Registered data set names -> their split names (default split first)."""
    return {n: (s.default_split, *(k for k in s.splits if k != s.default_split)) for n, s in DATASETS.items()}


def iter_dataset(
    name: str,
    split: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Iterator[QAExample]:
    """Streaming version of :func:`load_dataset` (without ``limit``)."""
    spec = DATASETS.get(name)
    if spec is None:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if split is None:
        splits = [spec.default_split]
    elif split == ALL_SPLITS:
        splits = list(spec.splits)
    elif split in spec.splits:
        splits = [split]
    else:
        raise DataError(
            f"data set {name!r} has no split {split!r}; valid splits: {', '.join(spec.splits)}, {ALL_SPLITS}"
        )
    base = data_root(root)  # validated eagerly, before the first next()
    kwargs = {**spec.options, **options}
    return itertools.chain.from_iterable(
        spec.parser(
            base / spec.splits[sp], dataset=name, split=sp, source=f"{name}:{spec.splits[sp]}", **kwargs
        )
        for sp in splits
    )


def load_dataset(
    name: str,
    split: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    **options: Any,
) -> list[QAExample]:
    """Load a registered data set as a list of :class:`QAExample`.

    Args:
        name: One of ``list_datasets()``: nq-swap, confiqa-mc, squad, counterfact, nq-open-oracle,
            nq-open, hotpotqa, squad-v2, triviaqa.
        split: A split name; ``None`` = the data set's default split (nq-swap/confiqa-mc: ``test``,
            counterfact: ``evidence-1k``, nq-open: ``dev``, single-file sets: ``dev``);
            ``"all"`` = every split concatenated in registry order.
        root: Data root (default: ``$MOE_INTERP_DATA``, else ``<repo>/../shared/data``).
        limit: Keep only the first ``limit`` examples.
        **options: Parser options; only ``include_unanswerable`` (squad-v2) exists.

    Raises:
        DataError: unknown name/split (lists the valid ones), missing root (names the path),
            or malformed files.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    return list(itertools.islice(iter_dataset(name, split, root=root, **options), limit))
