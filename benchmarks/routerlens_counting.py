"""Cost of counting expert selections vs. plain forward passes over the same batches (issue: <= 1.15x).

    python benchmarks/routerlens_counting.py --threads 1 --repeats 3

Uses the demo model and ``conflict_tune``. "plain" runs the same padded batches (same order, same
``logits_to_keep=1``) without hooks; "count" is :func:`moe_interp.routerlens.count_selections` end to end
(tokenisation, span masks and hooks included). Runs alternate; reports the best of ``--repeats`` each.

``--memory-sizes 100 1000 10000`` also measures peak memory of ``count_selections`` streaming that many
examples (the split's records repeated, fed as a generator), each size in a fresh subprocess: peak resident
set size growth (``ru_maxrss``) and the Python-heap peak (``tracemalloc``). ``--out`` writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import torch

from moe_interp.demo import load_demo
from moe_interp.routerlens.counting import _encode, count_selections
from moe_interp.routerlens.data import demo_examples


def memory(n: int, batch_size: int, spans: list[str]) -> dict:
    """Peak memory of counting ``n`` streamed examples (run in a fresh process)."""
    torch.set_num_threads(1)
    model, tok = load_demo()
    exs = demo_examples("conflict_tune")
    stream = (exs[i % len(exs)] for i in range(n))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    counts = count_selections(model, tok, stream, spans=spans, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    assert counts.n_examples == n, (counts.n_examples, n)
    return dict(
        examples=n,
        seconds=round(seconds, 1),
        rss_growth_mb=round(grow / 1024, 1),
        python_heap_peak_mb=round(heap / 2**20, 2),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--spans", default="prompt")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[])
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples (smoke runs)")
    p.add_argument("--_memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spans = args.spans.split(",")
    if args._memory_child is not None:
        print(json.dumps(memory(args._memory_child, args.batch_size, spans)))
        return
    torch.set_num_threads(args.threads)
    model, tok = load_demo()
    exs = demo_examples("conflict_tune", limit=args.limit)
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
    result = {
        "examples": len(exs),
        "tokens": n_tok,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "spans": spans,
        "plain_tokens_per_s": round(n_tok / times["plain"]),
        "count_tokens_per_s": round(n_tok / times["count"]),
        "ratio": round(times["count"] / times["plain"], 3),
        "memory": [],
    }
    for n in args.memory_sizes:
        cmd = [sys.executable, __file__, "--_memory-child", str(n), "--batch-size", str(args.batch_size)]
        line = subprocess.run(cmd + ["--spans", args.spans], check=True, capture_output=True, text=True)
        row = json.loads(line.stdout.strip().splitlines()[-1])
        result["memory"].append(row)
        print(
            f"  {n:6d} examples: {row['seconds']:7.1f} s, peak RSS growth {row['rss_growth_mb']:.1f} MB, "
            f"Python heap peak {row['python_heap_peak_mb']:.2f} MB",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
