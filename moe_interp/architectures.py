"""Where MoE models differ, described as data.

Each supported ``model_type`` has one :class:`MoEArchitecture` entry in a registry. Everything else in the
package (tracing, masking, attribution) reads these entries and contains no per-model branches.

Register a further architecture (for example a ``trust_remote_code`` model) in a few lines::

    from moe_interp import MoEArchitecture, register_architecture

    register_architecture(MoEArchitecture(
        model_type="my_moe",          # config.model_type of the model
        layers="model.layers",        # the decoder-layer ModuleList, from the top-level model
        block="mlp",                  # the MoE block inside a decoder layer
        router="gate",                # the router inside the block; its output holds the logits
        experts="experts",            # fused experts: forward(hidden [T, d], indices [T, k], weights [T, k])
        rule=RoutingRule(score="softmax", renormalize="norm_topk_prob"),  # see moe_interp.routing
    ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moe_interp.errors import UnsupportedModelError
from moe_interp.routing import RoutingRule, config_value


@dataclass(frozen=True)
class MoEArchitecture:
    """Declarative description of one MoE architecture.

    Paths are dotted attribute paths. ``layers`` starts at the top-level model (the ``*ForCausalLM``); the
    other paths start at a decoder layer (``block``, ``attention``) or at the MoE block (``router``,
    ``experts``, ``shared_expert``, ``shared_expert_gate``). A decoder layer whose ``block.router`` does not
    exist is dense and keeps its number: MoE layers are found by structure, not by config arithmetic.

    Attributes:
        router_output: names of the router's return values in order; ``"logits"`` is required.
        rule: the selection rule (:class:`moe_interp.routing.RoutingRule`), reproduced exactly.
        applied: where the experts chosen and weights applied are read: ``"experts_input"`` (the
            arguments of ``experts(hidden, indices, weights)``, i.e. exactly what the model used) or
            ``"rule"`` (recomputed from the logits with ``rule``, for models that pass no such arguments).
        shared_expert_gate: a ``Linear -> 1`` whose sigmoid scales the shared expert's output.
        expert_outputs: whether per-expert outputs can be computed (by calling
            ``experts.forward(hidden, one_index, ones)``, or ``expert_fn``).
        expert_fn: for experts not called as ``experts(hidden, indices, weights)``:
            ``expert_fn(layer, hidden [N, d], indices [N, k], weights [N, k])`` returns the chosen experts'
            outputs [N, k, d] and the block's constant contribution [N, d] (or None), from the block input.
        weights_scale_input: the routing weight scales the expert's input, not its output (Llama-4); the
            recorded expert outputs then already include it.
        extra_routers: further routers per decoder layer, as (name, path from the decoder layer), recorded
            with the same ``router_output`` layout and ``rule`` (JetMoE's attention experts).
        expert_weights: further modules of the MoE block (paths from it) whose parameters are per-expert
            weights, trained with ``experts`` by CEFT (JetMoE's ``output_linear``).
        extra_attention: further token-mixing modules of a decoder layer (paths from it) that are not
            softmax attention, e.g. Qwen3-Next's ``linear_attn``: trained by the attention-only control,
            never recorded as attention probabilities.
    """

    model_type: str
    layers: str = "model.layers"
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    attention: str = "self_attn"
    rule: RoutingRule = RoutingRule()
    router_output: tuple[str, ...] = ("logits", "weights", "indices")
    applied: Literal["experts_input", "rule"] = "experts_input"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    expert_outputs: bool = True
    expert_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    weights_scale_input: bool = False
    extra_routers: tuple[tuple[str, str], ...] = ()
    expert_weights: tuple[str, ...] = ()
    extra_attention: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "top_k", "moe_top_k")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities over all experts, float32: sigmoid for sigmoid routers, else softmax.

        ``logits``: [..., E] -> [..., E].
        """
        if self.rule.score == "sigmoid":
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=-1)

    def num_experts(self, config) -> int:
        return int(_first_attr(config, self.num_experts_keys, self.model_type, "expert count"))

    def top_k(self, config) -> int:
        return int(_first_attr(config, self.top_k_keys, self.model_type, "top-k"))

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """The MoE layers of ``model`` in order, each with its modules resolved."""
        layers = get_path(model, self.layers, self.model_type)
        found = []
        for number, layer in enumerate(layers):
            block = get_path(layer, self.block, self.model_type, missing_ok=True)
            router = (
                get_path(block, self.router, self.model_type, missing_ok=True) if block is not None else None
            )
            if router is None:
                continue
            found.append(
                MoELayer(
                    number=number,
                    block=block,
                    router=router,
                    experts=get_path(block, self.experts, self.model_type),
                    attention=get_path(layer, self.attention, self.model_type, missing_ok=True),
                    shared_expert=_optional(block, self.shared_expert, self.model_type),
                    shared_expert_gate=_optional(block, self.shared_expert_gate, self.model_type),
                )
            )
        if not found:
            raise UnsupportedModelError(
                f"model of type {self.model_type!r} has no MoE layer at "
                f"{self.layers}[i].{self.block}.{self.router}"
            )
        return found

    def extra_router_modules(self, model: nn.Module) -> dict[str, list[tuple[int, nn.Module]]]:
        """name -> (decoder-layer number, router) for each of ``extra_routers``."""
        layers = get_path(model, self.layers, self.model_type)
        found: dict[str, list[tuple[int, nn.Module]]] = {}
        for name, path in self.extra_routers:
            found[name] = [
                (number, router)
                for number, layer in enumerate(layers)
                if (router := get_path(layer, path, self.model_type, missing_ok=True)) is not None
            ]
        return found

    def expert_modules(self, layer: MoELayer) -> list[nn.Module]:
        """Every module of an MoE layer holding per-expert weights: ``experts`` and ``expert_weights``."""
        return [layer.experts, *(get_path(layer.block, p, self.model_type) for p in self.expert_weights)]

    def token_mixers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(decoder-layer number, module) for every attention module and every ``extra_attention`` one."""
        out = list(self.attention_modules(model))
        for number, layer in enumerate(get_path(model, self.layers, self.model_type)):
            for path in self.extra_attention:
                module = get_path(layer, path, self.model_type, missing_ok=True)
                if module is not None:
                    out.append((number, module))
        return sorted(out, key=lambda pair: pair[0])

    def attention_modules(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(decoder-layer number, attention module) for every decoder layer that has one."""
        out = []
        for number, layer in enumerate(get_path(model, self.layers, self.model_type)):
            attn = get_path(layer, self.attention, self.model_type, missing_ok=True)
            if attn is not None:
                out.append((number, attn))
        return out


@dataclass(frozen=True)
class MoELayer:
    """The resolved modules of one MoE layer; ``number`` is the model's own decoder-layer index."""

    number: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    attention: nn.Module | None
    shared_expert: nn.Module | None
    shared_expert_gate: nn.Module | None


_REGISTRY: dict[str, MoEArchitecture] = {}


def register_architecture(arch: MoEArchitecture, *, overwrite: bool = False) -> MoEArchitecture:
    """Add ``arch`` to the registry, keyed by its ``model_type``; returns it."""
    if arch.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"architecture {arch.model_type!r} is already registered; pass overwrite=True")
    if "logits" not in arch.router_output:
        raise ValueError(f"{arch.model_type}: router_output must name 'logits', got {arch.router_output}")
    _REGISTRY[arch.model_type] = arch
    return arch


def supported_architectures() -> list[str]:
    """The registered model types, sorted."""
    return sorted(_REGISTRY)


def get_architecture(model_or_config) -> MoEArchitecture:
    """The registered description for a model (or its config); a clear error if there is none."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model_or_config).__name__} has no config.model_type; pass a transformers model. "
            f"Supported MoE types: {', '.join(supported_architectures())}"
        )
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported MoE architecture. "
            f"Supported: {', '.join(supported_architectures())}. "
            "Register another with moe_interp.register_architecture(...)."
        ) from None


def get_path(root: nn.Module, path: str, model_type: str, *, missing_ok: bool = False):
    """Resolve a dotted attribute path; numeric parts index into ModuleLists."""
    obj = root
    for part in path.split("."):
        modules = getattr(obj, "_modules", None)  # submodules by name: nn.Module.__getattr__ costs more
        if modules is not None and part in modules:
            nxt = modules[part]
        else:
            nxt = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if nxt is None:
            if missing_ok:
                return None
            raise UnsupportedModelError(
                f"{model_type}: expected a module at {path!r}, found nothing at {part!r} "
                f"in {type(obj).__name__}; is the architecture description right?"
            )
        obj = nxt
    return obj


def _optional(block: nn.Module, path: str | None, model_type: str):
    return None if path is None else get_path(block, path, model_type, missing_ok=True)


def _first_attr(config, keys: tuple[str, ...], model_type: str, what: str):
    for key in keys:
        try:
            value = config_value(config, key)
        except (AttributeError, KeyError):
            continue
        if value is not None:
            return value
    raise UnsupportedModelError(f"{model_type}: config has none of {keys} for the {what}")


def _llama4_experts(layer, hidden, indices, weights):
    """Llama-4: expert e on the weight-scaled input; gate_up_proj [E, d, 2I], down_proj [E, I, d]."""
    ex = layer.experts
    x = hidden[:, None, :] * weights[..., None]  # [N, k, d]
    gate, up = torch.einsum("nkd,nkdf->nkf", x, ex.gate_up_proj[indices]).chunk(2, dim=-1)
    return torch.einsum("nkf,nkfd->nkd", up * ex.act_fn(gate), ex.down_proj[indices]), None


def _jetmoe_experts(layer, hidden, indices, weights):
    """JetMoE: input_linear.weight [E, 2H, d], output_linear.weight [E, d, H]; the block adds a bias."""
    block = layer.block
    h = torch.einsum("nd,nkfd->nkf", hidden, block.input_linear.weight[indices])
    a, b = h.chunk(2, dim=-1)
    out = torch.einsum("nkf,nkdf->nkd", block.activation(a) * b, block.output_linear.weight[indices])
    return out, block.bias.expand(hidden.shape[0], -1)


def _sparsemixer(logits: torch.Tensor, *, router, config, top_k: int):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer(logits, jitter_eps=config.router_jitter_noise, training=False, top_k=top_k)


_SOFTMAX_NORM = RoutingRule(renormalize="norm_topk_prob")
_TOPK_SOFTMAX = RoutingRule(score="logits", weights="softmax_topk")

for _arch in (
    MoEArchitecture("olmoe", rule=_SOFTMAX_NORM),
    MoEArchitecture("mixtral", rule=RoutingRule(renormalize=True)),
    MoEArchitecture(
        "qwen2_moe",
        rule=_SOFTMAX_NORM,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    MoEArchitecture("qwen3_moe", rule=_SOFTMAX_NORM),
    MoEArchitecture(
        "qwen3_next",
        rule=_SOFTMAX_NORM,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
        extra_attention=("linear_attn",),
    ),
    MoEArchitecture(
        "deepseek_v2",
        rule=RoutingRule(
            group_score="max",
            group_when=("topk_method", "group_limited_greedy"),
            scaling="routed_scaling_factor",
        ),
        shared_expert="shared_experts",
    ),
    MoEArchitecture(
        "deepseek_v3",
        rule=RoutingRule(
            score="sigmoid",
            choice_bias="e_score_correction_bias",
            group_score="top2_sum",
            renormalize="norm_topk_prob",
            renormalize_eps=1e-20,
            scaling="routed_scaling_factor",
        ),
        shared_expert="shared_experts",
    ),
    MoEArchitecture("gpt_oss", router="router", rule=_TOPK_SOFTMAX),
    MoEArchitecture("granitemoe", block="block_sparse_moe", router="router", rule=_TOPK_SOFTMAX),
    MoEArchitecture("phimoe", router="router", rule=RoutingRule(custom=_sparsemixer)),
    MoEArchitecture(
        "dbrx",
        layers="transformer.blocks",
        block="ffn",
        router="router",
        attention="norm_attn_norm.attn",
        router_output=("logits",),
        rule=RoutingRule(
            renormalize="ffn_config.moe_normalize_expert_weights",
            renormalize_p="ffn_config.moe_normalize_expert_weights",
        ),
        num_experts_keys=("ffn_config.moe_num_experts",),
        top_k_keys=("ffn_config.moe_top_k",),
    ),
    MoEArchitecture(
        "llama4_text",
        block="feed_forward",
        router="router",
        router_output=("scores", "logits"),
        rule=RoutingRule(score="logits", weights="sigmoid_topk"),
        applied="rule",
        shared_expert="shared_expert",
        expert_fn=_llama4_experts,
        weights_scale_input=True,
    ),
    MoEArchitecture(
        "jetmoe",
        router="router",
        experts="input_linear",  # JetMoE's experts are input_linear / output_linear with their own API
        expert_weights=("output_linear",),
        attention="self_attention",
        router_output=("sorted_index", "token_index", "gates", "expert_size", "logits"),
        rule=_TOPK_SOFTMAX,
        applied="rule",
        expert_fn=_jetmoe_experts,
        extra_routers=(("attention", "self_attention.experts.router"),),
    ),
):
    register_architecture(_arch)
