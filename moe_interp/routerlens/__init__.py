"""Router Lens (Bai et al., EMNLP 2025): router tuning, expert selection statistics, context-faithful experts
(CE) and expert masking.

>>> from moe_interp.routerlens import (tune_routers, count_selections, identify_experts, mask_experts,
...     applied_router_weights)  # doctest: +SKIP
>>> result = tune_routers(model, tok, train, dev, out="runs/rt")                   # doctest: +SKIP
>>> with applied_router_weights(model, result.path):                               # doctest: +SKIP
...     counts = count_selections(model, tok, train, spans=("prompt",))
>>> sel = identify_experts(counts.counts["prompt"], layers=counts.layers)          # doctest: +SKIP
>>> with applied_router_weights(model, result.path), mask_experts(model, sel.ce()):  # doctest: +SKIP
...     ...

The pipeline on the demo model: ``python -m moe_interp.routerlens.run --out runs/routerlens``.
"""

from moe_interp.routerlens.compare import Comparison, Condition, compare, evaluate_sharded, paper_conditions
from moe_interp.routerlens.counting import SPANS, SelectionCounts, count_selections
from moe_interp.routerlens.data import demo_examples, to_examples
from moe_interp.routerlens.experts import METHODS, ExpertSets, draw_other_experts, identify_experts
from moe_interp.routerlens.masking import ExpertSpec, expert_spec, mask_experts
from moe_interp.routerlens.tuning import (
    RouterTuningConfig,
    RouterTuningResult,
    applied_router_weights,
    load_router_weights,
    load_tuning_result,
    router_parameter_names,
    tune_routers,
)

__all__ = [
    "METHODS",
    "Comparison",
    "Condition",
    "SPANS",
    "ExpertSets",
    "ExpertSpec",
    "RouterTuningConfig",
    "RouterTuningResult",
    "SelectionCounts",
    "applied_router_weights",
    "compare",
    "count_selections",
    "demo_examples",
    "draw_other_experts",
    "evaluate_sharded",
    "expert_spec",
    "identify_experts",
    "load_router_weights",
    "load_tuning_result",
    "mask_experts",
    "paper_conditions",
    "router_parameter_names",
    "to_examples",
    "tune_routers",
]
