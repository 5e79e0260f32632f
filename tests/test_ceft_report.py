"""CEFT reports: evaluation rows, the paper's table (with trainable counts and forgetting), the figure."""

from __future__ import annotations

import torch
from ceft_helpers import qa_records
from conftest import make_model

from moe_interp.ceft import (
    CEFTConfig,
    ceft,
    evaluate_methods,
    figure,
    markdown_table,
    paper_table,
    router_tuning,
    train,
)
from moe_interp.routerlens import to_examples

torch.set_num_threads(1)


def test_table_and_figure(tokenizer, tmp_path):
    model = make_model("olmoe")
    cfg = CEFTConfig(lr=1e-2, epochs=1, batch_size=4)
    data = qa_records(4)
    results = {
        "Base": None,
        "CEFT": train(model, tokenizer, data, method=ceft({0: [1]}), config=cfg, progress=False),
        "RT": train(model, tokenizer, data, method=router_tuning(), config=cfg, progress=False),
    }
    closed = to_examples([{"id": "m1", "question": "Where is the Eiffel Tower?", "true_object": "Paris"}])
    rows = evaluate_methods(
        model,
        tokenizer,
        results,
        {"ctx": to_examples(data), "memorised": closed},
        out=tmp_path,
        total=sum(p.numel() for p in model.parameters()),
        max_new_tokens=2,
        batch_size=4,
    )
    assert list(rows["method"].unique()) == ["Base", "CEFT", "RT"]
    assert rows.set_index("method")["trainable"].to_dict()["CEFT"] == results["CEFT"].trainable
    assert (tmp_path / "CEFT" / "ctx.jsonl").is_file()
    table = paper_table(rows)
    assert list(table.index) == ["Base", "CEFT", "RT"]
    cols = ("ctx EM", "ctx F1", "memorised closed-book EM", "memorised change vs Base", "trainable params")
    for col in cols:
        assert col in table.columns
    assert table.loc["Base", "memorised change vs Base"] == 0
    assert table.loc["RT", "trainable params"] == results["RT"].trainable
    md = markdown_table(table)
    assert md.startswith("| method |") and f"{results['CEFT'].trainable:,}" in md
    fig = figure(rows)
    assert len(fig.data) == 3 and "params" in fig.data[1].name
