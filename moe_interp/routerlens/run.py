"""The whole Router Lens pipeline on the demo model, checkpointed and resumable.

    python -m moe_interp.routerlens.run --out runs/routerlens

Stages (each skipped when its output exists, so a killed run continues where it stopped):

1. ``rt/``: router tuning on ``conflict_tune`` (dev loss on ``conflict_dev``), paper defaults;
2. ``counts_base.json`` / ``counts_tuned.json``: expert selections on ``conflict_tune`` (base / tuned);
3. ``experts.json``: CE (paper rule by default) and the OE control set;
4. ``compare_<method>_<span>/``: Base, RT, RT w/o OE (several seeds), RT w/o CE on ``conflict_test``
   (one results JSONL per condition), ``summary.csv``, ``runs.csv``, ``figure.html`` and ``report.md`` with
   the numbers and the command (also copied to ``<out>/report.md``).

Other ``--span`` / ``--method`` values reuse the tuned routers and the counts of the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from moe_interp.routerlens.compare import compare, paper_conditions
from moe_interp.routerlens.counting import SPANS, SelectionCounts, count_selections
from moe_interp.routerlens.data import demo_examples
from moe_interp.routerlens.experts import METHODS, ExpertSets, identify_experts
from moe_interp.routerlens.tuning import RouterTuningConfig, applied_router_weights, tune_routers

DEMO_LR = 3e-3  # RT on the demo: +12 Pc points at 3e-3, +3 at the paper's 5e-4 (n = 400, README)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/routerlens", help="output folder (resumable)")
    p.add_argument("--model", default=None, help="a saved model + tokenizer folder (default: the demo model)")
    d = RouterTuningConfig()
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"router learning rate (default: {DEMO_LR} on the demo model, whose routers are 4 x 16 x 128; "
        f"the paper's {d.lr} with --model)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lora-rank", type=int, default=0, help="0 = tune all router weights")
    p.add_argument(
        "--eval-every", type=int, default=None, help="dev-loss evaluation interval (default: epoch)"
    )
    p.add_argument(
        "--span", choices=SPANS, default="all", help="tokens counted (paper: prompt + answer = all)"
    )
    p.add_argument("--method", choices=METHODS, default="count", help="CE rule (paper: count)")
    p.add_argument("--k", type=int, default=None, help="CE per layer (default: the model's top-k)")
    p.add_argument("--oe-seeds", default="0,1,2,3,4", help="comma-separated OE draws")
    p.add_argument("--test-split", default="conflict_test")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def _load(folder: str | None):
    if folder is None:
        from moe_interp.demo import load_demo

        return load_demo()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _log(msg: str) -> None:
    print(f"[routerlens {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = _load(args.model)
    train, dev = demo_examples("conflict_tune"), demo_examples("conflict_dev")
    test = demo_examples(args.test_split, args.limit)
    if args.lr is None:
        args.lr = DEMO_LR if args.model is None else RouterTuningConfig().lr
    cfg = RouterTuningConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        lora_rank=args.lora_rank,
        eval_every=args.eval_every,
    )
    _log(f"1/4 router tuning on conflict_tune ({len(train)}), dev conflict_dev ({len(dev)})")
    rt = tune_routers(model, tok, train, dev, config=cfg, out=out / "rt")
    _log(f"    best step {rt.best_step}, dev loss {rt.best_dev_loss:.4f}; history {rt.history}")

    counts: dict[str, SelectionCounts] = {}
    for name in ("base", "tuned"):
        path = out / f"counts_{name}.json"
        if path.is_file():
            counts[name] = SelectionCounts.load(path)
            continue
        _log(f"2/4 counting selections on conflict_tune ({name} routers)")
        if name == "tuned":
            with applied_router_weights(model, rt.weights):
                c = count_selections(model, tok, train, spans=SPANS, batch_size=32)
        else:
            c = count_selections(model, tok, train, spans=SPANS, batch_size=32)
        counts[name] = c
        c.save(path)

    tag = f"{args.method}_{args.span}" + ("" if args.k is None else f"_k{args.k}")  # k changes the CE
    experts_path = out / f"experts_{tag}.json"
    if experts_path.is_file():
        experts = ExpertSets.load(experts_path)
    else:
        experts = identify_experts(
            counts["tuned"], counts["base"], span=args.span, method=args.method, k=args.k
        )
        experts.save(experts_path)
    _log(f"3/4 CE ({args.method}, span {args.span}): {experts.ce()}  OE(seed 0): {experts.oe()}")

    seeds = [int(s) for s in args.oe_seeds.split(",") if s.strip()]
    _log(f"4/4 comparison on {args.test_split} ({len(test)} examples), OE seeds {seeds}")
    folder = out / f"compare_{tag}"
    res = compare(
        model,
        tok,
        test,
        paper_conditions(rt.weights, experts, seeds),
        out=folder,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size,
    )
    res.summary.to_csv(folder / "summary.csv", index=False)
    res.runs.to_csv(folder / "runs.csv", index=False)
    res.figure().write_html(folder / "figure.html", include_plotlyjs="cdn")
    command = "python -m moe_interp.routerlens.run " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    report = _report(res.summary, experts, rt, counts, args, command)
    (folder / "report.md").write_text(report)
    (out / "report.md").write_text(report)  # the latest run's report
    print(report)
    return out


def _report(summary, experts: ExpertSets, rt, counts, args, command: str) -> str:
    lines = [
        "# Router Lens on the demo model",
        "",
        f"Command: `{command}`",
        "",
        f"RT: {json.dumps(rt.config.to_dict())}; best step {rt.best_step}, dev loss {rt.best_dev_loss:.4f}.",
        f"CE ({args.method}, span {args.span}, k={experts.k}): {experts.ce()}",
        "",
        "| condition | runs | EM | F1 | Pc | Po | dPc vs Base (paired SE) | dPc vs RT (paired SE) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():

        def cell(m: str, r=r) -> str:
            sd = f", sd {_pct(r[f'{m}_sd'])}" if r["runs"] > 1 else ""
            return f"{_pct(r[m])} ± {_pct(r[f'{m}_se'])}{sd}"

        lines.append(
            f"| {r['condition']} | {r['runs']} | {cell('EM')} | {cell('F1')} | {cell('Pc')} | {cell('Po')} | "
            f"{_pct(r.get('dPc_vs_base'))} ± {_pct(r.get('dPc_vs_base_se'))} | "
            f"{_pct(r.get('dPc_vs_RT'))} ± {_pct(r.get('dPc_vs_RT_se'))} |"
        )
    lines += [
        "",
        f"n = {int(summary['n'].iloc[0])} {args.test_split} examples; values in %, ± standard error "
        "(OE: mean over seeds, sd = spread over seeds). Greedy answers (max "
        f"{args.max_new_tokens} new tokens), Pc/Po by `contains` match.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from moe_interp.errors import run_main

    run_main("python -m moe_interp.routerlens.run", main)
