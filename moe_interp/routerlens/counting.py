"""Selection statistics: how often each expert of each MoE layer is selected over a data set.

Examples are streamed in chunks (memory does not grow with the data set), batched with right padding
(padding is never counted), and routed through the model with light hooks: the expert indices the model
actually used are read from the experts' inputs (or recomputed with the architecture's rule from the
router's logits where the model passes none), then binned per span. Only the last position's logits are
computed, so counting costs about one plain forward pass.

Spans (token positions of each example):

- ``"prompt"``: every prompt token; ``"context"``: the context inside the prompt;
- ``"context_answer"``: occurrences of a gold answer inside the context;
- ``"last"``: the prompt's last token (whose routing produces the first answer token);
- ``"answer"``: the gold answer ``answers[0]`` appended after the prompt (teacher forcing);
- ``"all"``: prompt + appended answer.

Data-parallel: under ``accelerate launch`` / ``torchrun`` (or any initialised ``torch.distributed`` group)
each process counts the examples ``i`` with ``i % world_size == rank`` and the integer counts are summed
across processes (``all_reduce``), so every process returns exactly the single-process counts. On CPU-only
machines launch with ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N script.py``:
accelerate 1.x's ``--cpu --num_processes N`` starts N processes only through ``mpirun`` (with a hostfile)
and otherwise runs a single process.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_interp.architectures import MoEArchitecture, MoELayer, get_architecture
from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.evaluation import split_continuation, write_json_atomic
from moe_interp.hooks import ModelPatch
from moe_interp.prompts import format_example
from moe_interp.routerlens.data import to_examples
from moe_interp.signature import forward_accepts

SPANS = ("prompt", "context", "context_answer", "last", "answer", "all")
_NEEDS_ANSWER = {"answer", "all"}


@dataclass
class SelectionCounts:
    """Per-span selection counts.

    Attributes:
        counts: span -> [L, E] int64, how often each expert was among the top-k over the span's tokens.
        tokens: span -> number of tokens counted (each token contributes ``top_k`` selections per layer).
        layers: the model's decoder-layer number of each row. num_experts, top_k: E and k.
        n_examples: examples counted (all processes together).
    """

    counts: dict[str, torch.Tensor]
    tokens: dict[str, int]
    layers: list[int]
    num_experts: int
    top_k: int
    n_examples: int

    def share(self, span: str) -> torch.Tensor:
        """[L, E] float: fraction of the span's selections that went to each expert (rows sum to 1)."""
        c = self._get(span).double()
        return c / c.sum(dim=1, keepdim=True).clamp(min=1)

    def _get(self, span: str) -> torch.Tensor:
        if span not in self.counts:
            raise InputError(f"span {span!r} was not counted; counted: {sorted(self.counts)}")
        return self.counts[span]

    def frame(self) -> pd.DataFrame:
        """Tidy frame: span, layer, expert, count, share."""
        rows = []
        for span in self.counts:
            c, s = self._get(span), self.share(span)
            for i, layer in enumerate(self.layers):
                for e in range(self.num_experts):
                    rows.append((span, layer, e, int(c[i, e]), float(s[i, e])))
        return pd.DataFrame(rows, columns=["span", "layer", "expert", "count", "share"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {k: v.tolist() for k, v in self.counts.items()},
            "tokens": self.tokens,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "n_examples": self.n_examples,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (atomically)."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SelectionCounts:
        d = json.loads(Path(path).read_text())
        return cls(
            counts={k: torch.tensor(v, dtype=torch.int64) for k, v in d["counts"].items()},
            tokens={k: int(v) for k, v in d["tokens"].items()},
            layers=list(d["layers"]),
            num_experts=int(d["num_experts"]),
            top_k=int(d["top_k"]),
            n_examples=int(d["n_examples"]),
        )


# ------------------------------------------------------------------------------------------ encoding
@dataclass
class _Item:
    ids: list[int]
    spans: dict[str, list[tuple[int, int]]]  # span -> [start, end) token ranges


def _encode(tokenizer, ex: QAExample, spans: Sequence[str], template: str, index: int) -> _Item:
    fp = format_example(ex, tokenizer, template=template, tokenize=True)
    head = list(fp.input_ids or ())
    if not head:
        raise InputError(f"example {index} (id {ex.id!r}) encodes to no tokens")
    ranges: dict[str, list[tuple[int, int]]] = {
        "prompt": [(0, len(head))],
        "last": [(len(head) - 1, len(head))],
    }
    ids = head
    if "context" in spans:
        ctx = fp.context_tokens
        ranges["context"] = [ctx] if ctx is not None else []
    if "context_answer" in spans:
        ranges["context_answer"] = [t for ts in fp.answer_tokens.values() for t in ts if t is not None]
    if _NEEDS_ANSWER & set(spans):
        if not ex.answers:
            raise InputError(f"example {index} (id {ex.id!r}) has no answer for span 'answer'/'all'")
        h2, tail = split_continuation(
            tokenizer, fp.text, fp.answer_prefix + ex.answers[0], add_special_tokens=fp.add_special_tokens
        )
        if h2 != head:
            raise InputError(f"example {index} (id {ex.id!r}): prompt tokenises differently with its answer")
        ids = head + tail
        ranges["answer"] = [(len(head), len(ids))]
        ranges["all"] = [(0, len(ids))]
    return _Item(ids, {s: ranges[s] for s in spans})


# ------------------------------------------------------------------------------------------ hooks
class _Counter:
    def __init__(self, arch: MoEArchitecture, layers: list[MoELayer], config, spans: Sequence[str]):
        self.arch, self.layers, self.config, self.spans = arch, layers, config, list(spans)
        self.E, self.k = arch.num_experts(config), arch.top_k(config)
        self.counts = torch.zeros(len(spans), len(layers), self.E, dtype=torch.int64)
        self.masks: torch.Tensor | None = None  # [S, B*T] bool for the current batch

    def install(self, patch: ModelPatch) -> None:
        for i, layer in enumerate(self.layers):
            if self.arch.applied == "experts_input":
                patch.pre_hook(layer.experts, self._experts_hook(i), with_kwargs=True)
            else:
                patch.forward_hook(layer.router, self._router_hook(i, layer))

    def add(self, row: int, indices: torch.Tensor) -> None:
        """``indices`` [B*T, k] expert ids chosen in MoE layer ``row``."""
        idx = indices.reshape(-1, indices.shape[-1]).to("cpu", torch.int64)
        assert self.masks is not None
        for s in range(len(self.spans)):
            chosen = idx[self.masks[s]].flatten()
            self.counts[s, row] += torch.bincount(chosen, minlength=self.E)[: self.E]

    def _experts_hook(self, row: int):
        position: list[int | str] = []

        def hook(module, args, kwargs):
            if not position:  # where the indices argument sits, resolved once
                params = list(inspect.signature(module.forward).parameters)
                name = params[1]
                position.append(1 if len(args) > 1 else name)
            where = position[0]
            self.add(row, args[where] if isinstance(where, int) else kwargs[where])

        return hook

    def _router_hook(self, row: int, layer: MoELayer):
        at = self.arch.router_output.index("logits")

        def hook(module, args, output):
            logits = (output if isinstance(output, tuple) else (output,))[at]
            _, indices = self.arch.rule.route(logits, self.config, self.k, layer.router)
            self.add(row, indices)

        return hook


def _distributed() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from ``accelerate launch``'s env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # initialises the process group that accelerate launch / torchrun prepared (gloo without CUDA)
        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes
    return 0, 1


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def count_selections(
    model: nn.Module,
    tokenizer,
    examples: Iterable[QAExample | Mapping[str, Any]],
    *,
    spans: Sequence[str] = ("prompt",),
    batch_size: int = 16,
    template: str = "paper",
    progress: bool = True,
    distributed: bool | None = None,
) -> SelectionCounts:
    """Count, per MoE layer and expert, how often the model selects each expert over the given spans.

    Args:
        examples: QAExamples or dicts (see :func:`~moe_interp.routerlens.to_examples`); any iterable,
            streamed in chunks of ``64 * batch_size`` (sorted by length within a chunk).
        spans: any of :data:`SPANS` (see the module docstring), counted in one pass.
        template: prompt format (see :func:`moe_interp.prompts.format_example`).
        distributed: shard across ``torch.distributed`` / ``accelerate launch`` processes and sum the
            counts (default: whenever such a group exists).

    Returns:
        :class:`SelectionCounts` (identical on every process). Routing is whatever the model does now:
        apply tuned router weights / expert masks around the call to count under them.
    """
    spans = [spans] if isinstance(spans, str) else list(dict.fromkeys(spans))
    bad = [s for s in spans if s not in SPANS]
    if bad or not spans:
        raise InputError(f"unknown span(s) {bad}; choose from {SPANS}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    arch = get_architecture(model)
    layers = arch.moe_layers(model)
    rank, world = _distributed() if distributed is not False else (0, 1)
    counter = _Counter(arch, layers, model.config, spans)
    tokens = torch.zeros(len(spans), dtype=torch.int64)
    n_examples = torch.zeros(1, dtype=torch.int64)
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    keep = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    total = len(examples) if hasattr(examples, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc="count selections", unit="ex", disable=not progress or rank != 0)
    mine = (ex for i, ex in enumerate(examples) if i % world == rank)
    index = rank
    with ModelPatch() as patch:
        patch.eval_mode(model)
        counter.install(patch)
        for chunk in _chunks(mine, 64 * batch_size):
            items = []
            for ex in to_examples(chunk):
                items.append(_encode(tokenizer, ex, spans, template, index))
                index += world
            order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
            for start in range(0, len(order), batch_size):
                batch = [items[i] for i in order[start : start + batch_size]]
                width = max(len(it.ids) for it in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                masks = torch.zeros((len(spans), len(batch), width), dtype=torch.bool)
                for b, it in enumerate(batch):
                    ids[b, : len(it.ids)] = torch.tensor(it.ids)
                    attn[b, : len(it.ids)] = 1
                    for s, name in enumerate(spans):
                        for lo, hi in it.spans[name]:
                            masks[s, b, lo:hi] = True
                counter.masks = masks.reshape(len(spans), -1)
                tokens += counter.masks.sum(dim=1)
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False, **keep)
                n_examples += len(batch)
                bar.update(len(batch) * world)
    bar.close()
    if world == 1 and int(n_examples) == 0:
        raise InputError("count_selections got no examples: counts of nothing cannot identify experts")
    flat = torch.cat([counter.counts.flatten(), tokens, n_examples])
    if world > 1:
        import torch.distributed as dist

        backend = dist.get_backend()
        moved = flat.to(device) if backend == "nccl" else flat
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        flat = moved.cpu()
    n_counts = counter.counts.numel()
    counts = flat[:n_counts].reshape(counter.counts.shape)
    return SelectionCounts(
        counts={s: counts[i].clone() for i, s in enumerate(spans)},
        tokens={s: int(flat[n_counts + i]) for i, s in enumerate(spans)},
        layers=[m.number for m in layers],
        num_experts=counter.E,
        top_k=counter.k,
        n_examples=int(flat[-1]),
    )
