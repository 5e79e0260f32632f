"""Evaluation data: loaders, the :class:`QAExample` record, answer spans and QA / conflict metrics."""

from moe_interp.data.example import QAExample
from moe_interp.data.loaders import DATASETS, data_root, iter_dataset, list_datasets, load_dataset
from moe_interp.data.metrics import (
    ConflictOutcome,
    ConflictScores,
    QAScores,
    conflict_outcome,
    exact_match,
    f1_score,
    knowledge_conflict_scores,
    normalize_answer,
    qa_scores,
)
from moe_interp.data.records import iter_examples, load_examples, read_records
from moe_interp.data.spans import char_to_token_spans, find_answer_spans, offsets_from_decoding

__all__ = [
    "DATASETS",
    "ConflictOutcome",
    "ConflictScores",
    "QAExample",
    "QAScores",
    "char_to_token_spans",
    "conflict_outcome",
    "data_root",
    "exact_match",
    "f1_score",
    "find_answer_spans",
    "iter_dataset",
    "iter_examples",
    "knowledge_conflict_scores",
    "list_datasets",
    "load_dataset",
    "load_examples",
    "normalize_answer",
    "offsets_from_decoding",
    "qa_scores",
    "read_records",
]
