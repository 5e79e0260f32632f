"""The trace object: what one forward pass of an MoE model did, as plain tensors.

Tokens of all prompts are flattened into one ``token`` axis of length N (padding is never stored), in the
same order as transformers' ``output_router_logits``. ``example[n]`` and ``position[n]`` say which prompt a
token belongs to and where it sits in it.
"""

from __future__ import annotations

import json
import numbers
import operator
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from moe_interp.atomic import atomic_write
from moe_interp.errors import InputError
from moe_interp.routing import GroupLimit, near_ties

Span = tuple[int, int]

_SCORE_FIELDS = ("router_probs", "router_logits", "selection_scores")

_TENSOR_FIELDS = (
    "token_ids",
    "example",
    "position",
    "router_logits",
    "router_probs",
    "topk_indices",
    "topk_weights",
    "next_token_logits",
    "selection_scores",
    "attn_to_spans",
    "expert_outputs",
    "shared_outputs",
    "block_outputs",
)


@dataclass(repr=False)
class MoETrace:
    """Routing, attention and outputs recorded from one (batched) forward pass.

    Shapes (L = MoE layers, A = attention layers, N = non-padding tokens of all prompts, E = experts,
    k = experts per token, H = heads, S = span names, B = prompts, V = vocabulary, d = hidden size):

    - ``router_logits`` [L, N, E] float32: the router's raw logits.
    - ``router_probs`` [L, N, E] float32: probabilities over all experts (softmax or sigmoid, per model).
    - ``topk_indices`` [L, N, k] int64 and ``topk_weights`` [L, N, k] float32: the experts the model used
      and the weights it actually applied to their outputs.
    - ``selection_scores`` [L, N, E] float32 or None: scores used for choosing where they differ from
      ``router_probs`` (DeepSeek-V3 adds a bias for choosing only).
    - ``near_tie`` [L, N] bool: choices that could flip in low precision: the k-th and (k+1)-th selection
      scores (the field named by ``near_tie_scores``) are within ``near_tie_tol``; under a group limit
      (``near_tie_groups``: n_group, topk_group, group score; DeepSeek) among the eligible experts, or the
      last chosen and the next group are. Computed when read (again after ``near_tie_tol`` changes).
    - ``next_token_logits`` [B, V] float32: logits at each prompt's last token (from a forward that computes
      only those positions' logits; equal to a full forward's up to float rounding, ~1e-7).
    - ``attn_to_spans`` [A, N, H, S] float32 or None: attention mass each query token pays to each span.
    - ``attention_maps``: per prompt [A, H, T_i, T_i] float32, only with ``full_attention=True``.
    - ``expert_outputs`` [L, N, k, d], ``shared_outputs`` [L, N, d] (None without shared experts) and
      ``block_outputs`` [L, N, d]: only with ``expert_outputs=True``; sum_k w * expert + shared = block
      (where ``weights_scale_input`` (Llama-4) the weight is already inside: sum_k expert + shared = block;
      ``shared_outputs`` also holds a block's constant bias, as JetMoE's).
    - ``spans``: per prompt, span name -> list of [start, end) token positions within that prompt.
    - ``extra_routing``: further routers (JetMoE's attention experts) by name -> ``layers`` [L'],
      ``router_logits`` [L', N, E], ``topk_indices`` / ``topk_weights`` [L', N, k].
    """

    model_type: str
    layers: list[int]
    num_experts: int
    top_k: int
    prompts: list[str]
    tokens: list[str]
    token_ids: torch.Tensor
    example: torch.Tensor
    position: torch.Tensor
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor
    next_token_logits: torch.Tensor
    spans: list[dict[str, list[Span]]]
    span_names: tuple[str, ...] = ()
    selection_scores: torch.Tensor | None = None
    near_tie_tol: float = 1e-3
    near_tie_scores: str = "router_probs"
    near_tie_groups: tuple[int, int, str] | None = None
    attention_layers: list[int] = field(default_factory=list)
    attn_to_spans: torch.Tensor | None = None
    attention_maps: list[torch.Tensor] | None = None
    extra_routing: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    weights_scale_input: bool = False
    expert_outputs: torch.Tensor | None = None
    shared_outputs: torch.Tensor | None = None
    block_outputs: torch.Tensor | None = None

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        """One line per recorded tensor (name and shape), not the values: traces are large."""
        shapes = [
            f"{name}={list(value.shape)}"
            for name in _TENSOR_FIELDS
            if isinstance(value := getattr(self, name), torch.Tensor)
        ]
        if self.attention_maps is not None:
            shapes.append(f"attention_maps=[{len(self.attention_maps)} x [A, H, T_i, T_i]]")
        return (
            f"MoETrace({self.model_type}, {len(self)} prompt(s), {len(self.tokens)} tokens, MoE layers "
            f"{self.layers}, {self.num_experts} experts, top-{self.top_k}, spans {list(self.span_names)};\n  "
            + ",\n  ".join(shapes)
            + ")"
        )

    def __post_init__(self) -> None:
        if self.near_tie_scores not in _SCORE_FIELDS or getattr(self, self.near_tie_scores) is None:
            raise InputError(
                f"near_tie_scores must name a recorded score field ({', '.join(_SCORE_FIELDS)}), "
                f"got {self.near_tie_scores!r}"
            )
        if self.near_tie_groups is not None:
            self.near_tie_groups = tuple(self.near_tie_groups)

    @property
    def near_tie(self) -> torch.Tensor:
        """[L, N] bool: choices that could flip in bf16 / fp16 (see the class docstring)."""
        key = (self.near_tie_tol, self.near_tie_scores, self.near_tie_groups)
        cached = self.__dict__.get("_near_tie")
        if cached is None or cached[0] != key:
            groups = GroupLimit(*self.near_tie_groups) if self.near_tie_groups is not None else None
            flags = near_ties(getattr(self, self.near_tie_scores), self.top_k, self.near_tie_tol, groups)
            cached = self.__dict__["_near_tie"] = (key, flags)
        return cached[1]

    # ------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> MoETrace:
        """The trace of prompt ``i`` alone (negative indices count from the end; ``for t in trace`` works):
        every token-axis tensor sliced to its tokens, ``example`` all 0, ``next_token_logits`` [1, V]."""
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)  # ints, numpy integers and 0-d integer tensors
        except TypeError:
            raise TypeError(f"a trace is indexed by prompt number (int), got {type(i).__name__}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt index {i} out of range for a trace of {len(self)} prompts")
        i %= len(self)
        sl = self.token_slice(i)
        token_axis = {  # the token axis of each tensor field
            "token_ids": 0,
            "example": 0,
            "position": 0,
            "router_logits": 1,
            "router_probs": 1,
            "topk_indices": 1,
            "topk_weights": 1,
            "selection_scores": 1,
            "attn_to_spans": 1,
            "expert_outputs": 1,
            "shared_outputs": 1,
            "block_outputs": 1,
        }
        sliced = {
            name: None
            if getattr(self, name) is None
            else getattr(self, name).narrow(axis, sl.start, sl.stop - sl.start)
            for name, axis in token_axis.items()
        }
        sliced["example"] = torch.zeros_like(sliced["example"])
        extra = {
            name: {k: v if k == "layers" else v[:, sl] for k, v in parts.items()}
            for name, parts in self.extra_routing.items()
        }
        kept = {f.name: getattr(self, f.name) for f in fields(self)}
        kept.update(
            sliced,
            prompts=[self.prompts[i]],
            tokens=self.tokens[sl],
            spans=[self.spans[i]],
            next_token_logits=self.next_token_logits[i : i + 1],
            attention_maps=None if self.attention_maps is None else [self.attention_maps[i]],
            extra_routing=extra,
        )
        return MoETrace(**kept)

    def token_slice(self, i: int) -> slice:
        """The flat-token range of prompt ``i``."""
        if not isinstance(i, bool) and isinstance(i, numbers.Integral):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.prompts):
            raise InputError(f"prompt index {i} out of range for a trace of {len(self.prompts)} prompts")
        idx = torch.nonzero(self.example == i).flatten()
        return slice(int(idx[0]), int(idx[-1]) + 1)

    def layer_index(self, layer: int) -> int:
        """Position on the L axis of the model's decoder layer ``layer``."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} is not an MoE layer of this trace; MoE layers: {self.layers}")
        return self.layers.index(layer)

    def span_mask(self, name: str) -> torch.Tensor:
        """[N] bool: tokens inside span ``name``: a recorded span (``"context"``, ``"answer"``: the answer's
        occurrences in the context, or in the prompt where none was given), ``"all"`` (every token),
        ``"last"`` (each prompt's last token). :func:`~moe_interp.routerlens.count_selections`'s ``"prompt"``,
        ``"context"``, ``"context_answer"`` (answer occurrences of the prompts that have a context) and
        ``"last"`` mean the same here; its ``"answer"`` and ``"all"`` include an answer appended after the
        prompt, which a trace of the prompt does not have."""
        if name in ("all", "prompt"):
            return torch.ones(len(self.tokens), dtype=torch.bool)
        if name == "last":
            mask = torch.zeros(len(self.tokens), dtype=torch.bool)
            mask[[self.token_slice(i).stop - 1 for i in range(len(self))]] = True
            return mask
        valid = {"all", "prompt", "last", *self.span_names}
        if "context" in self.span_names and "answer" in self.span_names:
            valid.add("context_answer")
        if name not in valid:
            raise InputError(f"unknown span {name!r}; this trace has: {sorted(valid)}")
        if name == "context_answer":  # answer occurrences of the prompts that have a context
            return self.span_mask("answer") & self._prompts_with("context")
        mask = torch.zeros(len(self.tokens), dtype=torch.bool)
        for i, spans in enumerate(self.spans):
            offset = self.token_slice(i).start
            for start, end in spans.get(name, []):
                mask[offset + start : offset + end] = True
        return mask

    def _prompts_with(self, name: str) -> torch.Tensor:
        """[N] bool: tokens of the prompts that have a span ``name``."""
        has = torch.tensor([bool(spans.get(name)) for spans in self.spans])
        return has[self.example]

    def span_labels(self) -> list[str]:
        """[N] the innermost span containing each token ("answer" inside "context"), or ""."""
        labels = [""] * len(self.tokens)
        for name in self.span_names:  # later names are nested inside earlier ones
            for n in torch.nonzero(self.span_mask(name)).flatten().tolist():
                labels[n] = name
        return labels

    # ------------------------------------------------------------------ analyses
    def selection_counts(self, span: str = "all") -> torch.Tensor:
        """[L, E] int64: how often each expert was selected over the tokens of ``span``."""
        mask = self.span_mask(span)
        chosen = self.topk_indices[:, mask]  # [L, n, k]
        counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64)
        return counts.scatter_add_(1, chosen.flatten(1), torch.ones_like(chosen.flatten(1)))

    def routing_frame(self) -> pd.DataFrame:
        """Tidy frame, one row per (layer, token, expert).

        Columns: example, layer, position, token, expert, logit, prob, rank (0 = highest logit), selected,
        weight (applied weight, 0 if not selected), span (see :meth:`span_labels`).
        """
        n_layers, n_tokens, n_experts = self.router_logits.shape
        rank = self.router_logits.argsort(dim=-1, descending=True).argsort(dim=-1)
        weight = torch.zeros_like(self.router_logits).scatter_(-1, self.topk_indices, self.topk_weights)
        selected = torch.zeros_like(self.router_logits, dtype=torch.bool).scatter_(
            -1, self.topk_indices, torch.ones_like(self.topk_indices, dtype=torch.bool)
        )
        span_of = self.span_labels()
        tok = torch.arange(n_tokens).repeat_interleave(n_experts).repeat(n_layers)
        return pd.DataFrame(
            {
                "example": self.example[tok].numpy(),
                "layer": torch.tensor(self.layers).repeat_interleave(n_tokens * n_experts).numpy(),
                "position": self.position[tok].numpy(),
                "token": [self.tokens[i] for i in tok.tolist()],
                "expert": torch.arange(n_experts).repeat(n_layers * n_tokens).numpy(),
                "logit": self.router_logits.flatten().numpy(),
                "prob": self.router_probs.flatten().numpy(),
                "rank": rank.flatten().numpy(),
                "selected": selected.flatten().numpy(),
                "weight": weight.flatten().numpy(),
                "span": [span_of[i] for i in tok.tolist()],
            }
        )

    # ------------------------------------------------------------------ figures
    def plot_routing(self, example: int = 0, **kwargs):
        """Per-token routing of one prompt; see :func:`moe_interp.plotting.plot_token_routing`."""
        from moe_interp.plotting import plot_token_routing

        return plot_token_routing(self, example=example, **kwargs)

    def plot_selection(self, span: str = "all", **kwargs):
        """Layer x expert selection frequency; see :func:`moe_interp.plotting.plot_selection_heatmap`."""
        from moe_interp.plotting import plot_selection_heatmap

        return plot_selection_heatmap(self.selection_counts(span), layers=self.layers, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a folder, ``~`` expanded): tensors.safetensors + meta.json, each replaced
        atomically."""
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n).contiguous() for n in _TENSOR_FIELDS if getattr(self, n) is not None}
        for i, amap in enumerate(self.attention_maps or []):
            tensors[f"attention_maps.{i}"] = amap.contiguous()
        for name, parts in self.extra_routing.items():
            for key, value in parts.items():
                tensors[f"extra_routing.{name}.{key}"] = value.contiguous()
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSOR_FIELDS}
        meta.pop("attention_maps")
        meta.pop("extra_routing")
        atomic_write(path / "tensors.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write(path / "meta.json", lambda p: p.write_text(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoETrace:
        """Read a trace written by :meth:`save`."""
        path = Path(path).expanduser()
        for name in ("tensors.safetensors", "meta.json"):
            if not (path / name).is_file():
                raise InputError(f"{path} is not a saved MoETrace: {name} is missing")
        try:
            meta = json.loads((path / "meta.json").read_text())
            tensors = load_file(str(path / "tensors.safetensors"))
        except Exception as exc:  # noqa: BLE001 - json, unicode and safetensors errors alike
            raise InputError(f"{path} holds a damaged MoETrace ({type(exc).__name__}: {exc})") from exc
        maps = sorted(
            (k for k in tensors if k.startswith("attention_maps.")), key=lambda k: int(k.split(".")[1])
        )
        meta["spans"] = [{k: [tuple(s) for s in v] for k, v in d.items()} for d in meta["spans"]]
        meta["span_names"] = tuple(meta["span_names"])
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("extra_routing."):
                _, name, part = key.split(".", 2)
                extra.setdefault(name, {})[part] = value
        stored_flags = tensors.get("near_tie")  # saved by versions that computed them eagerly
        if stored_flags is not None and "near_tie_scores" not in meta:
            meta["near_tie_scores"] = "selection_scores" if "selection_scores" in tensors else "router_probs"
        trace = cls(
            **meta,
            **{n: tensors.get(n) for n in _TENSOR_FIELDS},
            attention_maps=[tensors[k] for k in maps] or None,
            extra_routing=extra,
        )
        if stored_flags is not None:  # keep the flags as saved (until near_tie_tol is changed)
            key = (trace.near_tie_tol, trace.near_tie_scores, trace.near_tie_groups)
            trace.__dict__["_near_tie"] = (key, stored_flags.bool())
        return trace
