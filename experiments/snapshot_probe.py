"""Experiment: where does a demo training snapshot decide between context and memory?

Loads one snapshot of a ``python -m moe_interp.demo.train`` run (its config rebuilt from the run's options),
prints the dev accuracies ``quick_eval`` logs, then Pc / Po on ``conflict_dev`` with the MoE output or the
attention output of one layer zeroed at a time. A layer whose MoE output moves Pc is a layer whose experts
carry the choice. ``--export DIR`` saves the snapshot as a model + tokenizer folder that
``python -m moe_interp.ceft.run --model DIR`` and ``moe-interp routerlens --model DIR`` take.

    python experiments/snapshot_probe.py runs/window --step 3250 --first-window 8 --export runs/window/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_interp.architectures import get_architecture
from moe_interp.demo import splits as S
from moe_interp.demo.train import FIRST_WINDOW, MODEL_KW, demo_config, export, quick_eval


def build(run: Path, step: int | None, first_window: int):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(run / "tokenizer")
    config, _ = demo_config(tok, dict(MODEL_KW), first_window)
    model = AutoModelForCausalLM.from_config(config)
    path = run / "snapshots" / f"step{step:05d}.safetensors" if step else run / "ckpt" / "model.safetensors"
    model.load_state_dict(load_file(str(path)))
    return model.eval(), tok


def _zeroed(module: torch.nn.Module):
    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    return module.register_forward_hook(hook)


def ablations(model, tok, splits) -> list[dict]:
    arch = get_architecture(model)
    rows = []
    for layer in arch.moe_layers(model):
        for part, module in (("moe", layer.block), ("attention", model.model.layers[layer.number].self_attn)):
            handle = _zeroed(module)
            try:
                res = quick_eval(model, tok, splits)
            finally:
                handle.remove()
            rows.append(
                {"layer": layer.number, "zeroed": part, "pc_dev": res["pc_dev"], "po_dev": res["po_dev"]}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a demo.train --out folder")
    ap.add_argument("--step", type=int, default=None, help="snapshot step (default: the latest checkpoint)")
    ap.add_argument("--first-window", type=int, default=FIRST_WINDOW, help="the run's --first-window")
    ap.add_argument("--export", type=Path, default=None, help="save the snapshot as a model folder here")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.run, args.step, args.first_window)
    splits = S.build_splits()
    base = quick_eval(model, tok, splits)
    print(json.dumps({"base": base}), flush=True)
    rows = [] if args.no_ablations else ablations(model, tok, splits)
    model.eval()
    if args.export:
        export(model, tok, args.export)
        print(f"exported to {args.export}")
    out = args.run / f"probe_step{args.step or 'ckpt'}.json"
    out.write_text(json.dumps({"base": base, "ablations": rows}, indent=1))


if __name__ == "__main__":
    main()
