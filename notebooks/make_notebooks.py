"""Writes the notebooks in this folder from the cell sources below (outputs stripped).

Run ``python notebooks/make_notebooks.py`` after editing; the test suite executes every notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    new_markdown_cell(
        "# Quick start: tracing an MoE model\n\n"
        "`moe_interp.trace(model, prompt)` runs one forward pass and records what every MoE layer did: the "
        "router logits, the experts chosen and the weights applied, and how much attention each token pays to "
        "the context and to the answer inside it. This notebook uses the embedded demo model (a small OLMoE "
        "trained on CounterFact facts) on a *conflict* example: the context states a counterfactual object, "
        "the model memorised the true one."
    ),
    new_code_cell(
        "import torch\n\n"
        "import moe_interp\n"
        "from moe_interp.demo import load_split\n"
        "from moe_interp.prompts import build_prompt\n\n"
        "torch.set_num_threads(1)\n"
        "model, tok = moe_interp.load_demo()\n"
        "example = load_split('conflict_test')[0]\n"
        "example"
    ),
    new_code_cell(
        "prompt = build_prompt(example['context'], example['question'])\n"
        "t = moe_interp.trace(model, prompt, context=example['context'], answer=example['context_answer'],\n"
        "                     tokenizer=tok)\n"
        "print(prompt)\n"
        "t.router_logits.shape, t.topk_indices.shape, t.attn_to_spans.shape, t.spans"
    ),
    new_markdown_cell(
        "Shapes: `[L, N, E]` = MoE layers x tokens x experts; `topk_indices` / `topk_weights` are `[L, N, k]`; "
        "`attn_to_spans` is `[A, N, H, S]` (attention layers x tokens x heads x spans). What did the model "
        "answer?"
    ),
    new_code_cell(
        "top = t.next_token_logits[0].softmax(-1).topk(5)\n"
        "best = [(tok.decode([int(i)]), round(float(p), 3)) for p, i in zip(top.values, top.indices, strict=True)]\n"
        "best, example['context_answer'], example['true_object']"
    ),
    new_markdown_cell("## Routing, token by token\n\nHover over a cell for the top-k experts and their weights."),
    new_code_cell("t.plot_routing()"),
    new_code_cell(
        "frame = t.routing_frame()\n"
        "frame[frame.selected].groupby(['layer', 'span']).expert.agg(lambda e: e.value_counts().index[0])"
    ),
    new_markdown_cell("## Which experts read the context?\n\nSelection counts over a batch of conflict prompts:"),
    new_code_cell(
        "batch = load_split('conflict_test')[:32]\n"
        "tb = moe_interp.trace(model, [build_prompt(r['context'], r['question']) for r in batch],\n"
        "                      context=[r['context'] for r in batch], answer=[r['context_answer'] for r in batch],\n"
        "                      tokenizer=tok)\n"
        "tb.plot_selection('context', title='Expert selection share on context tokens')"
    ),
    new_markdown_cell("## Attention of the last prompt token to the context and to the answer, per layer"),
    new_code_cell(
        "last = torch.tensor([tb.token_slice(i).stop - 1 for i in range(len(tb))])\n"
        "mass = tb.attn_to_spans[:, last].mean(dim=(1, 2))  # [A, S]\n"
        "{f'layer {n}': dict(zip(tb.span_names, m.tolist(), strict=True))\n"
        " for n, m in zip(tb.attention_layers, mass, strict=True)}"
    ),
    new_markdown_cell("## Save and reload"),
    new_code_cell(
        "import tempfile\n\n"
        "folder = tempfile.mkdtemp()\n"
        "tb.save(folder)\n"
        "again = moe_interp.MoETrace.load(folder)\n"
        "torch.equal(again.router_logits, tb.router_logits)"
    ),
]

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
