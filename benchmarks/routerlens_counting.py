"""Cost of counting expert selections vs. plain forward passes over the same batches (issue: <= 1.15x).

    python benchmarks/routerlens_counting.py --threads 1 --repeats 3

Uses the demo model and ``conflict_tune``. "plain" runs the same padded batches (same order, same
``logits_to_keep=1``) without hooks; "count" is :func:`moe_interp.routerlens.count_selections` end to end
(tokenisation, span masks and hooks included). Runs alternate; reports the best of ``--repeats`` each.

``--memory-sizes 100 1000 10000`` also measures the memory of ``count_selections`` streaming that many
examples (the split's records repeated, fed as a generator), each size in a fresh subprocess: the resident
set size (RSS) sampled every 1,000 examples while it runs (its least-squares slope in MB per 1,000 examples
after the first 2,048, i.e. after the first chunk has set up every buffer: ~0 if nothing accumulates), the
peak RSS growth (``ru_maxrss``: a maximum over allocator noise, so it creeps up with run length even when the
samples are flat) and the Python-heap peak (``tracemalloc``, in a separate run so that its bookkeeping does
not inflate the RSS numbers). ``--out`` writes it all as JSON.
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


def _rss_mb() -> float:
    """Current resident set size in MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (examples, MB) points, in MB per 1,000 examples (0 for fewer than 2)."""
    if len(points) < 2:
        return 0.0
    xs, ys = [x / 1000 for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def memory(n: int, batch_size: int, spans: list[str]) -> dict:
    """Memory of counting ``n`` streamed examples (run in a fresh process; see the module docstring)."""
    torch.set_num_threads(1)
    model, tok = load_demo()
    exs = demo_examples("conflict_tune")
    samples: list[tuple[int, float]] = []

    def stream():
        for i in range(n):
            if i % 1000 == 0:
                samples.append((i, _rss_mb()))
            yield exs[i % len(exs)]

    start_peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rss_mb()
    t0 = time.perf_counter()
    counts = count_selections(model, tok, stream(), spans=spans, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    samples.append((n, _rss_mb()))
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_peak
    assert counts.n_examples == n, (counts.n_examples, n)
    tracemalloc.start()  # a second, shorter pass only for the Python heap (tracemalloc costs RSS itself)
    count_selections(
        model,
        tok,
        (exs[i % len(exs)] for i in range(min(n, 3000))),
        spans=spans,
        batch_size=batch_size,
        progress=False,
    )
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    steady = [(x, y) for x, y in samples if x >= 2048]
    return dict(
        examples=n,
        seconds=round(seconds, 1),
        rss_start_mb=round(start, 1),
        rss_end_mb=round(samples[-1][1], 1),
        rss_max_sample_growth_mb=round(max(y for _, y in samples) - start, 1),
        rss_slope_mb_per_1k=round(_slope(steady), 2) if len(steady) >= 2 else None,
        rss_samples=[(x, round(y, 1)) for x, y in samples],
        peak_rss_growth_mb=round(grow / 1024, 1),
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
        slope = row["rss_slope_mb_per_1k"]
        print(
            f"  {n:6d} examples: {row['seconds']:7.1f} s, RSS {row['rss_start_mb']:.0f} -> "
            f"{row['rss_end_mb']:.0f} MB (largest sample +{row['rss_max_sample_growth_mb']:.1f} MB, slope "
            f"{'n/a' if slope is None else f'{slope:+.2f}'} MB per 1k examples), peak RSS growth "
            f"{row['peak_rss_growth_mb']:.1f} MB, Python heap peak {row['python_heap_peak_mb']:.2f} MB",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
