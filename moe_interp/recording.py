"""Collectors that turn hook outputs into per-layer tensors over the non-padding tokens.

Backends (:mod:`moe_interp.backends`) feed them; :func:`moe_interp.trace` assembles their contents into an
:class:`~moe_interp.moetrace.MoETrace`.
"""

from __future__ import annotations

import functools
import inspect

import torch

from moe_interp.architectures import MoEArchitecture, MoELayer
from moe_interp.errors import InputError, RecordingError
from moe_interp.hooks import ModelPatch


class Recorder:
    """Forward hooks on routers (and, when asked, experts, shared experts and blocks)."""

    def __init__(self, arch: MoEArchitecture, layers: list[MoELayer], valid: torch.Tensor, experts: bool):
        self.arch, self.layers, self.valid, self.experts = arch, layers, valid, experts
        self.no_padding = bool(valid.all())
        self.data: dict[str, dict[int, torch.Tensor]] = {}

    def put(self, kind: str, layer: int, value: torch.Tensor) -> None:
        """Store ``value`` ([B*T, X] or [B, T, X]) as [N, X] float32 on the CPU, padding dropped."""
        rows = value.detach().reshape(-1, value.shape[-1]).float().cpu()
        if self.no_padding:  # nothing to drop: keep the tensor, but never a view of the model's own buffer
            self.data.setdefault(kind, {})[layer] = (
                rows.clone() if rows.data_ptr() == value.data_ptr() else rows
            )
        else:
            self.data.setdefault(kind, {})[layer] = rows[self.valid]

    def has(self, kind: str) -> bool:
        return bool(self.data.get(kind))

    def stack(self, kind: str) -> torch.Tensor:
        per_layer = self.data.get(kind, {})
        missing = [layer.number for layer in self.layers if layer.number not in per_layer]
        if missing:
            raise InputError(f"{self.arch.model_type}: no {kind} recorded for MoE layers {missing}")
        return torch.stack([per_layer[layer.number] for layer in self.layers])

    def install(self, patch: ModelPatch, *, routing: bool = True) -> None:
        """Register the hooks: routing (router logits, applied choices) and, if asked, expert outputs."""
        for layer in self.layers:
            if routing:
                patch.forward_hook(layer.router, self._router_hook(layer.number))
            if self.arch.applied == "experts_input" and (routing or self.experts):
                patch.pre_hook(layer.experts, self._experts_hook(layer.number, routing), with_kwargs=True)
            if not self.experts:
                continue
            if self.arch.expert_fn is not None:
                patch.pre_hook(layer.block, self._input_hook("block_in", layer.number))
            patch.forward_hook(layer.block, self._output_hook("block", layer.number))
            if layer.shared_expert is not None:
                patch.forward_hook(layer.shared_expert, self._output_hook("shared_raw", layer.number))
            if layer.shared_expert_gate is not None:
                patch.forward_hook(layer.shared_expert_gate, self._output_hook("shared_gate", layer.number))

    def put_router_output(self, number: int, output, kind: str = "logits") -> None:
        """Record the logits from a router's return value (a tensor or a tuple named by ``router_output``)."""
        values = output if isinstance(output, tuple) else (output,)
        self.put(kind, number, values[self.arch.router_output.index("logits")])

    def install_extra(self, patch: ModelPatch, routers: dict[str, list[tuple[int, torch.nn.Module]]]) -> None:
        """Record the logits of the architecture's further routers, as ``extra:<name>``."""
        for name, pairs in routers.items():
            for number, router in pairs:
                patch.forward_hook(router, self._extra_hook(name, number))

    def _extra_hook(self, name: str, number: int):
        def hook(module, args, output):
            self.put_router_output(number, output, kind=f"extra:{name}")

        return hook

    def extra_routing(self, config, top_k: int) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {"layers", "router_logits" [L', N, E], "topk_weights" / "topk_indices" [L', N, k]}."""
        out = {}
        for kind, per_layer in self.data.items():
            if not kind.startswith("extra:"):
                continue
            numbers = sorted(per_layer)
            logits = torch.stack([per_layer[n] for n in numbers])
            pairs = [self.arch.rule.route(per_layer[n], config, top_k) for n in numbers]
            out[kind.removeprefix("extra:")] = {
                "layers": torch.tensor(numbers),
                "router_logits": logits,
                "topk_weights": torch.stack([w for w, _ in pairs]),
                "topk_indices": torch.stack([i for _, i in pairs]),
            }
        return out

    def put_experts_input(
        self, number: int, module, args: tuple, kwargs: dict, *, routing: bool = True, outputs: bool = True
    ) -> None:
        """Record the experts chosen and weights applied, from ``experts(hidden, indices, weights)``'s
        arguments, and (with expert outputs on) each chosen expert's output [B*T, k, d].
        """
        if len(args) >= 3 and not kwargs:  # the usual positional call: no signature binding needed
            hidden, index, weights = args[:3]
        else:
            bound = inspect.signature(_forward_of(module)).bind(*args, **kwargs)
            hidden, index, weights = list(bound.arguments.values())[:3]
        if routing:
            self.put("indices", number, index)
            self.put("weights", number, weights)
        if self.experts and outputs:
            # one call over every (token, slot) pair, each with weight 1: [B*T*k, d] -> [B*T, k, d]
            d, k = hidden.shape[-1], index.shape[-1]
            flat = hidden.reshape(-1, d).repeat_interleave(k, dim=0)
            ones = torch.ones_like(weights.reshape(-1, 1))
            each = _forward_of(module)(flat, index.reshape(-1, 1), ones).reshape(-1, k, d)
            self.data.setdefault("expert", {})[number] = each.detach().float().cpu()[self.valid]

    def _router_hook(self, number: int):
        def hook(module, args, output):
            self.put_router_output(number, output)

        return hook

    def _output_hook(self, kind: str, number: int):
        def hook(module, args, output):
            self.put(kind, number, output[0] if isinstance(output, tuple) else output)

        return hook

    def _input_hook(self, kind: str, number: int):
        def hook(module, args):
            self.put(kind, number, args[0])

        return hook

    def computed_experts(
        self, weights: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[L, N, k, d] expert outputs and [L, N, d] constant contributions from ``arch.expert_fn``."""
        outs, consts = [], []
        with torch.no_grad():
            for li, layer in enumerate(self.layers):
                hidden = self.data["block_in"][layer.number]
                param = next(layer.block.parameters())
                out, const = self.arch.expert_fn(
                    layer, hidden.to(param), indices[li].to(param.device), weights[li].to(param)
                )
                outs.append(out.float().cpu())
                consts.append(None if const is None else const.float().cpu())
        return torch.stack(outs), (None if consts[0] is None else torch.stack(consts))

    def shared(self) -> torch.Tensor | None:
        """[L, N, d]: shared-expert contribution (times sigmoid of its gate where there is one)."""
        if not self.has("shared_raw"):
            return None
        raw = self.stack("shared_raw")
        return torch.sigmoid(self.stack("shared_gate")) * raw if self.has("shared_gate") else raw

    def _experts_hook(self, number: int, routing: bool):
        def hook(module, args, kwargs):
            self.put_experts_input(number, module, args, kwargs, routing=routing)

        return hook

    def applied_routing(self, config, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, N, k] weights and indices the model applied (read from the experts' inputs or recomputed)."""
        if self.arch.applied == "experts_input":
            return self.stack("weights"), self.stack("indices").long()
        pairs = [
            self.arch.rule.route(self.data["logits"][layer.number], config, top_k, layer.router)
            for layer in self.layers
        ]
        return torch.stack([w for w, _ in pairs]), torch.stack([i for _, i in pairs])


def _forward_of(module):
    """The experts' forward to call for per-expert outputs: ``module.forward`` (it keeps accelerate's
    device hooks), unless a wrapper such as nnsight's replaced it with a function whose signature starts
    with ``self`` and that re-enters the hooks when called: then the class's own forward, bound.
    """
    forward = module.forward
    params = list(inspect.signature(forward).parameters)
    if params and params[0] == "self":
        return functools.partial(type(module).forward, module)
    return forward


#: from this many keys on, span masses are sums over each span's own key columns (B x S small ops that read
#: only those columns: 2.5-6x faster than one bmm at 256 keys); below it, one bmm (fewer, cheaper calls)
SLICED_FROM_KEYS = 128


def _span_columns_per_prompt(span_masks: torch.Tensor) -> list[tuple[int, int, slice | torch.Tensor]]:
    """(prompt, span, columns) for every non-empty span of ``span_masks`` [B, S, T]: a slice where the span
    is one run of tokens, else the index tensor of its tokens."""
    plan = []
    for b, s in (span_masks.sum(-1) > 0).nonzero().tolist():
        where = span_masks[b, s].nonzero().squeeze(-1)
        lo, hi = int(where[0]), int(where[-1]) + 1
        plan.append((b, s, slice(lo, hi) if hi - lo == len(where) else where))
    return plan


class AttentionSink:
    """Turns per-layer attention probabilities into span masses (and full maps when asked)."""

    def __init__(self, span_masks: torch.Tensor, mask: torch.Tensor, keep_maps: bool):
        """``span_masks`` [B, S, T] float (1 inside span s), ``mask`` [B, T] bool (non-padding)."""
        self.span_masks, self.mask, self.keep_maps = span_masks, mask, keep_maps  # [B, S, T], [B, T]
        self.layers: list[int] = []
        self.spans: list[torch.Tensor] = []
        self.full: list[torch.Tensor] = []
        self._columns: torch.Tensor | None = None
        self._no_padding = bool(mask.all())
        self._plan: list[tuple[int, int, slice | torch.Tensor]] | None = None  # built on first use

    def _tokens(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the non-padding positions, in order (a reshape when there is no padding;
        boolean indexing costs more than the whole reduction for one short prompt)."""
        if self._no_padding:
            return per_position.reshape(-1, *per_position.shape[2:])
        return per_position[self.mask]

    def on_probs(self, layer: int, probs: torch.Tensor) -> None:
        """Take one layer's attention probabilities [B, H, T, T]."""
        probs = probs.float().cpu()  # [B, H, T, T]
        self.layers.append(layer)
        if self.span_masks.shape[1]:
            b, h, q, k = probs.shape
            if k >= SLICED_FROM_KEYS and k == self.span_masks.shape[-1]:
                mass = probs.new_zeros(b, h, q, self.span_masks.shape[1])
                if self._plan is None:
                    self._plan = _span_columns_per_prompt(self.span_masks)
                for row, span, columns in self._plan:
                    keys = (
                        probs[row, :, :, columns]
                        if isinstance(columns, slice)
                        else probs[row].index_select(-1, columns)
                    )
                    mass[row, :, :, span] = keys.sum(-1)
            else:  # one bmm [B, H*T, K] @ [B, K, S]: ~3x faster than the einsum on CPU
                mass = torch.bmm(probs.reshape(b, h * q, k), self._span_columns(k)).reshape(b, h, q, -1)
            self.spans.append(self._tokens(mass.transpose(1, 2)))  # [N, H, S]
        if self.keep_maps:
            self.full.append(probs)

    def _span_columns(self, k_len: int) -> torch.Tensor:
        """[B, K, S] span indicators as matmul columns (built once per trace)."""
        if self._columns is None or self._columns.shape[1] != k_len:
            self._columns = self.span_masks[:, :, :k_len].transpose(1, 2).contiguous()
        return self._columns

    @property
    def spans_only(self) -> bool:
        """Only span masses are wanted (no full maps): attention can report them directly."""
        return not self.keep_maps and self.span_masks.shape[1] > 0

    def on_spans(self, layer: int, mass: torch.Tensor) -> None:
        """Take one layer's attention mass per span [B, H, T, S]."""
        self.layers.append(layer)
        self.spans.append(self._tokens(mass.float().cpu().transpose(1, 2)))  # [N, H, S]

    def check(self, expected: list[int]) -> None:
        """Raise if some attention layers never reported (their module bypassed the attention interface)."""
        missing = sorted(set(expected) - set(self.layers))
        if missing:
            raise RecordingError(
                f"attention was not recorded for layers {missing}: their attention modules did not call "
                "transformers' attention interface (is the model patched by another library, e.g. a "
                "TransformerLens bridge built on it?). Trace the wrapper itself, or pass attention=False."
            )

    def stack_spans(self) -> torch.Tensor:
        return torch.stack(self.spans)

    def maps(self, lengths: list[int]) -> list[torch.Tensor]:
        """Per prompt [A, H, T_i, T_i], padding cut off (``lengths``: tokens per prompt)."""
        full = torch.stack(self.full)  # [A, B, H, T, T]
        return [full[:, b, :, :n, :n].clone() for b, n in enumerate(lengths)]
