"""Query-row attention: exact against eager attention maps, model left untouched."""

from __future__ import annotations

import pytest
import torch

from moe_interp.analysis.rows import RowAttentionRecorder
from moe_interp.architectures import get_architecture
from moe_interp.hooks import ModelPatch
from tests.conftest import make_model


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 500, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    return ids, mask


def _eager_maps(model_type: str, ids, mask) -> dict[int, torch.Tensor]:
    eager = make_model(model_type, attn="eager")
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    numbers = [n for n, _ in get_architecture(eager).attention_modules(eager)]
    maps = [a for a in out.attentions if a is not None]
    assert len(maps) == len(numbers)
    return dict(zip(numbers, maps, strict=True))


def test_rows_match_eager(model_type: str) -> None:
    ids, mask = _batch()
    reference = _eager_maps(model_type, ids, mask)
    model = make_model(model_type)  # sdpa where the architecture has it
    rows = torch.tensor([[11, 3, 0], [8, 5, 2]])
    got: dict[int, torch.Tensor] = {}
    with ModelPatch() as patch, torch.no_grad():
        RowAttentionRecorder(rows, lambda n, p: got.__setitem__(n, p)).install(
            patch, get_architecture(model).attention_modules(model)
        )
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert set(got) == set(reference)
    for n, probs in got.items():
        ref = reference[n].float()
        for b in range(2):
            expected = ref[b][:, rows[b]]  # [H, R, K]
            torch.testing.assert_close(probs[b], expected, atol=1e-5, rtol=0)
    plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(out, plain)  # the kernel's output is unchanged


def test_no_padding_mask_none() -> None:
    """Without padding (sdpa may get no mask at all) the causal mask is rebuilt per row."""
    ids = torch.randint(2, 500, (1, 10))
    reference = _eager_maps("olmoe", ids, torch.ones_like(ids))
    model = make_model("olmoe")
    rows = torch.tensor([[9, 4]])
    got: dict[int, torch.Tensor] = {}
    with ModelPatch() as patch, torch.no_grad():
        RowAttentionRecorder(rows, lambda n, p: got.__setitem__(n, p)).install(
            patch, get_architecture(model).attention_modules(model)
        )
        model(input_ids=ids, use_cache=False)
    for n, probs in got.items():
        torch.testing.assert_close(probs[0], reference[n][0][:, rows[0]].float(), atol=1e-5, rtol=0)


def test_restored_after_exception() -> None:
    model = make_model("olmoe")
    arch = get_architecture(model)
    configs = [m.config for _, m in arch.attention_modules(model)]

    def boom(n: int, p: torch.Tensor) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with ModelPatch() as patch:
            RowAttentionRecorder(torch.tensor([[1]]), boom).install(patch, arch.attention_modules(model))
            model(input_ids=torch.tensor([[3, 4, 5]]))
    assert [m.config for _, m in arch.attention_modules(model)] == configs
    assert all(m.config is c for (_, m), c in zip(arch.attention_modules(model), configs, strict=True))
    assert all(not hasattr(m, "_moe_interp_row_recorder") for _, m in arch.attention_modules(model))
