"""Experiment: which tail recipe keeps the demo's context reading (support) while lowering its faithfulness?

Starts from one snapshot of a ``python -m moe_interp.demo.train`` run (fresh AdamW at the tail's constant
learning rate, so a probe, not a reproduction) and trains ``--steps`` tail steps with the given recipe,
printing ``quick_eval`` every ``--eval-every`` steps.

    python experiments/tail_probe.py runs/window --step 3000 --first-window 8 --pool-repeat 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from snapshot_probe import build

from moe_interp.demo import splits as S
from moe_interp.demo.train import (
    FIRST_WINDOW,
    collate,
    epoch_batches,
    epoch_examples,
    quick_eval,
    weighted_loss,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--first-window", type=int, default=FIRST_WINDOW)
    ap.add_argument("--steps", type=int, default=750)
    ap.add_argument("--eval-every", type=int, default=125)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cb-repeat", type=int, default=2)
    ap.add_argument("--pool-repeat", type=int, default=1)
    ap.add_argument("--conflict-repeat", type=int, default=4)
    ap.add_argument("--p-context", type=float, default=0.1)
    ap.add_argument("--pool-cf", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.run, args.step, args.first_window)
    splits = S.build_splits()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    recipe = (args.cb_repeat, args.pool_repeat, args.p_context, args.pool_cf, args.conflict_repeat)
    step, epoch, batches = 0, 100, []
    model.train()
    while step < args.steps:
        if not batches:
            epoch += 1
            batches = epoch_batches(tok, epoch_examples(splits, epoch, 0, *recipe), 0, epoch)
        loss = weighted_loss(model, collate(batches.pop(0), tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            res = {k: round(v, 3) for k, v in quick_eval(model, tok, splits).items()}
            print(json.dumps({"step": step, "loss": round(loss.item(), 3), **res}), flush=True)


if __name__ == "__main__":
    main()
