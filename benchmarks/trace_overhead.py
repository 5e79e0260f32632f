"""Cost of recording, side by side in one run: plain forwards, trace(), nnsight and TransformerLens.

Every variant runs interleaved (one repetition of each, in a shuffled order, repeated); the median time per
variant is reported, and its ratio to the plain forward on the same token ids as the median over repetitions
of the ratio within each repetition (robust to the machine's speed drifting during the run). Usage::

    python benchmarks/trace_overhead.py --reps 20 --out benchmarks/results/trace_overhead.json

Variants: plain forward; forward with ``output_router_logits``; ``trace`` routing only; ``trace`` with
attention to spans; ``trace`` with per-expert outputs; nnsight saving every router output; TransformerLens
``run_with_cache`` filtered to the MoE hooks (only where the bridge has them). ``trace`` timings include its
tokenisation; the plain forward gets pre-tokenised ids, so the ratios are an upper bound on the overhead.

``trace`` keeps only the logits after each prompt's last token (``logits_to_keep``), so it skips most of the
LM head that a plain forward computes at every position. Each row therefore has two ratios: ``ratio`` against
the plain forward (what a user would otherwise run) and ``ratio_last_token_logits`` against a plain forward
that also computes only those logits (the overhead of recording alone). nnsight is measured both ways, and
also from the prompts (tokenisation inside the timed call, as ``trace`` does). For attention to spans the
peers record the same quantities their way: nnsight saves the routers and every layer's attention
probabilities from an eager-attention copy of the model, TransformerLens caches the MoE hooks and
``hook_pattern``; both then reduce the maps to span masses; ``trace`` is also timed on that eager copy
(it then records the probabilities eager returns instead of computing them a second time).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import moe_interp

KEEP = "plain forward, last-token logits (logits_to_keep)"
NNSIGHT_KEEP = "nnsight: save every router output, last-token logits"
NNSIGHT_TEXT = "nnsight from prompts: tokenise, save routers, last-token logits"
NNSIGHT_SAME = "nnsight from prompts: the same routing quantities as trace"
TRACE_EAGER = "trace: routing + attention to spans, eager-attention copy"
NNSIGHT_SPANS = "nnsight: routers + eager attention maps -> span masses"
NNSIGHT_SPANS_TEXT = "nnsight from prompts: locate spans, routers + eager attention maps -> span masses"
NNSIGHT_SPANS_SAME = "nnsight from prompts: the same routing quantities and span masses as trace (eager)"
LENS_SPANS = "TransformerLens: run_with_cache (MoE hooks + patterns) -> span masses"
WORDS = "the model reads the context and the answer is in the passage about Paris France river city".split()


def _tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


#: the random models: tiny OLMoE-shaped and DeepSeek-V3-shaped
RANDOM_MODELS = ("olmoe", "deepseek_v3")

#: fewer repetitions than this give no cheaper / dearer verdict (the bootstrap interval means nothing)
MIN_REPS_FOR_VERDICT = 10


def _shape(text: str) -> tuple[int, int]:
    """``"BxT"`` -> (B, T), both positive."""
    try:
        batch, length = (int(x) for x in text.split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not BATCHxTOKENS (e.g. 8x256)") from None
    if batch < 1 or length < 2:
        raise SystemExit(f"--shapes: {text!r} needs at least 1 prompt of at least 2 tokens")
    return batch, length


def _random_model(kind: str) -> torch.nn.Module:
    common = dict(
        vocab_size=1024,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        num_experts_per_tok=8,
    )
    if kind not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {kind!r}; choose from {RANDOM_MODELS}")
    if kind == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=128, num_experts=64)
    else:  # DeepSeek-V3 shaped: sigmoid routing, grouped choice, shared expert, first layer dense
        config = transformers.DeepseekV3Config(
            **common,
            intermediate_size=512,
            moe_intermediate_size=128,
            n_routed_experts=64,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=8,
            topk_group=4,
            kv_lora_rank=64,
            q_lora_rank=96,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.02)
    return model


def _prompts(tok, batch: int, length: int) -> tuple[list[str], list[str], list[str]]:
    """``batch`` prompts of about ``length`` tokens, each with a context and an answer inside it."""
    prompts, contexts = [], []
    for b in range(batch):
        words = [WORDS[(b + i) % len(WORDS)] for i in range(length)]
        text = " ".join(words)
        while len(tok(text)["input_ids"]) > length:
            words = words[:-1]
            text = " ".join(words)
        prompts.append(text)
        contexts.append(" ".join(words[: len(words) // 2]))
    answers = ["Paris" if "Paris" in c else c.split()[1] for c in contexts]
    return prompts, contexts, answers


def _span_indicators(model, tok, prompts, contexts, answers, width: int) -> torch.Tensor:
    """[B, 2, T] float: 1 on each prompt's context / answer tokens (the spans ``trace`` marks; computed once,
    outside the timings, for the peers' span masses)."""
    t = moe_interp.trace(model, prompts, context=contexts, answer=answers, tokenizer=tok, attention=False)
    out = torch.zeros(len(prompts), 2, width)
    for b, spans in enumerate(t.spans):
        for s, name in enumerate(("context", "answer")):
            for start, end in spans.get(name, []):
                out[b, s, start:end] = 1.0
    return out


def _variants(model, tok, prompts, contexts, answers, folder: Path) -> dict[str, Callable[[], object]]:
    enc = tok(prompts, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    spans = _span_indicators(model, tok, prompts, contexts, answers, ids.shape[1])
    # the logits trace() returns: one row per prompt's last token (right padding)
    keep = torch.unique(mask.sum(1) - 1)
    out: dict[str, Callable[[], object]] = {
        "plain forward": lambda: model(input_ids=ids, attention_mask=mask, use_cache=False),
        KEEP: lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep),
        "forward + output_router_logits": lambda: model(
            input_ids=ids, attention_mask=mask, use_cache=False, output_router_logits=True
        ),
        "trace: routing": lambda: moe_interp.trace(model, prompts, tokenizer=tok, attention=False),
        "trace: routing + attention to spans": lambda: moe_interp.trace(
            model, prompts, context=contexts, answer=answers, tokenizer=tok
        ),
        "trace: routing + expert outputs": lambda: moe_interp.trace(
            model, prompts, tokenizer=tok, attention=False, expert_outputs=True
        ),
    }
    # an eager-attention copy: eager kernels return the probabilities, which trace then records directly
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out[TRACE_EAGER] = lambda: moe_interp.trace(
        eager, prompts, context=contexts, answer=answers, tokenizer=tok
    )
    arch = moe_interp.get_architecture(model)
    try:
        from nnsight import NNsight

        # nnsight replaces every module's forward of the model it wraps (for good): give it its own copies,
        # so that the plain forwards and trace() run on an untouched model
        wrapped = NNsight(copy.deepcopy(model))

        numbers = [m.number for m in arch.moe_layers(model)]

        def nnsight_routers(input_ids=ids, attention_mask=mask, **kept):
            saved = []
            with wrapped.trace(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kept):
                for number in numbers:
                    saved.append(wrapped.model.layers[number].mlp.gate.output.save())
            return saved

        def nnsight_from_text():
            """What ``trace`` does from the prompts: tokenise, then the same last-token logits."""
            enc = tok(prompts, padding=True, padding_side="right", return_tensors="pt")
            last = torch.unique(enc["attention_mask"].sum(1) - 1)
            return nnsight_routers(enc["input_ids"], enc["attention_mask"], logits_to_keep=last)

        # module paths of each MoE layer's router and experts, for the like-for-like peers below
        names = {id(m): n for n, m in model.named_modules()}
        moe_paths = {m.number: (names[id(m.router)], names[id(m.experts)]) for m in arch.moe_layers(model)}
        attn_paths = {number: names[id(m)] for number, m in arch.attention_modules(model)}
        at = arch.router_output.index("logits")

        def envoy(root, path: str):
            for part in path.split("."):
                root = root[int(part)] if part.isdigit() else getattr(root, part)
            return root

        def locate_spans(enc) -> torch.Tensor:
            """[B, 2, T]: 1 on each prompt's context / answer tokens, placed from the offsets."""
            offsets = enc["offset_mapping"]
            marks = torch.zeros(len(prompts), 2, offsets.shape[1])
            for b, (prompt, context, answer) in enumerate(zip(prompts, contexts, answers, strict=True)):
                start = prompt.find(context)
                found = prompt.find(answer, start)
                for s, (lo, hi) in enumerate(((start, start + len(context)), (found, found + len(answer)))):
                    inside = (offsets[b, :, 0] < hi) & (offsets[b, :, 1] > lo)
                    marks[b, s] = (inside & enc["attention_mask"][b].bool()).float()
            return marks

        def nnsight_same_quantities(root=None, spans: bool = False):
            """What ``trace`` returns, recorded with nnsight from the prompts: router logits, probabilities
            over all experts, the top-k indices and weights the model applied (the experts' inputs), padding
            dropped, token strings and last-token logits (not its near-tie flags); with ``spans``, also every
            layer's attention mass per query token on the context and the answer (from an eager model's
            attention probabilities), as ``trace``'s ``attn_to_spans`` [A, N, H, S]."""
            root = wrapped if root is None else root
            enc = tok(
                prompts, padding=True, padding_side="right", return_tensors="pt", return_offsets_mapping=spans
            )
            last = torch.unique(enc["attention_mask"].sum(1) - 1)
            saved, maps = [], []
            with root.trace(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                use_cache=False,
                logits_to_keep=last,
            ):
                for number in sorted(set(attn_paths) | set(moe_paths)):  # nnsight: in execution order
                    if spans and number in attn_paths:
                        maps.append(envoy(root, attn_paths[number]).output[1].save())
                    if number in moe_paths:
                        router, experts = moe_paths[number]
                        saved.append((envoy(root, router).output.save(), envoy(root, experts).inputs.save()))
                logits_out = root.output.logits.save()
            valid = enc["attention_mask"].flatten().bool()
            rows = []
            for out_r, (args, _) in saved:
                lg = (out_r if isinstance(out_r, tuple) else (out_r,))[at]
                lg = lg.reshape(-1, lg.shape[-1]).float()[valid]
                rows.append(
                    (
                        lg,
                        arch.probabilities(lg),
                        args[1].reshape(-1, args[1].shape[-1])[valid],
                        args[2].reshape(-1, args[2].shape[-1]).float()[valid],
                    )
                )
            ids_kept = enc["input_ids"].flatten()[valid].tolist()  # each token decoded on its own, as trace
            tokens = tok.backend_tokenizer.decode_batch([[i] for i in ids_kept], skip_special_tokens=False)
            routing = [torch.stack(t) for t in zip(*rows, strict=True)]
            if not spans:
                return routing, tokens, logits_out.float()
            marks = locate_spans(enc)
            mass = [
                torch.einsum("bhqk,bsk->bqhs", w.float(), marks).flatten(0, 1)[valid] for w in maps
            ]  # [N, H, S] per layer
            return routing, tokens, logits_out.float(), torch.stack(mass)

        if arch.applied == "experts_input":
            out[NNSIGHT_SAME] = nnsight_same_quantities
        out["nnsight: save every router output"] = nnsight_routers
        out[NNSIGHT_KEEP] = lambda: nnsight_routers(logits_to_keep=keep)
        out[NNSIGHT_TEXT] = nnsight_from_text

        # the same quantities as "trace: routing + attention to spans": routers and every layer's attention
        # probabilities (eager attention returns them), reduced to span masses
        wrapped_eager = NNsight(copy.deepcopy(eager))
        attn_layers = [n for n, _ in arch.attention_modules(model)]

        def nnsight_spans(input_ids=ids, attention_mask=mask, kept=keep, indicators=spans):
            routers, maps = [], []
            layers = wrapped_eager.model.layers
            with wrapped_eager.trace(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=kept
            ):
                for number in sorted(set(attn_layers) | set(numbers)):  # nnsight: in execution order
                    if number in attn_layers:
                        maps.append(layers[number].self_attn.output[1].save())
                    if number in numbers:
                        routers.append(layers[number].mlp.gate.output.save())
            return routers, [torch.einsum("bhqk,bsk->bqhs", w.float(), indicators) for w in maps]

        def nnsight_spans_from_text():
            """What ``trace`` does from the prompts: tokenise with offsets, find each context and answer,
            mark their tokens, then the same recording as ``nnsight_spans``."""
            enc = tok(
                prompts, padding=True, padding_side="right", return_tensors="pt", return_offsets_mapping=True
            )
            last = torch.unique(enc["attention_mask"].sum(1) - 1)
            return nnsight_spans(enc["input_ids"], enc["attention_mask"], last, locate_spans(enc))

        out[NNSIGHT_SPANS] = nnsight_spans
        out[NNSIGHT_SPANS_TEXT] = nnsight_spans_from_text
        if arch.applied == "experts_input":
            out[NNSIGHT_SPANS_SAME] = lambda: nnsight_same_quantities(wrapped_eager, spans=True)
    except ImportError:
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge

        # the bridge patches the model it wraps: give it its own copy
        own = copy.deepcopy(model)
        own.config.architectures = [type(own).__name__]
        own.save_pretrained(folder)
        tok.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=own, tokenizer=PreTrainedTokenizerFast.from_pretrained(folder)
        )
        names = {n for n in bridge.hook_dict if ".mlp.gate.hook_out" in n or "hook_expert_" in n}
        patterns = {n for n in bridge.hook_dict if n.endswith(".attn.hook_pattern")}
        if names:
            out["TransformerLens: run_with_cache (MoE hooks)"] = lambda: bridge.run_with_cache(
                ids, attention_mask=mask, names_filter=lambda n: n in names
            )
        if names and patterns:

            def lens_spans():
                _, cache = bridge.run_with_cache(
                    ids, attention_mask=mask, names_filter=lambda n: n in names or n in patterns
                )
                return [torch.einsum("bhqk,bsk->bqhs", cache[n].float(), spans) for n in sorted(patterns)]

            out[LENS_SPANS] = lens_spans
    except Exception as exc:  # noqa: BLE001 - no bridge for this architecture
        print(f"  (TransformerLens skipped: {type(exc).__name__}: {str(exc)[:80]})")
    return out


def trace_bytes(t: moe_interp.MoETrace) -> tuple[int, int]:
    """(bytes of every tensor the trace holds, bytes of the data it must hold: router logits, chosen
    experts and weights, attention to spans, next-token logits)."""
    tensors = [v for v in vars(t).values() if isinstance(v, torch.Tensor)] + list(t.attention_maps or [])
    held = sum(x.nbytes for x in tensors)
    needed = sum(
        x.nbytes
        for x in (t.router_logits, t.topk_indices, t.topk_weights, t.attn_to_spans, t.next_token_logits)
        if x is not None
    )
    return held, needed


def measure(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per variant and repetition, interleaved in a fresh random order each repetition (so that no
    variant always follows the same neighbour on a shared, noisy machine)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    with torch.no_grad():
        for rep in range(warmup + reps):
            rng.shuffle(order)
            for name in order:
                fn = variants[name]
                start = time.perf_counter()
                fn()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over repetitions of ``time / base time`` in the same repetition: the machine's speed drifts
    (this shared VM ran the same forward 2x faster an hour apart), and a ratio within one repetition cancels
    the drift that a ratio of two medians keeps."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


#: (trace variant, peer variant): each compared within the same repetitions (same quantities recorded)
COMPARISONS = (
    ("trace: routing", NNSIGHT_TEXT),
    ("trace: routing", NNSIGHT_SAME),
    ("trace: routing", "TransformerLens: run_with_cache (MoE hooks)"),
    (TRACE_EAGER, NNSIGHT_SPANS),
    (TRACE_EAGER, NNSIGHT_SPANS_TEXT),
    (TRACE_EAGER, NNSIGHT_SPANS_SAME),
    (TRACE_EAGER, LENS_SPANS),
    ("trace: routing + attention to spans", NNSIGHT_SPANS),
    ("trace: routing + attention to spans", NNSIGHT_SPANS_TEXT),
    ("trace: routing + attention to spans", NNSIGHT_SPANS_SAME),
    ("trace: routing + attention to spans", LENS_SPANS),
)


def paired_interval(times: list[float], base: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """Median of the per-repetition ratios ``time / base`` and its 95% bootstrap interval (resampling
    repetitions, seeded): an interval below 1 says "cheaper" with this machine's noise taken into account."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def _reps_for(variants: dict[str, Callable[[], object]], reps: int, min_seconds: float, cap: int) -> int:
    """At least ``reps``, more for fast cells: enough that the plain forward alone runs ``min_seconds``."""
    fn = variants["plain forward"]
    with torch.no_grad():
        fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
    return max(reps, min(cap, int(min_seconds / max(once, 1e-6))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--models", default="demo,olmoe,deepseek_v3")
    parser.add_argument("--shapes", default="1x64,8x256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="raise the repetitions of fast cells until the plain forward alone takes this long (capped)",
    )
    parser.add_argument("--max-reps", type=int, default=300, help="cap for --min-seconds")
    parser.add_argument(
        "--only",
        default=None,
        help="time only the variants whose name contains one of these |-separated strings (the two plain "
        "forwards are always timed): more repetitions for the pairs that matter",
    )
    parser.add_argument("--out", default="benchmarks/results/trace_overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{args.threads}, torch {torch.__version__}, transformers {transformers.__version__}",
        "reps": args.reps,
        "only": args.only,
        "rows": [],
    }
    kinds, shapes = args.models.split(","), [_shape(s) for s in args.shapes.split(",")]
    unknown = sorted(set(kinds) - {"demo", *RANDOM_MODELS})
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from demo, {', '.join(RANDOM_MODELS)}")
    wanted = [w for w in (args.only or "").split("|") if w.strip()]
    if args.only is not None and not wanted:
        parser.error(f"--only {args.only!r} names no variant")
    for kind in kinds:
        if kind == "demo":
            model, tok = moe_interp.load_demo()
        else:
            model, tok = _random_model(kind), _tokenizer(1024)
        for batch, length in shapes:
            shape = f"{batch}x{length}"
            prompts, contexts, answers = _prompts(tok, batch, length)
            with tempfile.TemporaryDirectory() as folder:
                variants = _variants(model, tok, prompts, contexts, answers, Path(folder))
                if wanted:
                    kept = {
                        name: fn
                        for name, fn in variants.items()
                        if name in ("plain forward", KEEP) or any(w in name for w in wanted)
                    }
                    if len(kept) == 2:
                        raise SystemExit(
                            f"--only {args.only!r} matches no variant; the variants are:\n  "
                            + "\n  ".join(variants)
                        )
                    variants = kept
                reps = _reps_for(variants, args.reps, args.min_seconds, args.max_reps)
                times = measure(variants, reps)
            base, base_keep = times["plain forward"], times[KEEP]
            t = moe_interp.trace(model, prompts, context=contexts, answer=answers, tokenizer=tok)
            held, needed = trace_bytes(t)
            results.setdefault("memory", []).append(
                dict(
                    model=kind,
                    shape=shape,
                    held_bytes=held,
                    needed_bytes=needed,
                    ratio=round(held / needed, 3),
                )
            )
            print(
                f"{kind:12s} {shape:7s} trace holds {held / 1e6:.2f} MB for {needed / 1e6:.2f} MB of "
                f"routing + attention-to-span data: x{held / needed:.2f}"
            )
            for name, secs in times.items():
                row = dict(
                    model=kind,
                    shape=shape,
                    reps=reps,
                    variant=name,
                    ms=round(statistics.median(secs) * 1e3, 2),
                    ratio=round(paired_ratio(secs, base), 3),
                    ratio_last_token_logits=round(paired_ratio(secs, base_keep), 3),
                )
                results["rows"].append(row)
                print(
                    f"{kind:12s} {shape:7s} {name:62s} {row['ms']:9.2f} ms  x{row['ratio']:.2f}"
                    f"  x{row['ratio_last_token_logits']:.2f}",
                    flush=True,
                )
            for mine, peer in COMPARISONS:
                if mine not in times or peer not in times:
                    continue
                median, low, high = paired_interval(times[mine], times[peer])
                verdict = "cheaper" if high < 1 else ("dearer" if low > 1 else "equal within noise")
                if reps < MIN_REPS_FOR_VERDICT:
                    verdict = f"too few repetitions for a verdict (< {MIN_REPS_FOR_VERDICT})"
                results.setdefault("comparisons", []).append(
                    dict(
                        model=kind,
                        shape=shape,
                        reps=reps,
                        trace=mine,
                        peer=peer,
                        ratio=round(median, 3),
                        ci95=[round(low, 3), round(high, 3)],
                        verdict=verdict,
                    )
                )
                print(
                    f"{kind:12s} {shape:7s} {mine} / {peer}: x{median:.3f} [{low:.3f}, {high:.3f}] {verdict}",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
