"""Evaluation throughput: batched vs one-at-a-time, generate and score modes.

    python benchmarks/eval_throughput.py                       # demo model if trained, else a tiny model
    python benchmarks/eval_throughput.py --checkpoint runs/full --threads 1 --out runs/eval_benchmark.txt

Examples are the demo's ``conflict_test`` split (memorised fact, counterfactual context). ``--checkpoint``
takes a ``python -m moe_interp.demo.train`` output folder (``ckpt/model.safetensors`` + ``tokenizer/``).
Prints examples/s per batch size and whether the predictions equal the one-at-a-time run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moe_interp.data import QAExample
from moe_interp.demo import WEIGHTS_DIR, load_split
from moe_interp.evaluation import evaluate


def demo_examples(split: str = "conflict_test") -> list[QAExample]:
    """A demo split as QAExamples: gold = the context's object, memorised = the true object."""
    return [
        QAExample(
            id=r["id"],
            context=r["context"],
            question=r["question"],
            answers=(r["context_answer"],),
            memorised_answer=r["true_object"],
            counterfactual_answer=r["counterfactual_object"] if r["context_kind"] == "conflict" else None,
            source=f"demo:{split}",
        )
        for r in load_split(split)
    ]


def tiny_model(examples: list[QAExample]):
    """A random 3-layer OLMoE and a byte-level BPE trained on the examples' text (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    from moe_interp.prompts import build_prompt

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator((build_prompt(e.context, e.question) for e in examples), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    config = OlmoeConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return OlmoeForCausalLM(config).eval(), tok, "tiny random OLMoE (3 layers, 8 experts, d=64)"


def checkpoint_model(folder: Path):
    """A demo-architecture OLMoE from a training run folder (``ckpt/model.safetensors``, ``tokenizer/``)."""
    from safetensors.torch import load_file
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    from moe_interp.demo.train import MODEL_KW

    tok = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    config = OlmoeConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    for key, value in MODEL_KW.items():
        setattr(config, key, value)
    model = OlmoeForCausalLM(config)
    model.load_state_dict(load_file(str(folder / "ckpt" / "model.safetensors")))
    return model.eval(), tok, f"demo-architecture checkpoint {folder}"


def cpu_info() -> str:
    """CPU model name, logical core count and (Linux) 1-minute load average."""
    name = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} logical cores{load}"


def load(args: argparse.Namespace, examples: list[QAExample]):
    if args.checkpoint is not None:
        return checkpoint_model(args.checkpoint)
    if not args.tiny and (WEIGHTS_DIR / "model.safetensors").exists():
        from moe_interp.demo import load_demo

        model, tok = load_demo()
        return model, tok, "demo model (moe_interp.load_demo())"
    return tiny_model(examples)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=64, help="number of conflict_test examples")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated; 1 = one at a time")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="use the tiny random model even if the demo exists")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    examples = demo_examples()[: args.n]
    model, tok, what = load(args, examples)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    lines = [
        f"$ python {' '.join(sys.argv)}",
        f"model: {what}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params",
        f"data: demo conflict_test, n={len(examples)}; max_new_tokens={args.max_new_tokens}; stop='\\n'/EOS",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {cpu_info()}",
        "",
        f"{'mode':<9}{'batch':>6}{'seconds':>9}{'ex/s':>8}{'speedup':>9}  same predictions as batch 1",
    ]
    for mode in ("generate", "score"):
        base_time = base_preds = None
        for bs in sizes:
            evaluate(model, tok, examples[: min(4, len(examples))], batch_size=bs, mode=mode, progress=False)
            t0 = time.perf_counter()
            res = evaluate(
                model,
                tok,
                examples,
                batch_size=bs,
                max_new_tokens=args.max_new_tokens,
                mode=mode,
                progress=False,
            )
            dt = time.perf_counter() - t0
            preds = list(res["prediction"])
            if base_time is None:
                base_time, base_preds = dt, preds
            n_diff = sum(a != b for a, b in zip(preds, base_preds, strict=True))
            same = "yes" if not n_diff else f"NO ({n_diff} differ)"
            rate, speedup = len(examples) / dt, base_time / dt
            lines.append(f"{mode:<9}{bs:>6}{dt:>9.2f}{rate:>8.1f}{speedup:>8.1f}x  {same}")
        s = res.summary()
        lines.append(f"  ({mode}: EM {s['EM']:.3f}  Pc {s['Pc']:.3f}  Po {s['Po']:.3f}  MR {s['MR']:.3f})")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
