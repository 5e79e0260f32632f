"""Disjoint CounterFact splits for the embedded demo model.

Facts (subject, cloze prompt, true object, counterfactual object) come from ``counterfact-edit.json`` and
``counterfact-val.json`` in the shared data folder. Facts are grouped by subject and every subject goes to
exactly one bucket, so no subject (hence no fact) is shared between buckets:

``memorised``
    Facts trained closed-book (``Question: {prompt} Answer: {true}``). Each record has a ``role``:
    ``conflict_test`` / ``conflict_dev`` / ``conflict_tune`` (never seen with any context in training) or
    ``train`` (also seen with supporting and counterfactual contexts during training).
``context_pool``
    Facts seen only inside contexts during training (never closed-book); the source of copying skill.
``support_test`` / ``support_test_distractor`` / ``support_dev``
    Held-out facts never trained on, each with a context that supports the true object: the statement
    alone (``support_test``), the statement plus one distractor statement about another held-out fact
    (``support_test_distractor``, same facts), or half/half (``support_dev``, other facts, used only to pick
    the training checkpoint).
``conflict_tune`` / ``conflict_dev`` / ``conflict_test``
    Memorised facts with a counterfactual context (the context states ``counterfactual_object``).

A context is one statement ``"{prompt} {object}."``, alone or with one distractor statement about another
held-out fact, in random order (conflict splits: every second record has a distractor). Splits are built by
``python -m moe_interp.demo.train`` only; everyone else reads the committed JSONL files via
:func:`load_split`.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

SPLIT_DIR = Path(__file__).resolve().parent / "data"
SPLIT_NAMES = (
    "memorised",
    "context_pool",
    "support_test",
    "support_test_distractor",
    "support_dev",
    "conflict_tune",
    "conflict_dev",
    "conflict_test",
)
SIZES = {
    "support_test": 500,
    "support_dev": 150,
    "conflict_test": 400,
    "conflict_dev": 150,
    "conflict_tune": 800,
    "train": 1000,
}
SEED = 1234


def data_root() -> Path:
    """Shared data folder: ``$MOE_INTERP_DATA`` or ``<repo root>/../shared/data``."""
    env = os.environ.get("MOE_INTERP_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return root


def load_counterfact() -> list[dict]:
    """Raw CounterFact records from ``counterfact-edit.json`` + ``counterfact-val.json``."""
    folder = data_root() / "counterfact"
    files = [folder / "counterfact-edit.json", folder / "counterfact-val.json"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"CounterFact data not found: {', '.join(missing)}; set MOE_INTERP_DATA to the data folder."
        )
    records: list[dict] = []
    for f in files:
        records.extend(json.loads(f.read_text()))
    return records


def statement(question: str, obj: str) -> str:
    """The declarative sentence used in contexts and as a fact's text."""
    return f"{question} {obj}."


def relation(rec: dict) -> str:
    """Relation template of a fact: the cloze prompt with the subject replaced by ``{}``."""
    return rec["question"].replace(rec["subject"], "{}")


def _fact(r: dict) -> dict:
    return {
        "id": f"cf{r['case_id']}",
        "subject": r["subject"],
        "question": r["prompt"],
        "true_object": r["ground_truth"],
        "counterfactual_object": r["target_new"],
    }


def _with_context(fact: dict, answer: str, distractor: dict | None, rng: random.Random, kind: str) -> dict:
    sents = [statement(fact["question"], answer)]
    if distractor is not None:
        sents.append(statement(distractor["question"], distractor["true_object"]))
        rng.shuffle(sents)
    return {
        **fact,
        "context": " ".join(sents),
        "context_answer": answer,
        "context_kind": kind,
        "n_distractors": len(sents) - 1,
    }


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Build all splits deterministically from the raw CounterFact files."""
    rng = random.Random(seed)
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in load_counterfact():
        if r["subject"] in r["prompt"] and r["ground_truth"] != r["target_new"]:
            by_subject[r["subject"].strip().lower()].append(_fact(r))
    groups = [by_subject[k] for k in sorted(by_subject)]
    rng.shuffle(groups)

    buckets: dict[str, list[dict]] = {k: [] for k in [*SIZES, "context_pool"]}
    # Single-fact subjects fill the evaluation buckets (clean subjects); the rest feeds the pool.
    order = ["support_test", "support_dev", "conflict_test", "conflict_dev", "conflict_tune", "train"]
    for g in groups:
        target = next((b for b in order if len(buckets[b]) < SIZES[b]), "context_pool")
        if target != "context_pool" and len(g) > 1:
            target = "context_pool"
        buckets[target].extend(g)

    held_out = buckets["support_test"]
    out: dict[str, list[dict]] = {}
    out["memorised"] = [
        {**f, "role": role}
        for role in ("conflict_test", "conflict_dev", "conflict_tune", "train")
        for f in buckets[role]
    ]
    out["context_pool"] = buckets["context_pool"]

    def contexts(facts: list[dict], use_true: bool, kind: str) -> list[dict]:
        recs = []
        for i, f in enumerate(facts):
            distractor = None
            if i % 2 == 1:
                distractor = rng.choice(held_out)
                while distractor["id"] == f["id"]:
                    distractor = rng.choice(held_out)
            answer = f["true_object"] if use_true else f["counterfactual_object"]
            recs.append(_with_context(f, answer, distractor, rng, kind))
        return recs

    contexts(held_out, True, "support")  # consumes the RNG stream the other splits were built with
    out["support_dev"] = contexts(buckets["support_dev"], True, "support")
    for name in ("conflict_tune", "conflict_dev", "conflict_test"):
        out[name] = contexts(buckets[name], False, "conflict")
    out["support_test"] = [_with_context(f, f["true_object"], None, rng, "support") for f in held_out]
    rng2 = random.Random(seed + 1)
    out["support_test_distractor"] = []
    for i, f in enumerate(held_out):
        distractor = held_out[(i + 1 + rng2.randrange(len(held_out) - 1)) % len(held_out)]
        out["support_test_distractor"].append(_with_context(f, f["true_object"], distractor, rng2, "support"))
    return out


def write_splits(splits: dict[str, list[dict]], folder: Path = SPLIT_DIR) -> None:
    """Write each split as ``<name>.jsonl`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        with open(folder / f"{name}.jsonl", "w") as fh:
            for r in recs:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def load_split(name: str) -> list[dict]:
    """Read a committed demo split (see module docstring for the names)."""
    if name not in SPLIT_NAMES:
        raise KeyError(f"unknown demo split {name!r}; valid names: {', '.join(SPLIT_NAMES)}")
    path = SPLIT_DIR / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"demo split file {path} is missing; rebuild with python -m moe_interp.demo.train"
        )
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
