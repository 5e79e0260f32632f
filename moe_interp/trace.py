"""``moe_interp.trace``: run a model once and record what its MoE layers and attention did."""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from math import inf

import torch
from torch import nn

from moe_interp import backends
from moe_interp.architectures import get_architecture
from moe_interp.data.spans import char_to_token_spans, encode_many_with_offsets, find_answer_spans
from moe_interp.errors import InputError
from moe_interp.moetrace import MoETrace, Span
from moe_interp.recording import AttentionSink, Recorder


@dataclass
class _Encoded:
    ids: list[int]
    spans: dict[str, list[Span]]


def trace(
    model: nn.Module,
    prompt: str | Sequence[str],
    *,
    context: str | Sequence[str | None] | None = None,
    answer: str | Sequence[str | None] | None = None,
    tokenizer=None,
    attention: bool = True,
    full_attention: bool = False,
    expert_outputs: bool = False,
    near_tie_tol: float = 1e-3,
    remote: bool = False,
) -> MoETrace:
    """Run ``model`` on ``prompt`` and record routing, attention to spans and (optionally) expert outputs.

    Args:
        model: a transformers MoE causal LM of a registered type (see ``supported_architectures()``), an
            nnsight model wrapping one, or a TransformerLens ``TransformerBridge``.
        prompt: one string or a list of strings (batched with right padding; padding is never recorded).
        context: substring of the prompt (or one per prompt) marked as span ``"context"`` (its first
            occurrence).
        answer: substring marked as span ``"answer"`` at every whole-word occurrence inside the context
            (or inside the prompt when no context is given); at every occurrence if none is a whole word.
        tokenizer: a transformers tokenizer; defaults to ``model.tokenizer`` if the model carries one.
        attention: record the attention mass each token pays to each span (``attn_to_spans``).
        full_attention: also keep the full [A, H, T, T] attention maps per prompt.
        expert_outputs: also record each chosen expert's output, shared-expert and block outputs.
        near_tie_tol: tokens whose k-th and (k+1)-th selection scores differ by at most this are flagged in
            ``near_tie`` (in bf16/fp16 such choices can flip).
        remote: with an nnsight model, run on nnsight's remote service (routing only).

    Returns:
        an :class:`MoETrace`; its docstring lists every tensor and shape.

    The model is left exactly as it was: hooks are removed and modes restored even if the forward raises.

    Example:
        >>> model, tok = moe_interp.load_demo()                                  # doctest: +SKIP
        >>> t = moe_interp.trace(model, "The capital of France is", tokenizer=tok)  # doctest: +SKIP
        >>> t.router_logits.shape                                                # doctest: +SKIP
        torch.Size([4, 6, 16])
    """
    backend, hf = backends.detect(model)
    arch = get_architecture(hf)
    moe_layers = arch.moe_layers(hf)
    if expert_outputs and not arch.expert_outputs:
        raise InputError(f"expert_outputs=True is not available for model type {arch.model_type!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("trace() needs a tokenizer: pass tokenizer=... (the model does not carry one)")
    if not callable(tokenizer):
        raise InputError(
            f"tokenizer must be a loaded tokenizer object, got {type(tokenizer).__name__} {tokenizer!r:.60}"
            " (load it first, e.g. AutoTokenizer.from_pretrained(path))"
        )
    for name, flag in (
        ("attention", attention),
        ("full_attention", full_attention),
        ("expert_outputs", expert_outputs),
        ("remote", remote),
    ):
        if not isinstance(flag, bool):
            raise InputError(f"{name} must be True or False, got {flag!r}")
    if full_attention and not attention:
        raise InputError("full_attention=True records attention maps: it needs attention=True")
    real = isinstance(near_tie_tol, numbers.Real) and not isinstance(near_tie_tol, bool)
    if not real or not 0 <= near_tie_tol < inf:
        raise InputError(f"near_tie_tol must be a finite number >= 0, got {near_tie_tol!r}")
    near_tie_tol = float(near_tie_tol)
    prompts = _as_list(prompt, "prompt")
    if not prompts:
        raise InputError("prompt is an empty list")
    contexts = _broadcast(context, len(prompts), "context")
    answers = _broadcast(answer, len(prompts), "answer")
    if any(c is not None for c in contexts) or any(a is not None for a in answers):
        tokenized = encode_many_with_offsets(tokenizer, prompts)
    else:  # no spans to place: the same ids without computing character offsets
        tokenized = [(list(ids), []) for ids in tokenizer(prompts)["input_ids"]]
    encoded = [
        _encode(p, c, a, *ids_offsets)
        for p, c, a, ids_offsets in zip(prompts, contexts, answers, tokenized, strict=True)
    ]
    _check_lengths(hf, encoded, prompts)
    span_names = tuple(n for n in ("context", "answer") if any(n in e.spans for e in encoded))

    embedding = hf.get_input_embeddings().weight
    rows = embedding.shape[0]
    too_big = max(max(e.ids) for e in encoded)
    if too_big >= rows:
        raise InputError(
            f"the tokenizer produced token id {too_big} but the model's embedding has {rows} rows: "
            "the tokenizer does not belong to this model"
        )
    device = embedding.device
    input_ids, mask = _pad(encoded, tokenizer)
    rec = Recorder(arch, moe_layers, mask.flatten().bool(), expert_outputs)
    attn = None
    if attention and (span_names or full_attention):
        span_masks = _span_masks(encoded, span_names, input_ids.shape[1])
        attn = AttentionSink(span_masks, mask.bool(), full_attention)
    lengths = [len(e.ids) for e in encoded]
    spec = backends.ForwardSpec(arch, moe_layers, input_ids.to(device), mask.to(device), rec, attn, lengths)
    next_logits = backends.run(backend, model, hf, spec, remote=remote)

    token_ids = input_ids.reshape(-1) if rec.no_padding else input_ids.reshape(-1)[rec.valid]  # [N]
    example = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)])
    positions = torch.tensor([p for n in lengths for p in range(n)])
    k = arch.top_k(hf.config)
    logits = rec.stack("logits")
    weights, indices = rec.applied_routing(hf.config, k)
    if expert_outputs and arch.expert_fn is not None:
        experts_out, constant = rec.computed_experts(weights, indices)
        shared = rec.shared()
        shared = constant if shared is None else (shared if constant is None else shared + constant)
    elif expert_outputs:
        experts_out, shared = rec.stack("expert"), rec.shared()
    else:
        experts_out = shared = None
    probs = arch.probabilities(logits)
    if arch.rule.choice_bias is not None:  # chosen by biased scores [L, N, E]: record them
        bias = torch.stack([getattr(m.router, arch.rule.choice_bias).float().cpu() for m in moe_layers])
        choice = (logits if arch.rule.score == "logits" else probs) + bias[:, None, :]
    else:  # chosen by the probabilities, or (score "logits") by the logits themselves
        choice = None
    return MoETrace(
        model_type=arch.model_type,
        layers=[layer.number for layer in moe_layers],
        num_experts=arch.num_experts(hf.config),
        top_k=k,
        prompts=prompts,
        tokens=_token_strings(tokenizer, token_ids.tolist()),
        token_ids=token_ids,
        example=example,
        position=positions,
        router_logits=logits,
        router_probs=probs,
        topk_indices=indices,
        topk_weights=weights,
        selection_scores=choice,
        near_tie_tol=near_tie_tol,
        near_tie_scores=_NEAR_TIE_SCORES[arch.rule.score] if choice is None else "selection_scores",
        near_tie_groups=astuple(groups) if (groups := arch.rule.group_limit(hf.config)) else None,
        next_token_logits=next_logits.float().cpu(),
        spans=[e.spans for e in encoded],
        span_names=span_names,
        attention_layers=attn.layers if attn else [],
        attn_to_spans=attn.stack_spans() if attn and span_names else None,
        attention_maps=attn.maps(lengths) if attn and full_attention else None,
        extra_routing=rec.extra_routing(hf.config, k),
        expert_outputs=experts_out,
        shared_outputs=shared,
        weights_scale_input=arch.weights_scale_input,
        block_outputs=rec.stack("block") if expert_outputs else None,
    )


#: the MoETrace field holding the scores a rule chooses by (when it adds no choice bias)
_NEAR_TIE_SCORES = {"softmax": "router_probs", "sigmoid": "router_probs", "logits": "router_logits"}


# ---------------------------------------------------------------------------------------------- inputs
def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    return _checked(list(value), name, allow_none=False)


def _broadcast(value, n: int, name: str) -> list[str | None]:
    if value is None or isinstance(value, str):
        items = [value] * n
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InputError(f"{name} must be a string, None or a list of them, got {type(value).__name__}")
    if len(items) != n:
        raise InputError(f"{name} has {len(items)} entries for {n} prompts")
    return _checked(items, name, allow_none=True)


def _checked(items: list, name: str, *, allow_none: bool) -> list:
    """``items`` if each is a non-blank string (or None, where allowed)."""
    for i, item in enumerate(items):
        if item is None and allow_none:
            continue
        if not isinstance(item, str):
            kind = "a string or None" if allow_none else "a string"
            raise InputError(f"{name}[{i}] must be {kind}, got {type(item).__name__}")
        if not item.strip():
            raise InputError(f"{name}[{i}] is empty")
    return items


def _encode(
    prompt: str, context: str | None, answer: str | None, ids: list[int], offsets: list[tuple[int, int]]
) -> _Encoded:
    """``prompt``'s token ids with its context / answer spans in tokens."""
    char_spans: dict[str, list[Span]] = {}
    if context is not None:
        start = prompt.find(context) if context else -1
        if start < 0:
            raise InputError(f"context {_quote(context)} not found in prompt {_quote(prompt)}")
        char_spans["context"] = [(start, start + len(context))]
    if answer is not None:
        lo, hi = char_spans.get("context", [(0, len(prompt))])[0]
        within = prompt[lo:hi]
        spans = find_answer_spans(within, answer, case="sensitive", whole_word=True) or find_answer_spans(
            within, answer, case="sensitive"
        )  # whole words ("US" not inside "USSR"); any occurrence only if there is no whole word
        found = [(lo + a, lo + b) for a, b in spans]
        if not found:
            where = "the context" if context is not None else "the prompt"
            raise InputError(f"answer {_quote(answer)} not found in {where} of prompt {_quote(prompt)}")
        char_spans["answer"] = found
    if not ids:
        raise InputError(f"prompt {_quote(prompt)} tokenizes to no tokens")
    flat = [(name, span) for name, spans in char_spans.items() for span in spans]
    token_spans = char_to_token_spans(offsets, [span for _, span in flat]) if flat else []
    spans: dict[str, list[Span]] = {name: [] for name in char_spans}
    for (name, _), t in zip(flat, token_spans, strict=True):  # one offsets conversion for all spans
        if t is not None:
            spans[name].append(t)
    return _Encoded(ids, spans)


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own; decoded strings are cached per tokenizer (decoding is a visible share
    of tracing one short prompt)."""
    cache = _DECODED.setdefault(tokenizer, {})
    todo = sorted({i for i in ids if i not in cache})
    if todo:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust backend's batch decode: ~3x faster than the Python loop
            strings = backend.decode_batch([[i] for i in todo], skip_special_tokens=False)
        else:
            strings = tokenizer.batch_decode([[i] for i in todo])
        cache.update(zip(todo, strings, strict=True))
    return [cache[i] for i in ids]


_DECODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _quote(text: str | None, limit: int = 80) -> str:
    if text is None:
        return "None"
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _check_lengths(model: nn.Module, encoded: list[_Encoded], prompts: list[str]) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    for i, e in enumerate(encoded):
        if limit is not None and len(e.ids) > limit:
            raise InputError(
                f"prompt {i} ({_quote(prompts[i], 40)}) has {len(e.ids)} tokens, more than the model's "
                f"{limit} positions (max_position_embeddings); shorten it - nothing is truncated silently"
            )


def _pad(encoded: list[_Encoded], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] token ids (right padding) and [B, T] long mask (1 = token), on the CPU."""
    width = max(len(e.ids) for e in encoded)
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    ids = torch.tensor([e.ids + [pad] * (width - len(e.ids)) for e in encoded], dtype=torch.long)
    if all(len(e.ids) == width for e in encoded):
        return ids, torch.ones_like(ids)
    return ids, (torch.arange(width) < torch.tensor([[len(e.ids)] for e in encoded])).long()


def _span_masks(encoded: list[_Encoded], names: tuple[str, ...], width: int) -> torch.Tensor:
    masks = torch.zeros(len(encoded), len(names), width)
    for b, e in enumerate(encoded):
        for s, name in enumerate(names):
            for start, end in e.spans.get(name, []):
                masks[b, s, start:end] = 1.0
    return masks
