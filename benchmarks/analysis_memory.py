"""Peak memory of data-set-level span attention and logit lens as the number of examples grows.

    python benchmarks/analysis_memory.py [--sizes 100 1000 3000] [--model demo|tiny]

Each size runs in a fresh subprocess (so peaks do not carry over) and reports the peak resident set size
(``resource.getrusage``: ru_maxrss) and the Python-heap peak during the analysis (``tracemalloc``) with
``keep="mean"`` (only per-layer running sums are kept). Examples are the demo's conflict records repeated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc


def measure(n: int, model_name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from moe_interp.analysis import span_attention
    from moe_interp.demo import load_split

    if model_name == "demo":
        from moe_interp.demo import load_demo

        model, tok = load_demo()
    else:
        from tests.conftest import make_model, make_tokenizer

        model, tok = make_model("olmoe"), make_tokenizer()
    records = load_split("conflict_test")
    examples = ({**records[i % len(records)], "id": str(i)} for i in range(n))  # a generator: streamed
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.time()
    res = span_attention(model, tok, examples, batch_size=16, keep="mean")
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "examples": res.n,
        "seconds": round(time.time() - t0, 1),
        "tracemalloc_peak_mb": round(heap_peak / 2**20, 2),
        "rss_before_mb": round(start_rss / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000])
    p.add_argument("--model", choices=["demo", "tiny"], default="demo")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.model)))
        return
    print(f"{'examples':>9} {'seconds':>8} {'py-heap peak MB':>16} {'RSS before MB':>14} {'peak RSS MB':>12}")
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--model", args.model],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['examples']:>9} {r['seconds']:>8} {r['tracemalloc_peak_mb']:>16} "
            f"{r['rss_before_mb']:>14} {r['peak_rss_mb']:>12}",
            flush=True,
        )


if __name__ == "__main__":
    main()
