"""Per-expert faithfulness attribution: what masking each (layer, expert) does to the gold answer.

Exact (:func:`masking_effects`): for every MoE layer ``l`` and expert ``e``, the expert is made unselectable
at every position (:func:`moe_interp.routerlens.masking.mask_experts`, the model's own routing rule picks
the replacement) and the examples are re-scored under teacher forcing::

    delta_logprob[l, e] = 1/N sum_i (log p_masked(answer_i | prompt_i) - log p(answer_i | prompt_i))
    delta_context_rate[l, e] = rate_masked - rate,  rate = share of examples whose greedy first token is
                               the gold (context) answer's first token

Examples are batched; a batch in which ``e`` is never selected in layer ``l`` is provably unchanged by the
mask and is not re-run.

Fast (:func:`gradient_effects`, one forward + one backward pass per batch): the routing weights the model
applies, ``w[t, j]`` for slot ``j`` of token ``t``, are made differentiable leaves by a pre-hook on each
``experts(hidden, indices, weights)`` call, and with ``g = d objective / d w`` (objective: sum of the
answers' log-probabilities)::

    method="weight":  est[l, e] = 1/N sum_i sum_{t in i, j: idx[t, j] = e}  -(g[t, j] * w[t, j])

i.e. the first-order effect of removing the expert's weighted output. ``method="swap"`` also adds the
expert the routing rule would choose instead: with ``G`` = d objective / d experts-output and ``w', idx'``
the rule's choice with ``e`` blocked, ``est = sum_t G[t] . (experts(h_t, idx'_t, w'_t) - experts(h_t,
idx_t, w_t))`` over the tokens that chose ``e`` (extra forward calls of the experts, no extra backward).
Rank agreement with the exact effects: :func:`spearman`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_interp.analysis.encode import Batch, batches, model_device
from moe_interp.architectures import MoELayer, get_architecture
from moe_interp.errors import InputError, UnsupportedModelError
from moe_interp.hooks import ModelPatch
from moe_interp.recording import Recorder
from moe_interp.routerlens.masking import mask_experts
from moe_interp.signature import forward_accepts


@dataclass
class ExpertEffects:
    """Effect of removing each expert, per example.

    Attributes:
        layers: decoder-layer numbers (axis L). num_experts: E. ids: example ids (axis N).
        delta_logprob: [L, E, N] float32 change of the answer log-probability.
        delta_hit: [L, E, N] float32 change (-1, 0, 1) of "greedy first token = gold first token"
            (exact method only; ``None`` for estimates).
        base_logprob: [N] unmasked answer log-probability. base_hit: [N] unmasked hit (0/1).
        method: ``"exact"``, ``"weight"`` or ``"swap"``.
    """

    layers: list[int]
    num_experts: int
    ids: list[str]
    delta_logprob: torch.Tensor
    delta_hit: torch.Tensor | None
    base_logprob: torch.Tensor
    base_hit: torch.Tensor
    method: str

    def frame(self) -> pd.DataFrame:
        """One row per (layer, expert): layer, expert, delta_logprob, delta_context_rate, method."""
        nl, ne = len(self.layers), self.num_experts
        rate = self.delta_hit.mean(-1) if self.delta_hit is not None else torch.full((nl, ne), float("nan"))
        return pd.DataFrame(
            {
                "layer": [n for n in self.layers for _ in range(ne)],
                "expert": list(range(ne)) * nl,
                "delta_logprob": self.delta_logprob.mean(-1).flatten().tolist(),
                "delta_context_rate": rate.flatten().tolist(),
                "method": self.method,
            }
        )


def answer_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced answer log-probability [B] float64 and first-token greedy hit [B] float (no grad)."""
    with torch.no_grad():
        logits, positions = _answer_logits(model, batch)
    return _score_from_logits(logits, batch, positions)


def _answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, P, V] at the positions P that predict answer tokens (union over the batch)."""
    needed = sorted({p for e in batch.items for p in range(e.prompt_len - 1, len(e.ids) - 1)})
    positions = torch.tensor(needed)
    device = model_device(model)
    kwargs = {"logits_to_keep": positions.to(device)} if forward_accepts(model, "logits_to_keep") else {}
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.mask.to(device), use_cache=False, **kwargs
    ).logits
    if logits.shape[1] != len(positions):
        logits = logits[:, positions.to(logits.device)]
    return logits, positions


def _score_from_logits(
    logits: torch.Tensor, batch: Batch, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = logits.float().log_softmax(-1)
    column = {int(p): c for c, p in enumerate(positions.tolist())}
    totals, hits = [], []
    for b, e in enumerate(batch.items):
        cols = torch.tensor([column[p] for p in range(e.prompt_len - 1, len(e.ids) - 1)], device=logp.device)
        target = torch.tensor(e.answer_ids, device=logp.device)
        totals.append(logp[b, cols].gather(-1, target[:, None]).sum())
        hits.append((logp[b, cols[0]].argmax() == target[0]).float())
    return torch.stack(totals).double(), torch.stack(hits)


def _selected(model: nn.Module, batch: Batch, layers: Sequence[MoELayer]) -> dict[int, set[int]]:
    """Experts chosen anywhere in the batch, per layer (padding included: a mask acts on it too)."""
    arch = get_architecture(model)
    valid = torch.ones(batch.input_ids.numel(), dtype=torch.bool)
    rec = Recorder(arch, list(layers), valid, experts=False)
    device = model_device(model)
    with ModelPatch() as patch, torch.no_grad():
        patch.eval_mode(model)
        rec.install(patch)
        model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.mask.to(device),
            use_cache=False,
            **({"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}),
        )
    _, indices = rec.applied_routing(model.config, arch.top_k(model.config))
    return {m.number: set(indices[i].flatten().tolist()) for i, m in enumerate(layers)}


def _moe_layers(model: nn.Module, layers: Sequence[int] | None) -> list[MoELayer]:
    arch = get_architecture(model)
    found = arch.moe_layers(model)
    if layers is None:
        return found
    known = {m.number for m in found}
    bad = [n for n in layers if n not in known]
    if bad:
        raise InputError(f"layers {bad} are not MoE layers of this {arch.model_type} model: {sorted(known)}")
    return [m for m in found if m.number in set(layers)]


def masking_effects(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Any],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    template: str = "paper",
    progress: bool = False,
) -> ExpertEffects:
    """Exact effect of masking each expert of ``layers`` (default: all MoE layers); module docstring."""
    moe = _moe_layers(model, layers)
    n_exp = get_architecture(model).num_experts(model.config)
    deltas, hit_deltas, base_lp, base_hit, ids = [], [], [], [], []
    stream = batches(tokenizer, examples, batch_size, template=template)
    with torch.no_grad():
        for batch in tqdm(stream, desc="mask experts", unit="batch", disable=not progress):
            lp, hit = answer_scores(model, batch)
            chosen = _selected(model, batch, moe)
            d_lp = torch.zeros(len(moe), n_exp, len(batch.items))
            d_hit = torch.zeros_like(d_lp)
            for li, layer in enumerate(moe):
                for e in sorted(chosen[layer.number]):
                    with mask_experts(model, {layer.number: [e]}):
                        lp_m, hit_m = answer_scores(model, batch)
                    d_lp[li, e] = (lp_m - lp).float().cpu()
                    d_hit[li, e] = (hit_m - hit).float().cpu()
            deltas.append(d_lp)
            hit_deltas.append(d_hit)
            base_lp.append(lp.cpu())
            base_hit.append(hit.cpu())
            ids.extend(e.id for e in batch.items)
    if not ids:
        raise InputError("examples is empty")
    return ExpertEffects(
        [m.number for m in moe],
        n_exp,
        ids,
        torch.cat(deltas, -1),
        torch.cat(hit_deltas, -1),
        torch.cat(base_lp),
        torch.cat(base_hit),
        "exact",
    )


class _Leaves:
    """Pre-hooks making the applied routing weights differentiable leaves; records what swap needs."""

    def __init__(self, layers: Sequence[MoELayer], swap: bool, names: tuple[str, ...]) -> None:
        self.layers, self.swap, self.names = layers, swap, names
        self.weights: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def install(self, patch: ModelPatch) -> None:
        for layer in self.layers:
            patch.pre_hook(layer.experts, self._pre(layer.number), with_kwargs=True)
            if self.swap:
                patch.forward_hook(layer.experts, self._post(layer.number))
                patch.forward_hook(layer.router, self._router(layer.number))

    def _pre(self, number: int):
        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            names = list(bound.arguments)
            if len(names) < 3:
                raise UnsupportedModelError(
                    f"experts module {type(module).__name__} does not take (hidden, indices, weights)"
                )
            hidden, indices, weights = (bound.arguments[n] for n in names[:3])
            leaf = weights.detach().clone().requires_grad_(True)
            self.weights[number], self.indices[number] = leaf, indices.detach()
            if self.swap:
                self.hidden[number] = hidden.detach()
            bound.arguments[names[2]] = leaf
            return bound.args, bound.kwargs

        return hook

    def _post(self, number: int):
        def hook(module, args, output):
            self.outputs[number] = output[0] if isinstance(output, tuple) else output

        return hook

    def _router(self, number: int):
        def hook(module, args, output):
            values = output if isinstance(output, tuple) else (output,)
            self.logits[number] = values[self.names.index("logits")].detach()

        return hook


def gradient_effects(
    model: nn.Module,
    tokenizer: Any,
    examples: Iterable[Any],
    *,
    method: Literal["weight", "swap"] = "weight",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    template: str = "paper",
    progress: bool = False,
) -> ExpertEffects:
    """First-order estimate of :func:`masking_effects` from one backward pass per batch (module docstring).

    Gradients are taken with :func:`torch.autograd.grad` only with respect to the routing-weight leaves
    (and the experts' outputs for ``"swap"``): parameters' ``.grad`` are never touched.
    """
    if method not in ("weight", "swap"):
        raise InputError(f"method must be 'weight' or 'swap', got {method!r}")
    arch = get_architecture(model)
    if arch.applied != "experts_input" or not arch.expert_outputs:
        raise UnsupportedModelError(
            f"gradient attribution needs experts(hidden, indices, weights) calls; model type "
            f"{arch.model_type!r} does not make them"
        )
    moe = _moe_layers(model, layers)
    n_exp, k = arch.num_experts(model.config), arch.top_k(model.config)
    deltas, base_lp, base_hit, ids = [], [], [], []
    stream = batches(tokenizer, examples, batch_size, template=template)
    for batch in tqdm(stream, desc=f"grad ({method})", unit="batch", disable=not progress):
        leaves = _Leaves(moe, method == "swap", arch.router_output)
        with ModelPatch() as patch, torch.enable_grad():
            patch.eval_mode(model)
            leaves.install(patch)
            logits, positions = _answer_logits(model, batch)
            lp, hit = _score_from_logits(logits, batch, positions)
            inputs = [leaves.weights[m.number] for m in moe]
            if method == "swap":
                inputs += [leaves.outputs[m.number] for m in moe]
            grads = torch.autograd.grad(lp.sum(), inputs, allow_unused=True)
        bsz, width = batch.input_ids.shape
        example_of = torch.arange(bsz).repeat_interleave(width)
        d = torch.zeros(len(moe), n_exp, bsz, dtype=torch.float64)
        for li, layer in enumerate(moe):
            w, idx = leaves.weights[layer.number].detach(), leaves.indices[layer.number].long()
            if idx.shape[0] != bsz * width:
                raise UnsupportedModelError(
                    f"{arch.model_type} layer {layer.number}: experts saw {idx.shape[0]} rows, expected "
                    f"batch x tokens = {bsz * width}"
                )
            g = grads[li] if grads[li] is not None else torch.zeros_like(w)
            if method == "weight":
                contrib = (-(g * w)).double().cpu()  # [B*T, k]
                flat = example_of[:, None].expand(-1, idx.shape[1]) * n_exp + idx.cpu()
                d[li] += (
                    torch.zeros(bsz * n_exp, dtype=torch.float64)
                    .index_add_(0, flat.flatten(), contrib.flatten())
                    .reshape(bsz, n_exp)
                    .T
                )
            else:
                g_out = grads[len(moe) + li]
                d[li] = _swap_estimate(arch, layer, model.config, k, n_exp, leaves, g_out, example_of, bsz)
        deltas.append(d.float())
        base_lp.append(lp.detach().cpu())
        base_hit.append(hit.detach().cpu())
        ids.extend(e.id for e in batch.items)
    if not ids:
        raise InputError("examples is empty")
    return ExpertEffects(
        [m.number for m in moe],
        n_exp,
        ids,
        torch.cat(deltas, -1),
        None,
        torch.cat(base_lp),
        torch.cat(base_hit),
        method,
    )


@torch.no_grad()
def _swap_estimate(
    arch, layer: MoELayer, config, k: int, n_exp: int, leaves: _Leaves, g_out, example_of, bsz
):
    """[E, B] first-order effect of blocking each expert, replacement expert included."""
    number = layer.number
    h, idx, w = leaves.hidden[number], leaves.indices[number], leaves.weights[number].detach()
    logits = leaves.logits[number].reshape(idx.shape[0], -1)
    out = torch.zeros(n_exp, bsz, dtype=torch.float64)
    if g_out is None:
        return out
    g_out = g_out.reshape(idx.shape[0], -1)
    for e in range(n_exp):
        rows = (idx == e).any(-1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        blocked = torch.zeros(n_exp, dtype=torch.bool, device=logits.device)
        blocked[e] = True
        new_w, new_i = arch.rule.route(logits[rows], config, k, layer.router, blocked=blocked)
        new = layer.experts(h[rows], new_i.to(idx.dtype), new_w.to(w.dtype))
        old = layer.experts(h[rows], idx[rows], w[rows])
        new = new[0] if isinstance(new, tuple) else new
        old = old[0] if isinstance(old, tuple) else old
        effect = (g_out[rows] * (new - old)).sum(-1).double().cpu()
        out[e].index_add_(0, example_of[rows.cpu()], effect)
    return out


def spearman(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties) of two equally long sequences."""
    sa, sb = (
        pd.Series(torch.as_tensor(a).flatten().tolist()),
        pd.Series(torch.as_tensor(b).flatten().tolist()),
    )
    if len(sa) != len(sb) or len(sa) < 2:
        raise InputError(f"spearman needs two sequences of equal length >= 2, got {len(sa)} and {len(sb)}")
    return float(sa.rank().corr(sb.rank()))


def rank_agreement(exact: ExpertEffects, estimate: ExpertEffects) -> float:
    """Spearman between the exact and estimated mean ``delta_logprob`` over all (layer, expert) pairs."""
    if exact.layers != estimate.layers or exact.ids != estimate.ids:
        raise InputError("exact and estimated effects cover different layers or examples")
    return spearman(exact.delta_logprob.mean(-1), estimate.delta_logprob.mean(-1))
