"""What each fine-tuning method trains, as a list of :class:`DeltaTarget` (one per model parameter touched).

Experts are fused in transformers 5: every parameter of an MoE layer's ``experts`` module has the expert
dimension first, either ``[E, ...]`` (e.g. OLMoE ``gate_up_proj [E, 2I, d]``, GPT-OSS biases ``[E, 2I]``) or
``[E * r, ...]`` with ``r`` consecutive rows per expert (DBRX ``mlp.w1 [E * I, d]``). A target views the
parameter as ``[E, *block]`` and trains only the blocks of the chosen experts.

Methods (:class:`Method`): ``experts`` (CEFT and the random-experts control: the chosen experts' blocks),
``full`` (FFT: every parameter), ``routers`` (RT: the router parameters, as in :mod:`moe_interp.routerlens`),
``attention`` (every attention module's parameters: a diagnostic control that shows whether a model's
context-vs-memory choice can be moved without its experts) and low-rank deltas on expert blocks
(``lora_rank > 0``; LoRA on CE, or on all experts).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from moe_interp.architectures import get_architecture
from moe_interp.errors import InputError
from moe_interp.routerlens.masking import ExpertSpec, expert_spec
from moe_interp.routerlens.tuning import router_parameter_names

Kind = Literal["experts", "full", "routers", "attention"]


@dataclass(frozen=True)
class DeltaTarget:
    """One parameter that receives a trainable delta.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape: its full shape.
        experts: expert ids whose blocks are trained (``None``: the whole tensor).
        num_experts: ``E`` (the parameter is viewed as ``[E, *block]``; ignored when ``experts`` is None).
        lora_rank: ``0``: a dense delta ``[n, *block]``; ``r > 0``: ``(alpha / r) * B @ A`` per chosen
            expert with ``B [n, a, r] = 0``, ``A [n, r, b]`` (needs a 2-D block ``[a, b]``).
        lora_alpha: the LoRA scale numerator.
    """

    name: str
    shape: tuple[int, ...]
    experts: tuple[int, ...] | None = None
    num_experts: int = 1
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @property
    def block(self) -> tuple[int, ...]:
        """Shape of one expert's block, ``shape`` viewed as ``[E, *block]``."""
        if self.experts is None:
            return self.shape
        if self.shape[0] == self.num_experts:
            return self.shape[1:]
        return (self.shape[0] // self.num_experts, *self.shape[1:])

    def delta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name suffix -> shape of each trainable tensor of this target."""
        if self.experts is None:
            return {"delta": self.shape}
        n = len(self.experts)
        if self.lora_rank == 0:
            return {"delta": (n, *self.block)}
        a, b = self.block
        return {"lora_A": (n, self.lora_rank, b), "lora_B": (n, a, self.lora_rank)}

    def num_trainable(self) -> int:
        """Exact number of trainable scalars of this target."""
        total = 0
        for shape in self.delta_shapes().values():
            size = 1
            for s in shape:
                size *= s
            total += size
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "experts": None if self.experts is None else list(self.experts),
            "num_experts": self.num_experts,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeltaTarget:
        experts = d.get("experts")
        return cls(
            name=str(d["name"]),
            shape=tuple(int(s) for s in d["shape"]),
            experts=None if experts is None else tuple(int(e) for e in experts),
            num_experts=int(d.get("num_experts", 1)),
            lora_rank=int(d.get("lora_rank", 0)),
            lora_alpha=float(d.get("lora_alpha", 0.0)),
        )


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: what is trained.

    Attributes:
        name: the label used in reports (e.g. ``"CEFT"``).
        kind: ``"experts"`` (the blocks of ``experts``; all experts of every MoE layer when ``experts`` is
            None), ``"full"`` (every parameter), ``"routers"`` (the router parameters) or ``"attention"``
            (the parameters of every decoder layer's attention module).
        experts: ``{layer: [expert, ...]}`` with the model's decoder-layer numbers (``kind="experts"``).
        lora_rank, lora_alpha: low-rank deltas on the expert weight matrices instead of dense blocks
            (``kind="experts"`` only; expert biases are then frozen). ``lora_alpha`` defaults to ``2 * rank``.
        lr: learning rate for this method (``None``: the training config's).
    """

    name: str
    kind: Kind
    experts: Mapping[int, tuple[int, ...]] | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lr: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("experts", "full", "routers", "attention"):
            raise InputError(f"method {self.name!r}: unknown kind {self.kind!r}")
        if self.lora_rank < 0 or (self.lora_rank and self.kind != "experts"):
            raise InputError(f"method {self.name!r}: lora_rank={self.lora_rank} needs kind='experts'")
        if self.experts is not None and self.kind != "experts":
            raise InputError(f"method {self.name!r}: experts=... only applies to kind='experts'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "experts": None if self.experts is None else {str(k): list(v) for k, v in self.experts.items()},
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lr": self.lr,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Method:
        experts = d.get("experts")
        return cls(
            name=d["name"],
            kind=d["kind"],
            experts=None if experts is None else {int(k): tuple(v) for k, v in experts.items()},
            lora_rank=int(d.get("lora_rank", 0)),
            lora_alpha=d.get("lora_alpha"),
            lr=d.get("lr"),
            meta=d.get("meta", {}),
        )


# ------------------------------------------------------------------------------------------ constructors
def _frozen_spec(spec: Mapping[int, Any]) -> dict[int, tuple[int, ...]]:
    return {int(k): tuple(sorted({int(e) for e in v})) for k, v in sorted(spec.items()) if len(v)}


def ceft(experts: Mapping[int, Any], *, lora_rank: int = 0, name: str | None = None, **kw: Any) -> Method:
    """CEFT: train only ``experts`` (``{layer: [expert, ...]}``, e.g. ``ExpertSets.ce()``)."""
    label = name or ("CEFT" if lora_rank == 0 else f"CEFT-LoRA{lora_rank}")
    return Method(label, "experts", _frozen_spec(experts), lora_rank=lora_rank, **kw)


def full_fine_tuning(name: str = "FFT", **kw: Any) -> Method:
    """FFT: every parameter of the model."""
    return Method(name, "full", **kw)


def router_tuning(name: str = "RT", **kw: Any) -> Method:
    """RT: the MoE routers' parameters (:func:`moe_interp.routerlens.router_parameter_names`)."""
    return Method(name, "routers", **kw)


def all_experts(name: str = "All-experts", **kw: Any) -> Method:
    """Every routed expert of every MoE layer (dense deltas): the most that training chosen experts can
    train (shared experts, which are never chosen, are not included)."""
    return Method(name, "experts", None, **kw)


def attention_only(name: str = "Attention", **kw: Any) -> Method:
    """Every attention module's parameters, linear-attention layers included (no experts, routers, norms
    or embeddings): a control that shows whether the model's context-vs-memory choice is movable without
    its experts."""
    return Method(name, "attention", **kw)


def lora_all_experts(rank: int = 8, name: str | None = None, **kw: Any) -> Method:
    """Rank-``rank`` low-rank deltas on every expert of every MoE layer."""
    return Method(name or f"LoRA{rank}-all", "experts", None, lora_rank=rank, **kw)


def random_experts(
    like: Mapping[int, Any], num_experts: int, seed: int, *, exclude: Mapping[int, Any] | None = None
) -> dict[int, list[int]]:
    """Per layer of ``like``, as many experts as it has there, drawn uniformly (seeded) from ``[0, E)``
    minus ``exclude[layer]`` (default: exclude nothing, i.e. the draw may overlap ``like``)."""
    rng = random.Random(seed)
    out: dict[int, list[int]] = {}
    for layer in sorted(like):
        pool = sorted(set(range(num_experts)) - set((exclude or {}).get(layer, ())))
        n = len(like[layer])
        if n > len(pool):
            raise InputError(f"layer {layer}: cannot draw {n} experts from a pool of {len(pool)}")
        out[int(layer)] = sorted(rng.sample(pool, n))
    return out


def random_experts_method(like: Mapping[int, Any], num_experts: int, seed: int, **kw: Any) -> Method:
    """The control: the same number of experts per layer as ``like``, chosen at random (seeded)."""
    spec = random_experts(like, num_experts, seed)
    return ceft(spec, name=kw.pop("name", f"Random-{seed}"), meta={"seed": seed}, **kw)


def load_experts(path: str | os.PathLike[str], which: str = "ce", per_layer: int | None = None) -> ExpertSpec:
    """The CE (or ``which="oe"``) set from a Router Lens ``experts_*.json`` (:class:`ExpertSets` JSON), or
    a plain JSON ``{layer: [expert, ...]}``.

    ``per_layer=K`` (CE only, Router Lens files only) takes the K best-ranked experts of every layer under
    the file's own rule and scores instead of its top-k, e.g. more CE for CEFT than were masked.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no expert selection file at {path}")
    d = json.loads(path.read_text())
    if per_layer is not None:
        if which != "ce" or "rows" not in d:
            raise InputError(f"{path}: per_layer needs a Router Lens experts file (with 'rows') and the CE")
        ranked: dict[int, list[tuple[int, int]]] = {}
        for row in d["rows"]:
            ranked.setdefault(int(row["layer"]), []).append((int(row["rank"]), int(row["expert"])))
        if per_layer < 1 or any(per_layer > len(v) for v in ranked.values()):
            n = min(len(v) for v in ranked.values())
            raise InputError(f"per_layer={per_layer}: {path} ranks {n} experts per layer (choose 1..{n})")
        return {layer: sorted(e for _, e in sorted(v)[:per_layer]) for layer, v in sorted(ranked.items())}
    if which in d:
        d = d[which]
    elif "rows" in d:
        raise InputError(f"{path} has no {which!r} set (keys: {sorted(d)})")
    try:
        return {int(k): sorted(int(e) for e in v) for k, v in d.items()}
    except (TypeError, ValueError):
        raise InputError(f"{path}: expected {{layer: [expert, ...]}}, got keys {sorted(d)[:5]}") from None


# ------------------------------------------------------------------------------------------ resolution
def resolve_targets(model: nn.Module, method: Method) -> list[DeltaTarget]:
    """The parameters ``method`` trains in ``model``, with exact slices.

    Raises:
        InputError: a layer / expert outside the model, an expert parameter whose leading dimension is not a
            multiple of the expert count, LoRA on a non-matrix block.
    """
    params = dict(model.named_parameters())
    if method.kind == "full":
        return [DeltaTarget(n, tuple(p.shape)) for n, p in params.items()]
    if method.kind == "routers":
        return [DeltaTarget(n, tuple(params[n].shape)) for n in router_parameter_names(model)]
    arch = get_architecture(model)
    if method.kind == "attention":
        names = {id(p): n for n, p in params.items()}
        owned = [names[id(p)] for _, attn in arch.token_mixers(model) for p in attn.parameters()]
        if not owned:
            raise InputError(f"method {method.name!r}: no attention parameters found in {arch.model_type}")
        return [DeltaTarget(n, tuple(params[n].shape)) for n in dict.fromkeys(owned)]
    n_experts = arch.num_experts(model.config)
    layers = {m.number: m for m in arch.moe_layers(model)}
    if method.experts is None:
        spec = {number: list(range(n_experts)) for number in layers}
    else:
        spec = expert_spec(model, {int(k): list(v) for k, v in method.experts.items()})
    names = {id(p): n for n, p in params.items()}
    out = []
    for number, ids in spec.items():
        expert_params = [p for m in arch.expert_modules(layers[number]) for p in m.parameters()]
        for p in expert_params:
            full = names[id(p)]
            if p.shape[0] % n_experts:
                raise InputError(
                    f"{arch.model_type}: expert parameter {full} has shape {tuple(p.shape)}; its leading "
                    f"dimension is not a multiple of the {n_experts} experts"
                )
            t = DeltaTarget(full, tuple(p.shape), tuple(ids), n_experts)
            if method.lora_rank:
                if len(t.block) != 2:
                    continue  # biases: frozen under LoRA
                alpha = method.lora_alpha if method.lora_alpha is not None else 2.0 * method.lora_rank
                t = DeltaTarget(full, t.shape, t.experts, n_experts, method.lora_rank, float(alpha))
            out.append(t)
    if not out:
        raise InputError(f"method {method.name!r} trains nothing in this model")
    return out


def count_trainable(targets: list[DeltaTarget]) -> int:
    """Exact number of trainable scalars (selected slices / low-rank factors, never whole fused tensors)."""
    return sum(t.num_trainable() for t in targets)


def count_parameters(model: nn.Module) -> int:
    """All parameters of ``model`` (shared tensors once)."""
    return sum(p.numel() for p in model.parameters())
