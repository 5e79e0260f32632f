"""Experiment: put the demo's memory-over-context preference into its experts (attention frozen).

On the shipped demo the context-vs-memory choice is made by attention (layer 0) and the embeddings, so no
expert fine-tuning can move it (CEFT README section). This continues training from the shipped weights in
two phases:

A. every parameter, conflict targets following the context with probability ``--a-p-context`` (high): the
   model learns to prefer the context (mostly through attention, its easiest lever);
B. only the experts and routers train (attention, embeddings, norms and LM head frozen), conflict targets
   following memory (context with probability ``--b-p-context``, low): the preference for memory that brings
   Pc back down can only be stored in the experts.

Memorised closed-book lines and pool contexts stay in the mixture of both phases. The result is saved as a
model + tokenizer folder that ``python -m moe_interp.ceft.run --model DIR`` and the Router Lens pipeline take.

    python experiments/expert_override.py --out runs/override
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_interp.demo import load_demo
from moe_interp.demo import splits as S
from moe_interp.demo.train import collate, epoch_batches, epoch_examples, quick_eval, weighted_loss


def _phase(model, tok, splits, *, steps, lr, p_context, epoch0, trainable, log, name, eval_every, seed):
    params = [p for n, p in model.named_parameters() if trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    n_train = sum(p.numel() for p in params)
    print(f"phase {name}: {steps} steps, lr {lr}, p_context {p_context}, {n_train:,} trainable", flush=True)
    epoch, batches, i, step, t0 = epoch0, [], 0, 0, time.time()
    model.train()
    while step < steps:
        if i >= len(batches):
            ex = epoch_examples(splits, epoch, seed, 2, 1, p_context, 0.5, 4)
            batches, i, epoch = epoch_batches(tok, ex, seed, epoch), 0, epoch + 1
        b = collate(batches[i], tok.pad_token_id)
        i += 1
        loss = weighted_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % eval_every == 0 or step == steps:
            res = {"phase": name, "step": step, "s": round(time.time() - t0), "loss": round(loss.item(), 3)}
            res.update({k: round(v, 3) for k, v in quick_eval(model, tok, splits).items()})
            log.append(res)
            print(json.dumps(res), flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return epoch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/override"))
    ap.add_argument("--a-steps", type=int, default=300)
    ap.add_argument("--a-lr", type=float, default=5e-4)
    ap.add_argument("--a-p-context", type=float, default=0.9)
    ap.add_argument("--b-steps", type=int, default=600)
    ap.add_argument("--b-lr", type=float, default=1e-3)
    ap.add_argument("--b-p-context", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_demo()
    splits = S.build_splits()
    log: list[dict] = [{"phase": "start", **quick_eval(model, tok, splits)}]
    print(json.dumps(log[0]), flush=True)
    epoch = _phase(
        model, tok, splits, steps=args.a_steps, lr=args.a_lr, p_context=args.a_p_context, epoch0=100,
        trainable=lambda n: True, log=log, name="A", eval_every=args.eval_every, seed=args.seed,
    )
    _phase(
        model, tok, splits, steps=args.b_steps, lr=args.b_lr, p_context=args.b_p_context, epoch0=epoch,
        trainable=lambda n: ".mlp." in n, log=log, name="B", eval_every=args.eval_every, seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    (args.out / "override_log.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                             "log": log}, indent=1))


if __name__ == "__main__":
    main()
