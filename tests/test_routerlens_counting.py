"""count_selections: equals trace()'s counts, padding excluded, exact under accelerate data parallelism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_model
from test_routerlens_tuning import examples

from moe_interp.errors import InputError
from moe_interp.evaluation import evaluate
from moe_interp.prompts import build_prompt
from moe_interp.routerlens.counting import SelectionCounts, count_selections
from moe_interp.routerlens.masking import mask_experts
from moe_interp.trace import trace

HERE = Path(__file__).resolve().parent


def _trace_counts(model, tok, exs, span):
    prompts = [build_prompt(e.context, e.question) for e in exs]
    t = trace(
        model,
        prompts,
        context=[e.context for e in exs],
        answer=[e.answers[0] for e in exs],
        tokenizer=tok,
        attention=False,
    )
    return t.selection_counts(span)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe", "llama4_text"])
def test_counts_match_trace(model_type, tokenizer):
    model = make_model(model_type)
    exs = examples(7)
    got = count_selections(
        model,
        tokenizer,
        exs,
        spans=("prompt", "context", "context_answer", "last", "all"),
        batch_size=3,
        progress=False,
    )
    assert got.layers == trace(model, "x", tokenizer=tokenizer, attention=False).layers
    for span in ("prompt", "context", "context_answer", "last"):  # a trace takes counting's span names
        assert torch.equal(got.counts[span], _trace_counts(model, tokenizer, exs, span)), span
    assert torch.equal(got.counts["context_answer"], _trace_counts(model, tokenizer, exs, "answer"))
    k = got.top_k
    n_prompt = sum(len(tokenizer(build_prompt(e.context, e.question))["input_ids"]) for e in exs)
    assert got.tokens["prompt"] == n_prompt
    assert (got.counts["prompt"].sum(1) == n_prompt * k).all()  # padding never counted
    assert (got.counts["last"].sum(1) == len(exs) * k).all()
    # "all" = prompt + appended answer, as one trace of the full text
    full = [build_prompt(e.context, e.question) + " " + e.answers[0] for e in exs]
    ref = trace(model, full, tokenizer=tokenizer, attention=False).selection_counts("all")
    assert torch.equal(got.counts["all"], ref)
    # batch size does not matter; masks are honoured
    one = count_selections(model, tokenizer, iter(exs), spans=("prompt",), batch_size=1, progress=False)
    assert torch.equal(one.counts["prompt"], got.counts["prompt"]) and one.n_examples == 7
    layer = got.layers[0]
    with mask_experts(model, {layer: [0, 1]}):
        masked = count_selections(model, tokenizer, exs, batch_size=4, progress=False)
    assert masked.counts["prompt"][0, :2].sum() == 0


def test_frame_save_load_and_errors(tmp_path, tokenizer):
    model = make_model("olmoe")
    got = count_selections(model, tokenizer, examples(3), spans=("prompt", "answer"), progress=False)
    frame = got.frame()
    assert set(frame.columns) == {"span", "layer", "expert", "count", "share"}
    assert len(frame) == 2 * len(got.layers) * got.num_experts
    back = SelectionCounts.load(got.save(tmp_path / "c.json"))
    assert back.tokens == got.tokens and all(torch.equal(back.counts[s], got.counts[s]) for s in got.counts)
    with pytest.raises(InputError, match="unknown span"):
        count_selections(model, tokenizer, examples(1), spans=("question",), progress=False)
    with pytest.raises(InputError, match="was not counted"):
        got.share("context")


_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from test_routerlens_tuning import examples
from moe_interp.routerlens.counting import count_selections, _distributed
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
rank, world = _distributed()
got = count_selections(model, tok, examples(9), spans=("prompt", "all"), batch_size=2, progress=False)
got.save(sys.argv[2] + f".{{rank}}of{{world}}.json")
from moe_interp.routerlens.compare import evaluate_sharded
frame = evaluate_sharded(model, tok, examples(5), max_new_tokens=2, batch_size=2, progress=False)
frame.to_json(sys.argv[2] + f".eval{{rank}}.json")
"""


def test_accelerate_two_processes_give_single_process_counts(tmp_path, tokenizer):
    pytest.importorskip("accelerate")
    model = make_model("olmoe")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    script = tmp_path / "count.py"
    script.write_text(_SCRIPT.format(tests=str(HERE)))
    # accelerate 1.x starts several CPU processes only via mpirun for --cpu; torchrun (--multi_gpu) with
    # ACCELERATE_USE_CPU=1 gives N gloo processes on one CPU-only machine
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path / "m"),
        str(tmp_path / "counts"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    parts = [SelectionCounts.load(tmp_path / f"counts.{r}of2.json") for r in range(2)]
    from transformers import AutoModelForCausalLM

    single = count_selections(
        AutoModelForCausalLM.from_pretrained(tmp_path / "m"),
        tokenizer,
        examples(9),
        spans=("prompt", "all"),
        batch_size=2,
        progress=False,
        distributed=False,
    )
    for part in parts:
        assert part.n_examples == 9 and part.tokens == single.tokens
        for span in single.counts:
            assert torch.equal(part.counts[span], single.counts[span])
    # evaluation data-parallel: every process gets all rows, in input order, as evaluated alone
    ref = evaluate(
        AutoModelForCausalLM.from_pretrained(tmp_path / "m"),
        tokenizer,
        examples(5),
        max_new_tokens=2,
        batch_size=2,
        progress=False,
    )
    for r in range(2):
        got = pd.read_json(tmp_path / f"counts.eval{r}.json", dtype=False)
        assert list(got["id"]) == list(ref["id"]) and list(got["prediction"]) == list(ref["prediction"])
