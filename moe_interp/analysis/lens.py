"""Logit lens: probability of the gold answer's first token read out after every decoder layer.

After decoder layer ``l`` the residual stream ``h_l`` at the last prompt token is decoded as the model
decodes its final layer: ``p_l = softmax(unembed(final_norm(h_l)) / logits_scaling)[first answer token]``
(``logits_scaling``: Granite's config divisor, 1 elsewhere). At the last layer this is the model's own
next-token probability (tested against its logits for every registered architecture).

APG (answer probability gain) per layer: ``APG_l = mean_i (p_tuned,l(i) - p_base,l(i))``
(:func:`moe_interp.analysis.gains.answer_probability_gain`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_interp.analysis.encode import Batch, batches, model_device
from moe_interp.architectures import get_architecture, get_path
from moe_interp.errors import InputError, UnsupportedModelError
from moe_interp.hooks import ModelPatch
from moe_interp.signature import forward_accepts

_NORM_NAMES = ("norm", "norm_f", "final_layernorm", "ln_f", "final_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The final normalisation before the unembedding (``model.norm``, DBRX ``transformer.norm_f``, ...)."""
    arch = get_architecture(model)
    base_path = arch.layers.rsplit(".", 1)[0]
    base = get_path(model, base_path, arch.model_type) if "." in arch.layers else model
    for name in _NORM_NAMES:
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise UnsupportedModelError(
        f"{arch.model_type}: no final norm named one of {_NORM_NAMES} on {type(base).__name__}"
    )


def decode_residual(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] float32 from residual-stream vectors ``hidden`` [..., d] (final norm + unembedding)."""
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (LM head)")
    logits = head(final_norm(model)(hidden)).float()
    scaling = getattr(model.config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def residual_rows(
    model: nn.Module, batch: Batch, positions: torch.Tensor
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Residual stream after every decoder layer at ``positions`` [B].

    Returns:
        layer numbers, hidden [L, B, d] and the model's own logits at ``positions`` [B, V] float32.
    """
    arch = get_architecture(model)
    layers = get_path(model, arch.layers, arch.model_type)
    got: dict[int, torch.Tensor] = {}
    pos = positions.to(model_device(model))

    def hook(number: int):
        def fn(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            got[number] = h[torch.arange(h.shape[0], device=h.device), pos].detach()

        return fn

    device = model_device(model)
    with ModelPatch() as patch, torch.no_grad():
        patch.eval_mode(model)
        for number, layer in enumerate(layers):
            patch.forward_hook(layer, hook(number))
        keep = torch.unique(positions)
        logits = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.mask.to(device),
            use_cache=False,
            **({"logits_to_keep": keep.to(device)} if forward_accepts(model, "logits_to_keep") else {}),
        ).logits
    column = torch.searchsorted(keep, positions) if logits.shape[1] == len(keep) else positions
    own = logits[torch.arange(len(positions)), column.to(logits.device)].float()
    numbers = sorted(got)
    return numbers, torch.stack([got[n] for n in numbers]), own


@dataclass
class LensResult:
    """Gold-answer first-token probability after each decoder layer.

    Attributes:
        layers: decoder-layer numbers (axis L). prob: [N, L] float32. ids: example ids.
        final: [N] the model's own probability (from its logits), for checking.
    """

    layers: list[int]
    prob: torch.Tensor
    ids: list[str]
    final: torch.Tensor

    def frame(self) -> pd.DataFrame:
        """Tidy means: layer, prob (mean over examples)."""
        return pd.DataFrame({"layer": self.layers, "prob": self.prob.mean(0).tolist()})


def answer_lens(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Any],
    *,
    batch_size: int = 16,
    template: str = "paper",
    progress: bool = False,
) -> LensResult:
    """Logit-lens probability of each example's gold first answer token at the last prompt token (examples
    with or without a context).

    Memory: [N, L] floats; batches are streamed.
    """
    probs, finals, ids, layers = [], [], [], None
    stream = batches(
        tokenizer, examples, batch_size, template=template, with_answer=False, need_context=False
    )
    for batch in tqdm(stream, desc="lens", unit="batch", disable=not progress):
        layers, hidden, own = residual_rows(model, batch, batch.last)
        target = torch.tensor([e.answer_ids[0] for e in batch.items], device=hidden.device)
        with torch.no_grad():
            p = decode_residual(model, hidden).softmax(-1)  # [L, B, V]
        picked = p.gather(-1, target[None, :, None].expand(p.shape[0], -1, 1))[..., 0]
        probs.append(picked.T.cpu())
        finals.append(own.softmax(-1).gather(-1, target[:, None].to(own.device))[:, 0].cpu())
        ids.extend(e.id for e in batch.items)
    if layers is None:
        raise InputError("examples is empty")
    return LensResult(layers, torch.cat(probs), ids, torch.cat(finals))
