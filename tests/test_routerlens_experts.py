"""identify_experts: the paper's rule and alternatives, OE control sets, JSON round trip."""

from __future__ import annotations

import pytest
import torch

from moe_interp.errors import InputError
from moe_interp.routerlens.counting import SelectionCounts
from moe_interp.routerlens.experts import ExpertSets, draw_other_experts, identify_experts

TUNED = torch.tensor([[50, 10, 40, 10, 0, 5], [1, 2, 3, 4, 30, 30]])
BASE = torch.tensor([[60, 10, 5, 10, 0, 5], [1, 2, 3, 4, 40, 10]])


def _counts(m: torch.Tensor) -> SelectionCounts:
    return SelectionCounts({"prompt": m}, {"prompt": int(m[0].sum()) // 2}, [1, 3], 6, 2, 10)


def test_paper_rule_and_alternatives():
    sel = identify_experts(_counts(TUNED))  # k = model top-k = 2, layers from the counts
    assert sel.ce() == {1: [0, 2], 3: [4, 5]}
    diff = identify_experts(_counts(TUNED), _counts(BASE), method="diff")
    assert diff.ce() == {1: [1, 2], 3: [3, 5]}  # ties on the difference: higher tuned count first
    ratio = identify_experts(TUNED, BASE, layers=[1, 3], method="ratio", k=1)
    assert ratio.ce() == {1: [2], 3: [5]}
    f = sel.frame
    assert list(f.columns) == ["layer", "expert", "count_base", "count_tuned", "score", "rank", "set"]
    assert f.loc[(f.layer == 3) & (f.expert == 4), "rank"].item() == 1  # tie 30/30: lower id first
    assert (f["set"] == "CE").sum() == 4 and (f["set"] == "OE").sum() == 4


def test_oe_disjoint_same_size_seeded(tmp_path):
    sel = identify_experts(_counts(TUNED), oe_seed=3)
    ce, oe = sel.ce(), sel.oe()
    assert all(len(oe[layer]) == len(ce[layer]) and not set(oe[layer]) & set(ce[layer]) for layer in ce)
    assert sel.oe(3) == oe and draw_other_experts(ce, 6, 3) == oe
    draws = {tuple(map(tuple, draw_other_experts(ce, 6, s).values())) for s in range(10)}
    assert len(draws) > 1
    back = ExpertSets.load(sel.save(tmp_path / "experts.json"))
    assert back.ce() == ce and back.oe() == oe and back.method == "count" and back.k == 2
    assert back.frame.equals(sel.frame)


def test_errors():
    with pytest.raises(InputError, match="unknown method"):
        identify_experts(TUNED, k=2, method="max")
    with pytest.raises(InputError, match="needs the base"):
        identify_experts(TUNED, k=2, method="diff")
    with pytest.raises(InputError, match="k is required"):
        identify_experts(TUNED)
    with pytest.raises(InputError, match="cannot draw"):
        draw_other_experts({0: [0, 1, 2, 3]}, 6, 0)
