"""Step time and peak memory of CEFT vs FFT vs RT (and LoRA on all experts) on the demo model.

    python benchmarks/ceft_steps.py [--steps 20] [--batch-size 16] [--methods CEFT,FFT,RT,LoRA8-all]

Each method runs in a fresh subprocess through the real engine (:func:`moe_interp.ceft.train`, one epoch over
``steps * batch_size`` conflict_tune examples, no dev set, no checkpoints). Step time: median wall-clock
between optimizer steps after 2 warm-up steps. Peak memory: the process's peak RSS growth during training on
CPU (``ru_maxrss``), or ``torch.cuda.max_memory_allocated`` on GPU. The CE set: the first Router Lens
``experts_count_all.json`` found (runs/routerlens, runs/ceft/routerlens), else experts {0, 1} per layer
(the cost depends only on how many experts are trained).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CE_FILES = [
    ROOT / "runs/routerlens/experts_count_all.json",
    ROOT / "runs/ceft/routerlens/experts_count_all.json",
]


def worker(name: str, steps: int, batch_size: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from moe_interp.architectures import get_architecture
    from moe_interp.ceft import (
        CEFTConfig,
        ceft,
        full_fine_tuning,
        load_experts,
        lora_all_experts,
        router_tuning,
        train,
    )
    from moe_interp.demo import load_demo
    from moe_interp.routerlens.data import demo_examples

    model, tok = load_demo()
    layers = [m.number for m in get_architecture(model).moe_layers(model)]
    ce_file = next((f for f in CE_FILES if f.is_file()), None)
    ce = load_experts(ce_file) if ce_file else {n: [0, 1] for n in layers}
    methods = {
        "CEFT": ceft(ce),
        "FFT": full_fine_tuning(),
        "RT": router_tuning(),
        "LoRA8-all": lora_all_experts(8),
    }
    if name not in methods:
        raise SystemExit(f"unknown method {name!r}; choose from {sorted(methods)}")
    data = demo_examples("conflict_tune")[: steps * batch_size]
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    res = train(
        model,
        tok,
        data,
        None,
        method=methods[name],
        progress=False,
        config=CEFTConfig(lr=1e-4, epochs=1, batch_size=batch_size, warmup_ratio=0.0, checkpoint_every=10**9),
        callback=lambda step, logs: stamps.append(time.perf_counter()),
    )
    gaps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)][2:]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    return {
        "method": name,
        "trainable": res.trainable,
        "steps": len(stamps),
        "step_s_median": statistics.median(gaps),
        "step_s_min": min(gaps),
        "peak_mib": peak,
        "peak_kind": "cuda max allocated" if cuda else "RSS growth during training",
        "device": "cuda" if cuda else "cpu",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="CEFT,FFT,RT,LoRA8-all")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.threads)))
        return
    rows = []
    for name in args.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if run.returncode:
            raise SystemExit(f"{name} failed:\n{run.stderr[-2000:]}")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    kind = rows[0]["peak_kind"]
    print(f"| method | trainable | step time median (s) | min (s) | peak memory (MiB, {kind}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable']:,} | {r['step_s_median']:.3f} | {r['step_s_min']:.3f} | "
            f"{r['peak_mib']:.1f} |"
        )
    print(f"\n{args.steps} steps x batch {args.batch_size}, {rows[0]['device']}, {args.threads} thread(s)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
