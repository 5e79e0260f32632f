"""Cost of counting expert selections vs. plain forward passes over the same batches (issue: <= 1.15x).

    python benchmarks/routerlens_counting.py --threads 1 --repeats 3

Uses the demo model and ``conflict_tune``. "plain" runs the same padded batches (same order, same
``logits_to_keep=1``) without hooks; "count" is :func:`moe_interp.routerlens.count_selections` end to end
(tokenisation, span masks and hooks included). Runs alternate; reports the best of ``--repeats`` each.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_interp.demo import load_demo
from moe_interp.routerlens.counting import _encode, count_selections
from moe_interp.routerlens.data import demo_examples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--spans", default="prompt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_demo()
    exs = demo_examples("conflict_tune")
    spans = args.spans.split(",")
    items = [_encode(tok, ex, spans, "paper", i) for i, ex in enumerate(exs)]
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    batches = []
    for s in range(0, len(order), args.batch_size):
        group = [items[i].ids for i in order[s : s + args.batch_size]]
        width = max(map(len, group))
        ids = torch.full((len(group), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, g in enumerate(group):
            ids[b, : len(g)], mask[b, : len(g)] = torch.tensor(g), 1
        batches.append((ids, mask))

    def plain() -> None:
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def count() -> None:
        count_selections(model, tok, exs, spans=spans, batch_size=args.batch_size, progress=False)

    times = {"plain": float("inf"), "count": float("inf")}
    plain(), count()  # warm-up
    for _ in range(args.repeats):  # interleaved, best of each: fair under a shared, noisy CPU
        for name, fn in (("plain", plain), ("count", count)):
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    n_tok = sum(len(it.ids) for it in items)
    print(f"{len(exs)} examples, {n_tok} tokens, batch {args.batch_size}, threads {args.threads}")
    for name, t in times.items():
        print(f"  {name:6s} {t:.3f} s  ({n_tok / t:.0f} tokens/s)")
    print(f"  ratio count/plain = {times['count'] / times['plain']:.3f}")


if __name__ == "__main__":
    main()
