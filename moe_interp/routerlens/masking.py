"""Expert masking: make chosen experts unselectable under each architecture's own routing rule.

``mask_experts(model, {layer: [expert, ...]})`` installs one forward hook per affected router that rewrites
the router's output:

- routers returning ``(logits, weights, indices)``: weights and indices are recomputed with
  ``arch.rule.route(logits, ..., blocked=mask)``, i.e. the model's own rule with the masked experts excluded
  from the choice. By default their probability mass is *not* redistributed (a softmax router keeps its
  softmax over all experts, as ``RoutingRule.route`` documents); with ``renormalize=True`` the masked logits
  are set to ``-inf`` first, so the softmax runs over the remaining experts only (as if the experts had
  been removed from the model), and the router returns those ``-inf`` logits (a trace's ``router_probs``
  are then 0 for the removed experts);
- routers returning logits only (DBRX): the masked logits are set to ``-inf`` before the block's own rule
  (so these always renormalise);
- expert-grouped routers (JetMoE): the sorted index, token index, gates and expert sizes are rebuilt from
  the rule's choice;
- dense-score routers (Llama-4, ``router_output=("scores", "logits")``): the dense scores are rebuilt from
  the rule's choice, and the masked logits set to ``-inf`` so that readers that recompute routing from the
  logits (``arch.applied == "rule"``, e.g. :func:`moe_interp.trace`) see the routing actually applied.

Masks nest: inside ``with mask_experts(m, a): with mask_experts(m, b): ...`` the union of ``a`` and ``b`` is
masked. On exit (also on exceptions) every hook is removed; parameters and buffers are never touched.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moe_interp.architectures import MoEArchitecture, MoELayer, get_architecture
from moe_interp.errors import InputError
from moe_interp.routing import NEG_INF

#: model-numbered decoder layer -> expert ids (sorted, unique)
ExpertSpec = dict[int, list[int]]


def expert_spec(model: nn.Module, experts: Mapping[int, Any] | Any) -> ExpertSpec:
    """Validate and normalise an expert specification for ``model``.

    Args:
        experts: ``{layer: [expert, ...]}`` with the model's own decoder-layer numbers, or a pandas frame
            with columns ``layer`` and ``expert`` (one row per masked expert; a frame with a ``set`` column
            must hold a single set: select ``frame[frame.set == "CE"]`` first).

    Returns:
        ``{layer: sorted unique experts}`` (layers with no experts dropped).

    Raises:
        InputError: a layer that is not an MoE layer of the model, an expert id outside ``[0, E)``.
    """
    arch = get_architecture(model)
    layers = {m.number for m in arch.moe_layers(model)}
    n_experts = arch.num_experts(model.config)
    if hasattr(experts, "columns"):  # a pandas frame
        missing = {"layer", "expert"} - set(experts.columns)
        if missing:
            raise InputError(
                f"expert frame lacks column(s) {sorted(missing)}; it has {list(experts.columns)}"
            )
        if "set" in experts.columns and experts["set"].nunique() > 1:
            raise InputError(
                f"expert frame mixes sets {sorted(map(str, experts['set'].unique()))}; select one set "
                "first, e.g. frame[frame.set == 'CE']"
            )
        pairs: dict[int, list[int]] = {}
        for layer, expert in zip(experts["layer"].tolist(), experts["expert"].tolist(), strict=True):
            if any(isinstance(v, float) and not v.is_integer() for v in (layer, expert)):
                raise InputError(f"expert frame row (layer {layer!r}, expert {expert!r}) is not integral")
            pairs.setdefault(int(layer), []).append(int(expert))
        experts = pairs
    if not isinstance(experts, Mapping):
        raise InputError(f"experts must be a dict {{layer: [expert, ...]}} or a frame, got {type(experts)}")
    spec: ExpertSpec = {}
    for key, ids in experts.items():
        layer = _integer(key)
        if layer is None:
            raise InputError(f"layer key {key!r} is not an int (use the model's decoder-layer numbers)")
        if layer not in layers:
            raise InputError(
                f"layer {layer} is not an MoE layer of this {arch.model_type} model; MoE layers: "
                f"{sorted(layers)}"
            )
        if _integer(ids) is not None or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            ids = [ids]
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InputError(f"layer {layer}: experts must be an int or a list of ints, got {ids!r}")
        chosen = []
        for e in ids:
            value = _integer(e)
            if value is None:
                raise InputError(f"expert id {e!r} in layer {layer} is not an integer")
            if not 0 <= value < n_experts:
                raise InputError(f"expert id {value} in layer {layer} is not in [0, {n_experts})")
            chosen.append(value)
        if chosen:
            spec[layer] = sorted(set(chosen))
    return spec


def _integer(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (int, numpy or 0-d torch integer; not bool), else
    None."""
    if isinstance(value, bool) or isinstance(value, float):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() or value.dtype.is_floating_point or value.dtype == torch.bool:
            return None
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        return None


class _RouterMask:
    """The single hook on one router; applies the union of all active masks on that router."""

    def __init__(
        self, arch: MoEArchitecture, layer: MoELayer, config, n_experts: int, top_k: int, renormalize: bool
    ):
        self.arch, self.layer, self.config = arch, layer, config
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.active: list[torch.Tensor] = []  # [E] bool each
        self.handle = layer.router.register_forward_hook(self)

    def blocked(self) -> torch.Tensor:
        out = torch.zeros(self.n_experts, dtype=torch.bool)
        for b in self.active:
            out |= b
        return out

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        blocked = self.blocked()
        if not blocked.any():
            return None
        names = self.arch.router_output
        values = list(output) if isinstance(output, tuple) else [output]
        logits = values[names.index("logits")]
        blocked = blocked.to(logits.device)
        if names == ("logits",):
            return logits.masked_fill(blocked, NEG_INF)
        scores = logits.masked_fill(blocked, NEG_INF) if self.renormalize else logits
        weights, indices = self.arch.rule.route(
            scores, self.config, self.top_k, self.layer.router, blocked=blocked
        )
        if blocked[indices].any():
            raise InputError(
                f"{self.arch.model_type} layer {self.layer.number}: masking experts "
                f"{torch.nonzero(blocked).flatten().tolist()} leaves fewer than top-k={self.top_k} "
                "selectable experts for some tokens under this routing rule"
            )
        if "indices" in names:
            old_w, old_i = values[names.index("weights")], values[names.index("indices")]
            values[names.index("weights")] = weights.to(old_w.dtype)
            values[names.index("indices")] = indices.to(old_i.dtype)
            if self.renormalize:  # removed experts: readers of the logits (a trace) see them gone too
                values[names.index("logits")] = scores
        elif "scores" in names:  # dense [T, E] scores, zero for unchosen experts
            old = values[names.index("scores")]
            dense = torch.zeros(old.shape, dtype=torch.float32, device=old.device)
            values[names.index("scores")] = dense.scatter_(-1, indices, weights).to(old.dtype)
            if self.arch.applied == "rule":
                values[names.index("logits")] = logits.masked_fill(blocked, NEG_INF)
        elif "sorted_index" in names:  # JetMoE: gates grouped by expert
            values = _expert_sorted(names, values, weights, indices, self.n_experts)
            values[names.index("logits")] = logits.masked_fill(blocked, NEG_INF)
        else:
            raise InputError(f"{self.arch.model_type}: cannot mask a router returning {names}")
        return tuple(values) if isinstance(output, tuple) else values[0]


def _expert_sorted(
    names: tuple[str, ...], values: list, weights: torch.Tensor, indices: torch.Tensor, n_experts: int
):
    """Rebuild a JetMoE-style routing tuple (entries grouped by expert) from [T, k] weights and indices."""
    k = indices.shape[-1]
    flat = indices.flatten()
    _, order = flat.sort(0)
    out = list(values)
    gates = values[names.index("gates")]
    out[names.index("sorted_index")] = order
    out[names.index("token_index")] = order.div(k, rounding_mode="trunc")
    out[names.index("gates")] = weights.flatten()[order].to(gates.dtype)
    out[names.index("expert_size")] = torch.bincount(flat, minlength=n_experts).tolist()
    return out


# router module -> its mask hook (module objects are never modified; the table lives here)
_MASKS: weakref.WeakKeyDictionary[nn.Module, _RouterMask] = weakref.WeakKeyDictionary()


@contextmanager
def mask_experts(
    model: nn.Module, experts: Mapping[int, Any] | Any, *, renormalize: bool = False
) -> Iterator[ExpertSpec]:
    """Make ``experts`` unselectable inside the ``with`` block; yields the normalised spec.

    Args:
        model: a transformers MoE model of a registered architecture.
        experts: ``{layer: [expert, ...]}`` (model-numbered decoder layers) or a frame with ``layer`` and
            ``expert`` columns; see :func:`expert_spec`.
        renormalize: remove the masked experts before the softmax (the remaining experts' weights are
            renormalised over them) instead of only excluding them from the choice (the default, which
            keeps every other weight exactly as the model computes it). Nested masks must agree.

    Nested masks on the same model are combined (union). Hooks are removed on exit, also on exceptions; an
    empty spec installs nothing. Raises :class:`~moe_interp.errors.InputError` during the forward pass if a
    token is left with fewer than top-k selectable experts.

    Example:
        >>> with mask_experts(model, {0: [3, 7], 2: [1]}):          # doctest: +SKIP
        ...     out = model(**batch)
    """
    spec = expert_spec(model, experts)
    arch = get_architecture(model)
    layers = {m.number: m for m in arch.moe_layers(model)}
    n_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    for number, ids in spec.items():
        if n_experts - len(ids) < top_k:
            raise InputError(
                f"cannot mask {len(ids)} of {n_experts} experts in layer {number}: top-k is {top_k}"
            )
    entries: list[tuple[_RouterMask, torch.Tensor]] = []
    try:
        for number, ids in spec.items():
            layer = layers[number]
            state = _MASKS.get(layer.router)
            if state is None:
                state = _MASKS[layer.router] = _RouterMask(
                    arch, layer, model.config, n_experts, top_k, renormalize
                )
            elif state.renormalize != renormalize:
                raise InputError(
                    f"layer {number} is already masked with renormalize={state.renormalize}; nested masks "
                    "must use the same renormalize setting"
                )
            mask = torch.zeros(n_experts, dtype=torch.bool)
            mask[ids] = True
            state.active.append(mask)
            entries.append((state, mask))
        yield spec
    finally:
        for state, mask in reversed(entries):
            for i in range(len(state.active) - 1, -1, -1):
                if state.active[i] is mask:
                    del state.active[i]
                    break
            if not state.active:
                state.handle.remove()
                _MASKS.pop(state.layer.router, None)


def active_masks(model: nn.Module) -> ExpertSpec:
    """The experts currently masked in ``model`` (union of all active :func:`mask_experts` blocks)."""
    arch = get_architecture(model)
    out: ExpertSpec = {}
    for layer in arch.moe_layers(model):
        state = _MASKS.get(layer.router)
        if state is not None:
            out[layer.number] = torch.nonzero(state.blocked()).flatten().tolist()
    return out
