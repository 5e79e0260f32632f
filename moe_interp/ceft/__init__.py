"""CEFT: Context-faithful Expert Fine-Tuning (Bai et al., EMNLP 2025) and its baselines, on accelerate.

Train only the context-faithful experts (CE) found by :mod:`moe_interp.routerlens` -- only their slices of
the fused expert tensors change -- and compare with full fine-tuning (FFT), router tuning (RT), the same
number of random experts and LoRA on all experts, with the same data and budget.

>>> from moe_interp.ceft import train, ceft, full_fine_tuning, load_experts, applied_deltas  # doctest: +SKIP
>>> res = train(model, tok, train, dev, method=ceft(load_experts("runs/routerlens/experts_count_all.json")),
...             out="runs/ceft/CEFT")                                                     # doctest: +SKIP
>>> with applied_deltas(model, res.source):                                               # doctest: +SKIP
...     frame = evaluate(model, tok, test)

The demo pipeline: ``python -m moe_interp.ceft.run --out runs/ceft``; one method, also under
``accelerate launch``: ``python -m moe_interp.ceft.train``.
"""

from moe_interp.ceft.deltas import applied_deltas, attached_deltas, merge_deltas, read_deltas
from moe_interp.ceft.engine import CEFTConfig, CEFTResult, load_result, train
from moe_interp.ceft.report import evaluate_methods, figure, markdown_table, paper_table
from moe_interp.ceft.targets import (
    DeltaTarget,
    Method,
    all_experts,
    attention_only,
    ceft,
    count_parameters,
    count_trainable,
    full_fine_tuning,
    load_experts,
    lora_all_experts,
    random_experts,
    random_experts_method,
    resolve_targets,
    router_tuning,
)

__all__ = [
    "CEFTConfig",
    "CEFTResult",
    "DeltaTarget",
    "Method",
    "all_experts",
    "applied_deltas",
    "attention_only",
    "attached_deltas",
    "ceft",
    "count_parameters",
    "count_trainable",
    "evaluate_methods",
    "figure",
    "full_fine_tuning",
    "load_experts",
    "load_result",
    "lora_all_experts",
    "markdown_table",
    "merge_deltas",
    "paper_table",
    "random_experts",
    "random_experts_method",
    "read_deltas",
    "resolve_targets",
    "router_tuning",
    "train",
]
