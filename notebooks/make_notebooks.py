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
        "the context and to the answer inside it. This notebook uses the embedded demo model (a small "
        "Qwen2-MoE-shaped model trained on CounterFact facts, whose layer 0 sees only the last 8 tokens) on "
        "a *conflict* example: the context states a counterfactual object, the model memorised the true one."
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
    new_markdown_cell(
        "## Routing, token by token\n\nHover over a cell for the top-k experts and their weights."
    ),
    new_code_cell("t.plot_routing()"),
    new_code_cell(
        "frame = t.routing_frame()\n"
        "frame[frame.selected].groupby(['layer', 'span']).expert.agg(lambda e: e.value_counts().index[0])"
    ),
    new_markdown_cell(
        "## Which experts read the context?\n\nSelection counts over a batch of conflict prompts:"
    ),
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

ROUTER_LENS = [
    new_markdown_cell(
        "# Router Lens: which experts make the model faithful to its context?\n\n"
        "Router Lens (Bai et al., EMNLP 2025) tunes *only the routers* of an MoE model on context-dependent "
        "QA (the answer must come from the context), then reads off which experts the tuned routers choose "
        "most: the **context-faithful experts (CE)**. Masking them should hurt the tuned model more than "
        "masking as many other experts (OE). This notebook runs the whole method on a small slice of the "
        "demo model's `conflict_tune` split (contexts that contradict what the model memorised); the full "
        "run is `python -m moe_interp.routerlens.run` and `python -m moe_interp.figures` draws the paper "
        "figures."
    ),
    new_code_cell(
        "import torch\n\n"
        "import moe_interp\n"
        "from moe_interp import figures\n"
        "from moe_interp.routerlens import (\n"
        "    RouterTuningConfig,\n"
        "    applied_router_weights,\n"
        "    compare,\n"
        "    count_selections,\n"
        "    demo_examples,\n"
        "    identify_experts,\n"
        "    paper_conditions,\n"
        "    tune_routers,\n"
        ")\n"
        "\n"
        "torch.set_num_threads(1)\n"
        "model, tok = moe_interp.load_demo()\n"
        "train, dev = demo_examples('conflict_tune')[:96], demo_examples('conflict_dev')[:48]\n"
        "test = demo_examples('conflict_test', 24)\n"
        "train[0]"
    ),
    new_markdown_cell(
        "## 1. Router tuning\n\nOnly the router weights train (loss on the answer tokens); the rest of the "
        "model stays bit-identical. One short epoch here; the paper's defaults are `RouterTuningConfig()`."
    ),
    new_code_cell(
        "rt = tune_routers(model, tok, train, dev, config=RouterTuningConfig(epochs=1, lr=3e-3),\n"
        "                  progress=False)\n"
        "rt.history"
    ),
    new_markdown_cell(
        "## 2. Expert selection counts\n\nHow often each expert of each layer is among the top-k, over prompt + "
        "answer tokens, with the base routers and with the tuned ones:"
    ),
    new_code_cell(
        "base = count_selections(model, tok, train, spans=('all',), progress=False)\n"
        "with applied_router_weights(model, rt.weights):\n"
        "    tuned = count_selections(model, tok, train, spans=('all',), progress=False)\n"
        "figures.routing_heatmap_figure(base, tuned)"
    ),
    new_code_cell("figures.routing_difference_figure(base, tuned)"),
    new_markdown_cell(
        "## 3. Context-faithful experts\n\nThe paper's rule: per layer, the top-k experts the *tuned* routers "
        "select most. OE is a seeded draw of as many other experts."
    ),
    new_code_cell(
        "experts = identify_experts(tuned, base, span='all', method='count')\n"
        "print('CE', experts.ce())\n"
        "print('OE', experts.oe())\n"
        "figures.ce_oe_figure(experts)"
    ),
    new_markdown_cell(
        "## 4. Masking comparison\n\nBase, RT, RT with OE masked (two seeds) and RT with CE masked, on a few "
        "`conflict_test` examples (greedy answers, EM / F1; with 24 examples the error bars are wide)."
    ),
    new_code_cell(
        "result = compare(model, tok, test, paper_conditions(rt.weights, experts, oe_seeds=(0, 1)),\n"
        "                 max_new_tokens=6, batch_size=24, progress=False)\n"
        "result.summary[['condition', 'runs', 'n', 'EM', 'F1', 'Pc', 'Po']]"
    ),
    new_code_cell("figures.masking_figure(result.summary)"),
]

ATTENTION = [
    new_markdown_cell(
        "# Attention amplification: what router tuning does inside the model\n\n"
        "Router-tuned models attend more to the context (**CAG**, context attention gain) and to the answer "
        "inside it (**AAG**, answer attention gain), and a logit lens shows the context answer's probability "
        "rising through the layers (**APG**). Per-expert attribution masks one expert at a time and measures "
        "the change in log p(context answer). A small slice of the demo model's conflict data here; the full "
        "run is `python -m moe_interp.analysis.run`."
    ),
    new_code_cell(
        "import torch\n\n"
        "import moe_interp\n"
        "from moe_interp import figures\n"
        "from moe_interp.analysis import (\n"
        "    answer_lens,\n"
        "    answer_probability_gain,\n"
        "    attention_gains,\n"
        "    ce_oe_sets,\n"
        "    masking_effects,\n"
        "    span_attention,\n"
        "    token_attention,\n"
        "    token_attention_difference,\n"
        ")\n"
        "from moe_interp.demo import load_split\n"
        "from moe_interp.routerlens import RouterTuningConfig, applied_router_weights, demo_examples, tune_routers\n\n"
        "torch.set_num_threads(1)\n"
        "model, tok = moe_interp.load_demo()\n"
        "examples = load_split('conflict_test')[:24]\n"
        "rt = tune_routers(model, tok, demo_examples('conflict_tune')[:96], demo_examples('conflict_dev')[:48],\n"
        "                  config=RouterTuningConfig(epochs=1, lr=3e-3), progress=False)"
    ),
    new_markdown_cell(
        "## CAG and AAG\n\nAttention of the last prompt token to the context span and to the answer inside it, "
        "per layer, for the base and the router-tuned model:"
    ),
    new_code_cell(
        "att_base = span_attention(model, tok, examples)\n"
        "lens_base = answer_lens(model, tok, examples)\n"
        "tok_base = token_attention(model, tok, examples[0])\n"
        "with applied_router_weights(model, rt.weights):\n"
        "    att_tuned = span_attention(model, tok, examples)\n"
        "    lens_tuned = answer_lens(model, tok, examples)\n"
        "    tok_tuned = token_attention(model, tok, examples[0])\n"
        "gains = attention_gains(att_base, att_tuned)\n"
        "gains"
    ),
    new_code_cell(
        "figures.gains_lines_figure(gains, comparison='router-tuned vs base, 24 conflict_test prompts')"
    ),
    new_markdown_cell("## APG: the answer's probability through the layers (logit lens)"),
    new_code_cell(
        "apg = answer_probability_gain(lens_base, lens_tuned)\n"
        "figures.apg_line_figure(apg, comparison='router-tuned vs base')"
    ),
    new_markdown_cell(
        "## Where the extra attention goes, token by token\n\nRed tokens receive more attention from the last "
        "prompt token after router tuning, blue ones less:"
    ),
    new_code_cell(
        "diff = token_attention_difference(tok_base, tok_tuned)\nfigures.token_difference_text_figure(diff)"
    ),
    new_markdown_cell(
        "## Per-expert attribution\n\nThe exact effect of masking each expert on log p(context answer) (8 "
        "prompts); the circled experts are the two per layer whose masking hurts most."
    ),
    new_code_cell(
        "effects = masking_effects(model, tok, examples[:8])\n"
        "ce = ce_oe_sets(effects, per_layer=2)['CE']\n"
        "figures.attribution_figure(effects.frame(), ce=ce)"
    ),
]

CEFT = [
    new_markdown_cell(
        "# CEFT: fine-tune only the context-faithful experts\n\n"
        "Context-faithful Expert Fine-Tuning trains only the CE found by Router Lens and is compared with "
        "full fine-tuning (FFT) and router tuning (RT) on the same data and budget. A tiny budget here (one "
        "epoch on 64 examples; the numbers are noisy), the full comparison with random-expert and LoRA "
        "baselines is `python -m moe_interp.ceft.run`."
    ),
    new_code_cell(
        "import torch\n\n"
        "import moe_interp\n"
        "from moe_interp import figures\n"
        "from moe_interp.ceft import (\n"
        "    CEFTConfig,\n"
        "    ceft,\n"
        "    count_parameters,\n"
        "    evaluate_methods,\n"
        "    full_fine_tuning,\n"
        "    markdown_table,\n"
        "    paper_table,\n"
        "    router_tuning,\n"
        "    train,\n"
        ")\n"
        "from moe_interp.demo import load_split\n"
        "from moe_interp.routerlens import (\n"
        "    RouterTuningConfig,\n"
        "    applied_router_weights,\n"
        "    count_selections,\n"
        "    demo_examples,\n"
        "    identify_experts,\n"
        "    to_examples,\n"
        "    tune_routers,\n"
        ")\n"
        "\n"
        "torch.set_num_threads(1)\n"
        "model, tok = moe_interp.load_demo()\n"
        "train_ex, dev_ex = demo_examples('conflict_tune')[:64], demo_examples('conflict_dev')[:32]"
    ),
    new_markdown_cell("## The CE, from a quick Router Lens pass"),
    new_code_cell(
        "rt = tune_routers(model, tok, demo_examples('conflict_tune')[:96], dev_ex,\n"
        "                  config=RouterTuningConfig(epochs=1, lr=3e-3), progress=False)\n"
        "with applied_router_weights(model, rt.weights):\n"
        "    counts = count_selections(model, tok, demo_examples('conflict_tune')[:96], spans=('all',),\n"
        "                              progress=False)\n"
        "ce = identify_experts(counts, span='all').ce()\n"
        "ce"
    ),
    new_markdown_cell(
        "## Train CEFT, FFT and RT with the same data and budget\n\nOnly the CE's slices of the fused expert "
        "tensors change under CEFT; the trainable-parameter counts are exact."
    ),
    new_code_cell(
        "config = CEFTConfig(epochs=1, batch_size=8)\n"
        "methods = [ceft(ce, lr=3e-3), full_fine_tuning(lr=3e-4), router_tuning(lr=3e-3)]\n"
        "results = {'Base': None}\n"
        "for method in methods:\n"
        "    results[method.name] = train(model, tok, train_ex, dev_ex, method=method, config=config,\n"
        "                                 progress=False)\n"
        "total = count_parameters(model)\n"
        "{name: f'{r.trainable:,} trainable ({100 * r.trainable / total:.2f}% of {total:,})'\n"
        " for name, r in results.items() if r is not None}"
    ),
    new_markdown_cell(
        "## Evaluate\n\nEM on conflict_test, and closed-book accuracy on memorised facts (does training on "
        "contexts make the model forget?)."
    ),
    new_code_cell(
        "memorised = to_examples([r for r in load_split('memorised') if r.get('role') == 'train'][:24])\n"
        "datasets = {'conflict_test': demo_examples('conflict_test', 24), 'memorised': memorised}\n"
        "rows = evaluate_methods(model, tok, results, datasets, total=total, max_new_tokens=6, batch_size=24)\n"
        "table = paper_table(rows)\n"
        "print(markdown_table(table))"
    ),
    new_code_cell("figures.ceft_figure(table)"),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_router_lens.ipynb": ROUTER_LENS,
    "03_attention_amplification.ipynb": ATTENTION,
    "04_ceft.ipynb": CEFT,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(
            cells=cells,
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        )
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what was edited
            cell.id = f"{Path(name).stem[:2]}-{i:02d}"
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
