"""Reproduce the layer-wise CAG/AAG and APG figures and the expert attribution on the demo model.

    python -m moe_interp.analysis.run --out runs/analysis [--tuned ROUTER_WEIGHTS] [--limit 200]

Comparison: with a router-tuning output (``--tuned``, a folder or ``.safetensors`` from
:mod:`moe_interp.routerlens.tuning`; default: ``moe_interp/demo/weights/router_tuned`` if present) the
router-tuned model is compared with the base model. Without one, the full model is compared with the
same model with its context-faithful experts (CE) masked, CE being the ``--ce-per-layer`` experts per layer
whose masking lowers the context answer's log-probability most (exact attribution on the first
``--attr-limit`` examples); gains then measure what the CE add. Writes CSVs, HTML figures (PNG too when
kaleido is installed), ``summary.json`` and ``README.md`` (with the command) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from moe_interp.analysis.amplification import amplification_by_experts, ce_oe_sets
from moe_interp.analysis.attribution import gradient_effects, masking_effects, rank_agreement
from moe_interp.analysis.figures import apg_figure, expert_heatmap, gains_figure, token_difference_figure
from moe_interp.analysis.gains import answer_probability_gain, attention_gains
from moe_interp.analysis.lens import answer_lens
from moe_interp.analysis.spans import span_attention
from moe_interp.analysis.tokens import token_attention, token_attention_difference

DEFAULT_TUNED = Path(__file__).resolve().parents[1] / "demo" / "weights" / "router_tuned"


def _save(fig, out: Path, name: str) -> list[str]:
    fig.write_html(out / f"{name}.html", include_plotlyjs="cdn")
    written = [f"{name}.html"]
    try:
        fig.write_image(out / f"{name}.png", scale=2)
        written.append(f"{name}.png")
    except Exception:  # noqa: BLE001 - kaleido missing or broken: HTML only
        pass
    return written


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/analysis")
    p.add_argument("--split", default="conflict_test")
    p.add_argument("--limit", type=int, default=200, help="examples for CAG/AAG/APG")
    p.add_argument("--attr-limit", type=int, default=100, help="examples for expert attribution")
    p.add_argument("--tuned", default=None, help="router-tuning output (folder or .safetensors)")
    p.add_argument("--ce-per-layer", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from moe_interp.demo import load_demo, load_split
    from moe_interp.routerlens.masking import mask_experts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_demo()
    records = load_split(args.split)
    examples, attr_examples = records[: args.limit], records[: args.attr_limit]
    bs, t0, figures = args.batch_size, time.time(), []
    summary: dict = {"command": "python -m moe_interp.analysis.run " + shlex.join(argv or sys.argv[1:])}

    # per-expert attribution: exact vs gradient estimates
    exact = masking_effects(model, tok, attr_examples, batch_size=bs, progress=True)
    weight = gradient_effects(model, tok, attr_examples, batch_size=bs)
    swap = gradient_effects(model, tok, attr_examples, method="swap", batch_size=bs)
    frame = exact.frame()
    frame["grad_weight"] = weight.frame()["delta_logprob"]
    frame["grad_swap"] = swap.frame()["delta_logprob"]
    frame.to_csv(out / "expert_effects.csv", index=False)
    summary["spearman_weight_vs_exact"] = rank_agreement(exact, weight)
    summary["spearman_swap_vs_exact"] = rank_agreement(exact, swap)
    summary["attribution_examples"] = len(attr_examples)
    figures += _save(
        expert_heatmap(frame, title="exact effect of masking each expert on log p(context answer)"),
        out,
        "expert_effects",
    )
    figures += _save(expert_heatmap(frame, value="delta_context_rate"), out, "expert_context_rate")
    sets = ce_oe_sets(exact, per_layer=args.ce_per_layer)
    summary["expert_sets"] = {k: {str(l): v for l, v in s.items()} for k, s in sets.items()}

    # the comparison: tuned vs base, or full vs CE-masked
    tuned_path = Path(args.tuned) if args.tuned else (DEFAULT_TUNED if DEFAULT_TUNED.exists() else None)
    if tuned_path is not None:
        from moe_interp.routerlens.tuning import applied_router_weights

        def base_ctx() -> AbstractContextManager:
            return nullcontext()

        def tuned_ctx() -> AbstractContextManager:
            return applied_router_weights(model, tuned_path)

        summary["comparison"] = f"router-tuned ({tuned_path}) vs base"
    else:

        def base_ctx() -> AbstractContextManager:
            return mask_experts(model, sets["CE"])

        def tuned_ctx() -> AbstractContextManager:
            return nullcontext()

        summary["comparison"] = "full model vs CE-masked model (gains = what the CE add)"
    with base_ctx():
        att_b = span_attention(model, tok, examples, batch_size=bs)
        lens_b = answer_lens(model, tok, examples, batch_size=bs)
        tok_b = token_attention(model, tok, examples[0])
    with tuned_ctx():
        att_t = span_attention(model, tok, examples, batch_size=bs)
        lens_t = answer_lens(model, tok, examples, batch_size=bs)
        tok_t = token_attention(model, tok, examples[0])
    gains, apg = attention_gains(att_b, att_t), answer_probability_gain(lens_b, lens_t)
    gains.to_csv(out / "cag_aag.csv", index=False)
    apg.to_csv(out / "apg.csv", index=False)
    diff = token_attention_difference(tok_b, tok_t)
    diff.to_csv(out / "token_difference.csv", index=False)
    summary["examples"] = len(examples)
    summary["cag_aag"] = gains.to_dict(orient="records")
    summary["apg"] = apg.to_dict(orient="records")
    figures += _save(gains_figure(gains, title=f"CAG / AAG ({summary['comparison']})"), out, "cag_aag")
    figures += _save(apg_figure(apg, title=f"APG ({summary['comparison']})"), out, "apg")
    figures += _save(token_difference_figure(diff, title=f"example {examples[0]['id']}"), out, "token_diff")

    amp = amplification_by_experts(model, tok, examples, sets, batch_size=bs)
    amp.to_csv(out / "amplification.csv", index=False)
    summary["amplification"] = amp.to_dict(orient="records")
    summary["figures"] = figures
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _readme(out, summary, gains, apg, amp)
    return summary


def _readme(out: Path, summary: dict, gains, apg, amp) -> None:
    fmt = dict(index=False, floatfmt=".4f")
    try:
        tables = [gains.to_markdown(**fmt), apg.to_markdown(**fmt), amp.to_markdown(**fmt)]
    except ImportError:  # tabulate not installed
        tables = [gains.to_string(index=False), apg.to_string(index=False), amp.to_string(index=False)]
    text = (
        f"# Demo analysis\n\nCommand: `{summary['command']}`  ({summary['seconds']} s)\n\n"
        f"Comparison: {summary['comparison']}; {summary['examples']} examples.\n\n"
        f"Spearman (fast vs exact expert ranking, {summary['attribution_examples']} examples): "
        f"weight {summary['spearman_weight_vs_exact']:.3f}, swap {summary['spearman_swap_vs_exact']:.3f}\n\n"
        f"## CAG / AAG\n\n{tables[0]}\n\n## APG\n\n{tables[1]}\n\n## Amplification (CE vs OE masked)\n\n"
        f"{tables[2]}\n"
    )
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    from moe_interp.errors import run_main

    run_main("python -m moe_interp.analysis.run", main)
