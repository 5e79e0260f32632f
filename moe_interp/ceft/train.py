"""Train one method from the command line (works under ``accelerate launch``).

    python -m moe_interp.ceft.train --model DIR --train train.jsonl --dev dev.jsonl \\
        --method ceft --experts runs/routerlens/experts_count_all.json --out runs/ceft/CEFT
    accelerate launch --num_processes 4 -m moe_interp.ceft.train ...   # DDP / FSDP / DeepSpeed configs

``--model``: a saved model + tokenizer folder (default: the demo model). Data files: JSONL records with
``question``, ``context`` and an answer field (see :func:`moe_interp.routerlens.to_examples`), or a demo
split name (``demo:conflict_tune``). ``--experts``: a Router Lens ``experts_*.json`` or a JSON
``{layer: [expert, ...]}`` (needed by ``ceft`` / ``ceft-lora`` / ``random``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from moe_interp.ceft.engine import CEFTConfig, train
from moe_interp.ceft.targets import (
    Method,
    ceft,
    full_fine_tuning,
    load_experts,
    lora_all_experts,
    random_experts_method,
    router_tuning,
)
from moe_interp.errors import InputError

METHOD_NAMES = ("ceft", "ceft-lora", "fft", "rt", "random", "lora")


def read_records(source: str) -> list[dict[str, Any]]:
    """JSONL records from a file, or a demo split as ``demo:<name>``."""
    if source.startswith("demo:"):
        from moe_interp.demo import load_split

        return list(load_split(source[5:]))
    path = Path(source)
    if not path.is_file():
        raise InputError(f"no data file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_model(folder: str | None):
    """A saved model + tokenizer (float32, eval mode), or the demo model."""
    if folder is None:
        from moe_interp.demo import load_demo

        return load_demo()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def make_method(
    name: str,
    experts: dict[int, list[int]] | None,
    num_experts: int,
    *,
    rank: int = 8,
    seed: int = 0,
    lr: float | None = None,
) -> Method:
    """A :class:`Method` from its command-line name."""
    if name in ("ceft", "ceft-lora", "random") and not experts:
        raise InputError(f"method {name!r} needs --experts")
    if name == "ceft":
        return ceft(experts, lr=lr)
    if name == "ceft-lora":
        return ceft(experts, lora_rank=rank, lr=lr)
    if name == "random":
        return random_experts_method(experts, num_experts, seed, lr=lr)
    if name == "fft":
        return full_fine_tuning(lr=lr)
    if name == "rt":
        return router_tuning(lr=lr)
    if name == "lora":
        return lora_all_experts(rank, lr=lr)
    raise InputError(f"unknown method {name!r}; choose from {METHOD_NAMES}")


def config_args(p: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`CEFTConfig` field."""
    d = CEFTConfig()
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data (%(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (longer: error)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of steps warming up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=None, help="dev-loss interval in steps (default: epoch)")
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="resume-state interval in steps"
    )
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from(args: argparse.Namespace) -> CEFTConfig:
    return CEFTConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", default=None)
    p.add_argument("--method", choices=METHOD_NAMES, required=True)
    p.add_argument("--experts", default=None)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-experts draw")
    p.add_argument("--out", required=True)
    config_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    from moe_interp.architectures import get_architecture

    experts = load_experts(args.experts) if args.experts else None
    n_experts = get_architecture(model).num_experts(model.config)
    method = make_method(args.method, experts, n_experts, rank=args.rank, seed=args.random_seed)
    dev = read_records(args.dev) if args.dev else None
    train(
        model,
        tok,
        read_records(args.train),
        dev,
        method=method,
        config=config_from(args),
        out=args.out,
        progress=False,
    )
    return Path(args.out)


if __name__ == "__main__":
    from moe_interp.errors import run_main

    run_main("python -m moe_interp.ceft.train", main)
