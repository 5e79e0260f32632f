"""CEFT and its baselines on the demo model, checkpointed and resumable.

    python -m moe_interp.ceft.run --out runs/ceft

1. CE: ``--experts`` (a Router Lens ``experts_*.json``), else ``runs/routerlens/experts_count_all.json`` if
   it exists, else computed here with Router Lens (router tuning on ``conflict_tune``, selection counts,
   the paper's ``count`` rule) into ``<out>/routerlens/``;
2. train CEFT, FFT, RT, random experts (same count per layer, seeded), LoRA on all experts (and CEFT-LoRA
   with ``--ceft-lora``; ``--ce-per-layer 2,4,6`` trains CEFT-K and Random-K-seed for each count K, the K
   best-ranked experts per layer of the experts file; with ``--controls`` also every expert, and attention
   only, to show where the model's choice can be moved) on ``conflict_tune`` with the same data, epochs
   and batch size (dev loss on ``conflict_dev`` picks the best epoch); each into ``<out>/<method>/``;
3. evaluate Base and every method on ``conflict_test`` (EM / F1 / Pc / Po) and closed-book on memorised
   facts (forgetting); ``rows.csv``, ``table.csv``, ``table.md``, ``figure.html`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from moe_interp.ceft.engine import CEFTConfig, CEFTResult, train
from moe_interp.ceft.report import evaluate_methods, figure, markdown_table, paper_table
from moe_interp.ceft.targets import (
    Method,
    all_experts,
    attention_only,
    ceft,
    count_parameters,
    full_fine_tuning,
    load_experts,
    lora_all_experts,
    random_experts_method,
    router_tuning,
)
from moe_interp.ceft.train import config_args, config_from, load_model
from moe_interp.errors import InputError
from moe_interp.routerlens.data import demo_examples, to_examples

DEFAULT_CE = Path("runs/routerlens/experts_count_all.json")
DEFAULT_LRS = "FFT=3e-4,Attention=3e-4,RT=3e-3,LoRA8-all=3e-3,CEFT-LoRA8=3e-3"


def _log(msg: str) -> None:
    print(f"[ceft {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_ce(args: argparse.Namespace, model, tok, train_ex, dev_ex, out: Path) -> tuple[dict, str]:
    """The CE set and where it came from."""
    if args.experts:
        return load_experts(args.experts), str(args.experts)
    if DEFAULT_CE.is_file():
        from moe_interp.demo import WEIGHTS_DIR

        weights = WEIGHTS_DIR / "model.safetensors"
        if args.model is None and weights.is_file() and weights.stat().st_mtime > DEFAULT_CE.stat().st_mtime:
            _log(f"warning: {DEFAULT_CE} predates the demo weights (another model's CE?); pass --experts")
        return load_experts(DEFAULT_CE), str(DEFAULT_CE)
    own = out / "routerlens" / "experts_count_all.json"
    if not own.is_file():
        from moe_interp.routerlens import (
            RouterTuningConfig,
            applied_router_weights,
            count_selections,
            identify_experts,
            tune_routers,
        )
        from moe_interp.routerlens.run import DEMO_LR

        # the same settings as `python -m moe_interp.routerlens.run` (its demo learning rate on the demo)
        cfg = RouterTuningConfig(lr=DEMO_LR) if args.model is None else RouterTuningConfig()
        _log(f"no Router Lens output: router tuning (lr {cfg.lr}) + selection counts for the CE")
        rt = tune_routers(
            model, tok, train_ex, dev_ex, config=cfg, out=out / "routerlens" / "rt", progress=False
        )
        with applied_router_weights(model, rt.weights):
            counts = count_selections(model, tok, train_ex, spans=("all",), batch_size=32, progress=False)
        identify_experts(counts, span="all", method="count").save(own)
    return load_experts(own), str(own)


def parse_lrs(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--lrs: {part!r} is not NAME=LR (e.g. FFT=3e-4)") from None
    return out


def ce_counts(text: str | None) -> list[int]:
    """``--ce-per-layer``: comma-separated experts-per-layer counts (empty: the experts file's own CE)."""
    try:
        return [int(p) for p in (text or "").split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--ce-per-layer: {text!r} is not a comma-separated list of integers") from None


def _methods(args: argparse.Namespace, ces: dict[int | None, dict], n_experts: int) -> list[Method]:
    """The methods this run trains (``--methods`` selects among them; unknown names are refused).

    ``ces`` maps an experts-per-layer count (``None``: the experts file's own CE) to the CE set; each count
    gets its CEFT, random-expert controls with as many experts per layer (and CEFT-LoRA)."""
    seeds = [int(s) for s in args.random_seeds.split(",") if s.strip()]
    expert_methods: list[Method] = []
    for k, ce in ces.items():
        tag = "" if k is None else f"-{k}"
        expert_methods.append(ceft(ce, name=f"CEFT{tag}"))
        expert_methods += [
            random_experts_method(ce, n_experts, s, name=f"Random{tag}-{s}" if tag else f"Random-{s}")
            for s in seeds
        ]
        if args.ceft_lora:
            expert_methods.append(ceft(ce, lora_rank=args.lora_rank, name=f"CEFT{tag}-LoRA{args.lora_rank}"))
    methods = [
        *[m for m in expert_methods if m.name.startswith("CEFT") and "LoRA" not in m.name],
        full_fine_tuning(),
        router_tuning(),
        *[m for m in expert_methods if m.name.startswith("Random")],
        lora_all_experts(args.lora_rank),
        *[m for m in expert_methods if "LoRA" in m.name],
    ]
    if args.controls:
        methods += [all_experts(), attention_only()]
    if not args.methods:
        return methods
    keep = {m.strip() for m in args.methods.split(",") if m.strip()}
    unknown = sorted(keep - {m.name for m in methods})
    if unknown:
        raise InputError(
            f"--methods: unknown method(s) {unknown}; this run has {[m.name for m in methods]} "
            "(--ceft-lora and --controls add more)"
        )
    return [m for m in methods if m.name in keep]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ceft", help="output folder, resumable (default: %(default)s)")
    p.add_argument("--model", default=None, help="a saved model + tokenizer folder (default: demo model)")
    p.add_argument("--experts", default=None, help="Router Lens experts JSON (default: see above)")
    p.add_argument(
        "--lrs",
        default="",
        help=f"per-method learning rates NAME=LR, added to the defaults {DEFAULT_LRS} (others: --lr)",
    )
    p.add_argument(
        "--ce-per-layer",
        default=None,
        metavar="K[,K...]",
        help="CE per layer: the K best-ranked experts of every layer in the experts file (one CEFT-K and "
        "random-expert controls per K; default: the file's own CE, named CEFT)",
    )
    p.add_argument("--random-seeds", default="0", help="comma-separated seeds of random-expert controls")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--ceft-lora", action="store_true", help="also train LoRA on the CE")
    p.add_argument(
        "--controls",
        action="store_true",
        help="also train every expert (All-experts) and attention only (Attention; default lr 3e-4 as FFT)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the run's methods: CEFT (or CEFT-K with --ce-per-layer), FFT, RT, "
        "Random-SEED (Random-K-SEED), LoRA8-all, CEFT-LoRA8 (--ceft-lora), All-experts and Attention "
        "(--controls)",
    )
    p.add_argument("--test-limit", type=int, default=None, help="first N conflict_test records (all)")
    p.add_argument(
        "--memorised-limit", type=int, default=400, help="memorised facts asked closed-book (forgetting)"
    )
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    config_args(p)
    p.set_defaults(lr=3e-3, epochs=3, batch_size=16, threads=1)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    from moe_interp.architectures import get_architecture

    n_experts = get_architecture(model).num_experts(model.config)
    train_ex, dev_ex = demo_examples("conflict_tune"), demo_examples("conflict_dev")
    lrs = {**parse_lrs(DEFAULT_LRS), **parse_lrs(args.lrs)}
    ks = ce_counts(args.ce_per_layer)
    _methods(args, {k: {} for k in ks or [None]}, n_experts)  # names checked before any training
    ce, ce_source = find_ce(args, model, tok, train_ex, dev_ex, out)
    _log(f"CE from {ce_source}: {ce}")
    ces: dict[int | None, dict] = {None: ce}
    if ks:
        ces = {k: load_experts(ce_source, per_layer=k) for k in ks}
        _log("CE per layer count: " + "; ".join(f"{k}: {v}" for k, v in ces.items()))
    methods = _methods(args, ces, n_experts)
    cfg = config_from(args)
    results: dict[str, CEFTResult | None] = {"Base": None}
    for m in methods:
        m = Method(m.name, m.kind, m.experts, m.lora_rank, m.lora_alpha, lrs.get(m.name, args.lr), m.meta)
        _log(f"training {m.name} (lr {m.lr})")
        res = train(model, tok, train_ex, dev_ex, method=m, config=cfg, out=out / m.name, progress=False)
        results[m.name] = res
        _log(
            f"    {m.name}: {res.trainable:,} trainable, best step {res.best_step}, dev loss "
            f"{res.best_dev_loss:.4f}, {res.seconds:.0f} s"
        )

    from moe_interp.demo import load_split

    mem_records = [r for r in load_split("memorised") if r.get("role") == "train"][: args.memorised_limit]
    memorised = to_examples(mem_records)
    datasets = {"conflict_test": demo_examples("conflict_test", args.test_limit), "memorised": memorised}
    _log(f"evaluating {list(results)} on {[(k, len(v)) for k, v in datasets.items()]}")
    rows = evaluate_methods(
        model,
        tok,
        results,
        datasets,
        out=out / "eval",
        total=count_parameters(model),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.eval_batch_size,
    )
    table = paper_table(rows)
    rows.to_csv(out / "rows.csv", index=False)
    table.to_csv(out / "table.csv")
    (out / "table.md").write_text(markdown_table(table))
    figure(rows).write_html(out / "figure.html", include_plotlyjs="cdn")
    command = "python -m moe_interp.ceft.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = _report(table, results, cfg, ces, ce_source, command, datasets)
    (out / "report.md").write_text(report)
    print(report)
    return out


def _report(table, results, cfg: CEFTConfig, ces, ce_source: str, command: str, datasets) -> str:
    lines = [
        "# CEFT and baselines on the demo model",
        "",
        f"Command: `{command}`",
        "",
        *[
            f"CE{'' if k is None else f' ({k} per layer)'} from {ce_source}: "
            + json.dumps({str(layer): v for layer, v in ce.items()})
            for k, ce in ces.items()
        ],
        "Training: conflict_tune, dev conflict_dev; "
        + json.dumps({k: v for k, v in cfg.to_dict().items() if k != "lr"})
        + " (learning rates per method below)",
        "",
        markdown_table(table),
        "Per method: "
        + "; ".join(
            f"{n}: lr {r.method.lr}, best step {r.best_step}, dev loss {r.best_dev_loss:.4f}, "
            f"{r.seconds:.0f} s"
            for n, r in results.items()
            if r is not None
        ),
        "",
        f"n = {', '.join(f'{k} {len(v)}' for k, v in datasets.items())}. EM / F1 in %, greedy answers; "
        "memorised = closed-book accuracy on memorised training facts (forgetting).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from moe_interp.errors import run_main

    run_main("python -m moe_interp.ceft.run", main)
