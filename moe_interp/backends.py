"""How a forward pass is run and observed: plain transformers, nnsight, or a TransformerLens bridge.

Every backend fills the same :class:`~moe_interp.recording.Recorder` (router logits, applied choices, expert
outputs) and :class:`~moe_interp.recording.AttentionSink`, so :func:`moe_interp.trace` gives the same
:class:`~moe_interp.moetrace.MoETrace` whichever object the user holds.

- ``transformers``: torch hooks on the model's own modules (the reference path).
- ``nnsight``: routing is read with nnsight's own ``.output`` / ``.inputs`` saves inside ``model.trace``,
  so ``remote=True`` runs on NDIF (routing only there: attention and expert outputs need local hooks).
- ``lens``: a TransformerLens ``TransformerBridge``; routing and attention patterns come from its hook points
  (``blocks.i.mlp.gate.hook_out``, ``hook_expert_indices``, ``hook_expert_weights``, ``attn.hook_pattern``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moe_interp.architectures import MoEArchitecture, MoELayer
from moe_interp.attention import AttentionRecorder
from moe_interp.errors import InputError, MoEInterpError, UnsupportedModelError
from moe_interp.hooks import ModelPatch
from moe_interp.recording import AttentionSink, Recorder
from moe_interp.signature import forward_accepts

BackendName = Literal["transformers", "nnsight", "lens"]


def detect(model) -> tuple[BackendName, nn.Module]:
    """The backend for ``model`` and the transformers model underneath it."""
    module = type(model).__module__
    if module.startswith("nnsight"):
        return "nnsight", model._module
    if module.startswith("transformer_lens"):
        original = getattr(model, "original_model", None)
        if original is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} from transformer_lens wraps no transformers model; "
                "use TransformerBridge.boot_transformers(...) (HookedTransformer has no MoE routers)"
            )
        return "lens", original
    return "transformers", model


@dataclass
class ForwardSpec:
    """One batched forward: what to run and what to record."""

    arch: MoEArchitecture
    layers: list[MoELayer]
    input_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] long, 1 = token
    recorder: Recorder
    attention: AttentionSink | None
    lengths: list[int]  # tokens per row (the mask's row sums, kept on the host)

    def last_positions(self) -> list[int]:
        """Position of each row's last token (right padding), B ints."""
        return [max(n - 1, 0) for n in self.lengths]

    def keep(self, hf: nn.Module) -> dict:
        """``logits_to_keep`` for the forward: only the distinct last positions (the LM head is a large share
        of a forward over many tokens), or nothing if the model's forward lacks the argument."""
        if not forward_accepts(hf, "logits_to_keep"):
            return {}
        return {"logits_to_keep": torch.tensor(sorted(set(self.last_positions())))}

    def next_token_logits(self, logits: torch.Tensor, kept: dict) -> torch.Tensor:
        """[B, V] logits after each row's last token, from the forward's [B, T or U, V] logits."""
        last = self.last_positions()
        if kept:  # row of each position among the kept ones
            row = {p: r for r, p in enumerate(kept["logits_to_keep"].tolist())}
            last = [row[p] for p in last]
        return torch.stack([logits[row, p] for row, p in enumerate(last)])  # B views: cheaper than gather


def run(
    backend: BackendName, model, hf: nn.Module, spec: ForwardSpec, *, remote: bool = False
) -> torch.Tensor:
    """Run the forward pass on ``backend``; fills the spec's collectors and returns the logits after each
    row's last token [B, V]."""
    if remote and backend != "nnsight":
        raise InputError("remote=True needs an nnsight model (nnsight.LanguageModel or NNsight)")
    try:
        return _run(backend, model, hf, spec, remote)
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(spec, exc) from exc
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise _out_of_memory(spec, exc) from exc
        raise


def _out_of_memory(spec: ForwardSpec, exc: BaseException) -> MoEInterpError:
    b, t = spec.input_ids.shape
    options = ["fewer prompts per call", "shorter prompts"]
    if spec.attention is not None:
        options.append("attention=False (or full_attention=False)")
    if spec.recorder.experts:
        options.append("expert_outputs=False")
    return MoEInterpError(
        f"out of memory tracing a batch of {b} x {t} tokens; try {', '.join(options)} ({exc})"
    )


def _run(backend: BackendName, model, hf: nn.Module, spec: ForwardSpec, remote: bool) -> torch.Tensor:
    with ModelPatch() as patch, torch.no_grad():
        patch.eval_mode(hf)
        if backend == "transformers":
            spec.recorder.install(patch)
            spec.recorder.install_extra(patch, spec.arch.extra_router_modules(hf))
            attention = _record_attention(patch, hf, spec)
            kept = spec.keep(hf)
            out = hf(input_ids=spec.input_ids, attention_mask=spec.mask, use_cache=False, **kept)
            _check_attention(spec, attention)
            return spec.next_token_logits(out.logits, kept)
        if backend == "nnsight":
            return _run_nnsight(model, hf, spec, patch, remote)
        return _run_lens(model, hf, spec, patch)


def _record_attention(patch: ModelPatch, hf: nn.Module, spec: ForwardSpec) -> list[tuple[int, nn.Module]]:
    """Install attention recording (if the spec asks for it); returns the attention modules it covers."""
    sink = spec.attention
    if sink is None:
        return []
    device = spec.input_ids.device
    fused = (
        {"span_values": sink.span_masks.transpose(1, 2).to(device), "on_spans": sink.on_spans}
        if sink.spans_only
        else {}
    )
    modules = spec.arch.attention_modules(hf)
    AttentionRecorder(sink.on_probs, **fused).install(patch, modules)
    return modules


def _check_attention(spec: ForwardSpec, modules: list[tuple[int, nn.Module]]) -> None:
    if spec.attention is not None:
        spec.attention.check([number for number, _ in modules])


# ---------------------------------------------------------------------------------------------- nnsight
def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _run_nnsight(model, hf: nn.Module, spec: ForwardSpec, patch: ModelPatch, remote: bool) -> torch.Tensor:
    arch, rec = spec.arch, spec.recorder
    if remote and (spec.attention is not None or rec.experts):
        raise InputError(
            "with remote=True only routing is recorded: pass attention=False and expert_outputs=False"
        )
    attention = []
    if not remote:
        rec.install(patch, routing=False)  # expert outputs only; routing comes from nnsight below
        rec.install_extra(patch, arch.extra_router_modules(hf))
        attention = _record_attention(patch, hf, spec)
    layers_envoy = _envoy(model, arch.layers)
    saved = []
    kept = spec.keep(hf)
    with model.trace(
        input_ids=spec.input_ids, attention_mask=spec.mask, use_cache=False, remote=remote, **kept
    ):
        for layer in spec.layers:
            block = _envoy(layers_envoy[layer.number], arch.block)
            router_out = _envoy(block, arch.router).output.save()
            inputs = _envoy(block, arch.experts).inputs.save() if arch.applied == "experts_input" else None
            saved.append((layer, router_out, inputs))
        logits = model.output.logits.save()
    for layer, router_out, inputs in saved:
        rec.put_router_output(layer.number, router_out)
        if inputs is not None:
            args, kwargs = inputs
            rec.put_experts_input(layer.number, layer.experts, args, kwargs, routing=True, outputs=False)
    _check_attention(spec, attention)
    return spec.next_token_logits(logits, kept)


# ------------------------------------------------------------------------------------------ TransformerLens
def _run_lens(bridge, hf: nn.Module, spec: ForwardSpec, patch: ModelPatch) -> torch.Tensor:
    arch, rec = spec.arch, spec.recorder
    available = set(bridge.hook_dict)
    names = {}
    for layer in spec.layers:
        i = layer.number
        names[i] = (
            f"blocks.{i}.mlp.gate.hook_out",
            f"blocks.{i}.mlp.hook_expert_indices",
            f"blocks.{i}.mlp.hook_expert_weights",
        )
        missing = [n for n in names[i] if n not in available]
        if missing:
            raise UnsupportedModelError(
                f"TransformerLens has no MoE routing hooks for model type {arch.model_type!r} "
                f"(missing {missing[0]}); trace bridge.original_model instead"
            )
    wanted = {n for triple in names.values() for n in triple}
    if spec.attention is not None:
        wanted |= {f"blocks.{i}.attn.hook_pattern" for i, _ in arch.attention_modules(hf)}
    rec.install(patch, routing=False)
    logits, cache = bridge.run_with_cache(
        spec.input_ids, attention_mask=spec.mask, names_filter=lambda name: name in wanted
    )
    for layer in spec.layers:
        logit_name, index_name, weight_name = names[layer.number]
        rec.put("logits", layer.number, cache[logit_name])
        index = cache[index_name].reshape(-1, cache[index_name].shape[-1])
        dense = cache[weight_name].reshape(-1, cache[weight_name].shape[-1])
        rec.put("indices", layer.number, index)
        rec.put(
            "weights",
            layer.number,
            dense.gather(-1, index.long()) if dense.shape[-1] != index.shape[-1] else dense,
        )
    if spec.attention is not None:
        for number, _ in arch.attention_modules(hf):
            spec.attention.on_probs(number, cache[f"blocks.{number}.attn.hook_pattern"])
    return spec.next_token_logits(logits, {})
