"""Cost of counting expert selections vs. plain forward passes over the same batches (issue: <= 1.15x).

    python benchmarks/routerlens_counting.py --threads 1 --repeats 3

Uses the demo model and ``conflict_tune``. "plain" runs the same padded batches (same order, same
``logits_to_keep=1``) without hooks; "count" is :func:`moe_interp.routerlens.count_selections` end to end
(tokenisation, span masks and hooks included). Runs alternate; reports the best of ``--repeats`` each.

``--memory-sizes 100 1000 10000`` also measures the memory of ``count_selections`` streaming that many
examples (the split's records repeated, fed as a generator), each size in a fresh subprocess: the resident
set size (RSS) polled every 2 ms, as the peak growth over the start during each streaming chunk (``64 *
batch_size`` examples: flat across chunks if nothing accumulates), the whole run's peak growth
(``ru_maxrss``: a maximum over the allocator's chunk-to-chunk noise, so it creeps up with run length even
when every chunk peaks alike) and the Python-heap peak (``tracemalloc``, in a separate run so that its
bookkeeping does not inflate the RSS numbers). ``--out`` writes it all as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
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


def memory(n: int, batch_size: int, spans: list[str]) -> dict:
    """Memory of counting ``n`` streamed examples (run in a fresh process; see the module docstring)."""
    torch.set_num_threads(1)
    model, tok = load_demo()
    exs = demo_examples("conflict_tune")
    chunk = 64 * batch_size  # count_selections streams (and sorts) this many examples at a time
    peaks: dict[int, float] = {}
    current = [0]
    stop = threading.Event()

    def poll() -> None:  # the RSS every 2 ms, as the peak of the chunk being processed
        while not stop.is_set():
            rss, c = _rss_mb(), current[0]
            peaks[c] = max(peaks.get(c, 0.0), rss)
            stop.wait(0.002)

    def stream():
        for i in range(n):
            current[0] = i // chunk  # chunk c is processed after its last example was taken
            yield exs[i % len(exs)]

    start_peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rss_mb()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    counts = count_selections(model, tok, stream(), spans=spans, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    poller.join()
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
    per_chunk = [round(peaks[c] - start, 1) for c in sorted(peaks)]
    later = per_chunk[1:]
    return dict(
        examples=n,
        seconds=round(seconds, 1),
        chunk=chunk,
        rss_start_mb=round(start, 1),
        chunk_peak_growth_mb=per_chunk,
        first_chunk_peak_growth_mb=per_chunk[0],
        later_chunks_peak_growth_mb=[min(later), max(later)] if later else None,
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
        later = row["later_chunks_peak_growth_mb"]
        print(
            f"  {n:6d} examples: {row['seconds']:7.1f} s, RSS peak growth in the first chunk "
            f"{row['first_chunk_peak_growth_mb']:.1f} MB, in each later chunk "
            f"{'n/a' if later is None else f'{later[0]:.1f}-{later[1]:.1f}'} MB; peak RSS growth "
            f"(ru_maxrss) {row['peak_rss_growth_mb']:.1f} MB, "
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
