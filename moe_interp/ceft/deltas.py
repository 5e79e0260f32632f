"""Trainable deltas on (slices of) model parameters, via :mod:`torch.nn.utils.parametrize`.

A parameter ``W`` with a :class:`~moe_interp.ceft.targets.DeltaTarget` is read, during training, as

- whole-tensor targets: ``W + delta``;
- expert targets: ``W`` viewed as ``[E, *block]`` with ``delta [n, *block]`` added to the ``n`` chosen
  experts' blocks only (``index_add``; every other element is ``W``'s own value, bit for bit);
- LoRA targets: the same with ``delta = (alpha / r) * B @ A`` per chosen expert.

Only the delta tensors are parameters with ``requires_grad``; ``W`` itself is never written during training,
so optimiser state, weight decay and momentum can only ever touch the chosen slices. Merging (after training,
for evaluation) applies exactly the same arithmetic in place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from moe_interp.ceft.targets import DeltaTarget
from moe_interp.errors import InputError

SEP = "::"


def delta_value(target: DeltaTarget, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense delta of ``target`` from its trainable tensors (suffix -> tensor): the whole tensor's
    shape, or ``[n, *block]`` for expert targets."""
    if target.lora_rank == 0:
        return tensors["delta"]
    scale = target.lora_alpha / target.lora_rank
    return scale * torch.bmm(tensors["lora_B"], tensors["lora_A"])  # [n, a, r] @ [n, r, b] -> [n, a, b]


def add_delta(weight: torch.Tensor, target: DeltaTarget, value: torch.Tensor) -> torch.Tensor:
    """``weight`` with ``value`` added where ``target`` says (out of place, differentiable)."""
    value = value.to(weight.dtype)
    if target.experts is None:
        return weight + value
    blocks = weight.reshape(target.num_experts, *target.block)
    index = torch.tensor(target.experts, dtype=torch.long, device=weight.device)
    return blocks.index_add(0, index, value).reshape(weight.shape)


class DeltaParametrization(nn.Module):
    """The parametrization ``W -> W + delta`` of one target; holds the trainable tensors."""

    def __init__(self, target: DeltaTarget, device: torch.device, generator: torch.Generator):
        super().__init__()
        self.target = target
        for suffix, shape in target.delta_shapes().items():
            if suffix == "lora_A":
                init = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
            else:
                init = torch.zeros(shape)
            self.register_parameter(suffix, nn.Parameter(init.to(device)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return add_delta(weight, self.target, delta_value(self.target, self.tensors()))


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it (tied weights have several)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, attr))
    return out


class DeltaSet:
    """The parametrizations attached to a model for one training run."""

    def __init__(self, targets: Sequence[DeltaTarget], modules: dict[str, DeltaParametrization]):
        self.targets = list(targets)
        self.modules = modules

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, in a fixed order (targets, then suffix)."""
        return [p for m in self.modules.values() for p in m.parameters(recurse=False)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<param name>::<suffix>"`` -> detached CPU copy (float32)."""
        return {
            f"{name}{SEP}{suffix}": t.detach().to("cpu", torch.float32).clone().contiguous()
            for name, m in self.modules.items()
            for suffix, t in m.tensors().items()
        }

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved deltas in (names and shapes must match exactly)."""
        own = {f"{n}{SEP}{s}": t for n, m in self.modules.items() for s, t in m.tensors().items()}
        if set(own) != set(tensors):
            raise InputError(
                f"delta names differ: missing {sorted(set(own) - set(tensors))[:3]}, "
                f"unexpected {sorted(set(tensors) - set(own))[:3]}"
            )
        for k, t in own.items():
            if tuple(tensors[k].shape) != tuple(t.shape):
                got = tuple(tensors[k].shape)
                raise InputError(f"delta {k!r} has shape {got}, expected {tuple(t.shape)}")
            t.copy_(tensors[k])


@contextmanager
def attached_deltas(model: nn.Module, targets: Sequence[DeltaTarget], seed: int = 0) -> Iterator[DeltaSet]:
    """Attach trainable deltas for ``targets`` to ``model`` inside the ``with`` block.

    Mutates ``model`` temporarily (documented): parametrizations are registered and every parameter's
    ``requires_grad`` is set to False; on exit (also on exceptions) the parametrizations are removed, the
    original parameter objects put back untouched, and the ``requires_grad`` flags restored. LoRA ``A``
    factors are initialised from ``seed`` (``N(0, 1/b)``); every other delta starts at zero.
    """
    params = dict(model.named_parameters())
    missing = [t.name for t in targets if t.name not in params]
    if missing:
        raise InputError(f"targets name parameters the model does not have: {missing[:5]}")
    flags = {n: p.requires_grad for n, p in params.items()}
    owners = _owners(model)
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, DeltaParametrization] = {}
    registered: list[tuple[nn.Module, str]] = []
    orders: dict[int, tuple[nn.Module, list[str]]] = {}
    try:
        for p in params.values():
            p.requires_grad_(False)
        for t in targets:
            p = params[t.name]
            if tuple(p.shape) != t.shape:
                raise InputError(f"target {t.name} has shape {t.shape}, the model's {tuple(p.shape)}")
            m = modules[t.name] = DeltaParametrization(t, p.device, generator)
            for module, attr in owners[id(p)]:
                orders.setdefault(id(module), (module, list(module._parameters)))
                parametrize.register_parametrization(module, attr, m, unsafe=True)
                registered.append((module, attr))
        yield DeltaSet(targets, modules)
    finally:
        for module, attr in reversed(registered):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for module, order in orders.values():  # removal re-registers at the end: restore the order
            current = module._parameters
            ordered = {k: current[k] for k in order if k in current} | current
            current.clear()
            current.update(ordered)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])


# ------------------------------------------------------------------------------------------ merged use
def split_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"name::suffix": t}`` -> ``{name: {suffix: t}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, sep, suffix = key.rpartition(SEP)
        if not sep:
            raise InputError(f"delta key {key!r} lacks the '{SEP}<suffix>' part")
        out.setdefault(name, {})[suffix] = t
    return out


def read_deltas(source: str | os.PathLike[str]) -> tuple[list[DeltaTarget], dict[str, torch.Tensor]]:
    """Targets and tensors from a CEFT output folder (``deltas.safetensors`` + ``deltas.json``)."""
    folder = Path(source)
    files = folder / "deltas.safetensors", folder / "deltas.json"
    for f in files:
        if not f.is_file():
            raise InputError(f"no trained deltas at {folder} ({f.name} missing)")
    meta = json.loads(files[1].read_text())
    return [DeltaTarget.from_dict(t) for t in meta["targets"]], load_file(str(files[0]))


@contextmanager
def applied_deltas(
    model: nn.Module,
    source: str | os.PathLike[str] | tuple[Sequence[DeltaTarget], Mapping[str, torch.Tensor]],
) -> Iterator[nn.Module]:
    """Merge trained deltas into ``model`` in place inside the ``with`` block (exactly the training
    arithmetic); the touched elements are restored bit for bit on exit, also on exceptions.

    ``source``: a CEFT output folder or ``(targets, tensors)``.
    """
    targets, tensors = read_deltas(source) if isinstance(source, (str, os.PathLike)) else source
    saved = merge_deltas(model, targets, tensors)
    try:
        yield model
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for t in targets:
                p = params[t.name]
                if t.experts is None:
                    p.copy_(saved[t.name])
                else:
                    index = torch.tensor(t.experts, dtype=torch.long, device=p.device)
                    p.view(t.num_experts, *t.block).index_copy_(0, index, saved[t.name])


@torch.no_grad()
def merge_deltas(
    model: nn.Module, targets: Sequence[DeltaTarget], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add the deltas to ``model``'s parameters in place (permanently); returns copies of the elements it
    overwrote (whole tensors, or the chosen experts' blocks ``[n, *block]``)."""
    params = dict(model.named_parameters())
    grouped = split_state(tensors)
    saved: dict[str, torch.Tensor] = {}
    for t in targets:
        if t.name not in params or t.name not in grouped:
            raise InputError(f"delta for {t.name!r}: no such parameter or no tensors saved for it")
        p = params[t.name]
        value = delta_value(t, {k: v.to(p.device) for k, v in grouped[t.name].items()})
        new = add_delta(p.detach(), t, value)
        if t.experts is None:
            saved[t.name] = p.detach().clone()
            p.copy_(new)
        else:
            index = torch.tensor(t.experts, dtype=torch.long, device=p.device)
            blocks = p.view(t.num_experts, *t.block)
            saved[t.name] = blocks.index_select(0, index).clone()
            blocks.index_copy_(0, index, new.view(t.num_experts, *t.block).index_select(0, index))
    return saved


def describe(targets: Sequence[DeltaTarget]) -> list[dict[str, Any]]:
    return [t.to_dict() for t in targets]
