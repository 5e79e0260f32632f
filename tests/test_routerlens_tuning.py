"""Router tuning: only routers train, loss on answer tokens, artefact, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

from moe_interp.data.example import QAExample
from moe_interp.errors import InputError
from moe_interp.prompts import build_prompt
from moe_interp.routerlens.masking import mask_experts
from moe_interp.routerlens.tuning import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    RouterTuningConfig,
    _encode,
    _Trainer,
    applied_router_weights,
    load_router_weights,
    router_parameter_names,
    tune_routers,
)
from moe_interp.trace import trace

HERE = Path(__file__).resolve().parent
_PLACES = ["Paris", "French", "Tower", "Danielle", "context", "answer"]


def examples(n: int, offset: int = 0) -> list[QAExample]:
    out = []
    for i in range(offset, offset + n):
        a = _PLACES[i % len(_PLACES)]
        out.append(
            QAExample(
                id=f"ex{i}",
                context=f"The Eiffel Tower is in {a}. The mother tongue is French.",
                question="Where is the Eiffel Tower?",
                answers=(a,),
            )
        )
    return out


CFG = RouterTuningConfig(lr=5e-2, epochs=2, batch_size=4, checkpoint_every=2, eval_batch_size=3)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_routers_train_and_caller_model_untouched(tmp_path, tokenizer):
    model = make_model("olmoe")
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = tune_routers(
        model, tokenizer, examples(10), examples(4, 10), config=CFG, out=tmp_path, progress=False
    )
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # not inplace: nothing changed
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    names = router_parameter_names(model)
    assert sorted(res.weights) == sorted(names) and all(n.endswith("mlp.gate.weight") for n in names)
    assert any(not torch.equal(res.weights[n], before[n]) for n in names)
    assert [h["step"] for h in res.history] == [0, 3, 6] and res.best_step in (3, 6)
    assert res.best_dev_loss == min(h["dev_loss"] for h in res.history[1:])
    # the artefact holds only router weights, plus the config that produced them
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["config"]["lr"] == CFG.lr and saved["parameters"] == names
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / WEIGHTS_FILE))) == sorted(names)
    assert not (tmp_path / STATE_FILE).exists()  # resume state removed once finished
    # inplace: only the router parameters differ afterwards
    tune_routers(
        model,
        tokenizer,
        examples(10),
        examples(4, 10),
        config=CFG,
        out=tmp_path,
        inplace=True,
        progress=False,
    )
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and changed <= set(names)


def test_weights_context_manager_composes_with_masking(tmp_path, tokenizer):
    model = make_model("olmoe")
    before = _state(model)
    res = tune_routers(model, tokenizer, examples(8), None, config=CFG, out=tmp_path, progress=False)
    prompt = build_prompt("The Eiffel Tower is in Paris.", "Where is the Eiffel Tower?")
    base = trace(model, prompt, tokenizer=tokenizer, attention=False)
    with applied_router_weights(model, tmp_path), mask_experts(model, {0: [0, 1]}):
        both = trace(model, prompt, tokenizer=tokenizer, attention=False)
        assert not {0, 1} & set(both.topk_indices[0].flatten().tolist())
        assert torch.equal(
            model.model.layers[0].mlp.gate.weight, res.weights["model.layers.0.mlp.gate.weight"]
        )
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = trace(model, prompt, tokenizer=tokenizer, attention=False)
    assert torch.equal(again.router_logits, base.router_logits)
    with applied_router_weights(model, res):  # the result object itself works too
        assert torch.equal(
            model.model.layers[0].mlp.gate.weight, res.weights["model.layers.0.mlp.gate.weight"]
        )
    with pytest.raises(InputError, match="without out= has no path"):
        load_router_weights(model, None)
    with pytest.raises(InputError, match="not a router parameter"):
        load_router_weights(model, {"model.embed_tokens.weight": before["model.embed_tokens.weight"]})
    with pytest.raises(InputError, match="shape"):
        load_router_weights(model, {"model.layers.0.mlp.gate.weight": torch.zeros(3, 3)})


def test_loss_is_on_answer_tokens_only(tokenizer):
    model = make_model("olmoe")
    cfg = RouterTuningConfig()
    batch = _encode(tokenizer, examples(3), cfg, "train")
    ans = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert batch[0].tail == ans + [tokenizer.eos_token_id]
    loss, n = _Trainer(model, tokenizer, cfg).loss_sums(batch)
    loss = loss.detach()
    # reference: each example alone, labels -100 on the prompt, the model's own shifted loss
    ref, count = 0.0, 0
    for e in batch:
        ids = torch.tensor([e.head + e.tail])
        labels = torch.tensor([[-100] * len(e.head) + e.tail])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        ref += float(out.loss) * len(e.tail)
        count += len(e.tail)
    assert n == count
    assert abs(loss.item() - ref) < 1e-3 * count


def test_lora_trains_only_routers(tokenizer):
    model = make_model("gpt_oss")  # routers with a bias: LoRA leaves it frozen
    before = _state(model)
    cfg = RouterTuningConfig(lr=5e-2, epochs=1, batch_size=4, lora_rank=2)
    res = tune_routers(model, tokenizer, examples(8), examples(3, 8), config=cfg, progress=False)
    names = router_parameter_names(model)
    assert any(n.endswith("bias") for n in names)
    assert sorted(res.weights) == sorted(n for n in names if n.endswith("weight"))
    assert any(not torch.equal(res.weights[n], before[n]) for n in res.weights)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_refuses_other_settings(tmp_path, tokenizer):
    model = make_model("olmoe")
    cfg = RouterTuningConfig(epochs=1, batch_size=4)
    tune_routers(model, tokenizer, examples(4), None, config=cfg, out=tmp_path, progress=False)
    with pytest.raises(InputError, match="other settings"):
        tune_routers(
            model,
            tokenizer,
            examples(4),
            None,
            config=RouterTuningConfig(epochs=1, batch_size=2),
            out=tmp_path,
            progress=False,
        )


_SCRIPT = """
import os, sys, signal
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import make_model, make_tokenizer
from test_routerlens_tuning import examples, CFG
from moe_interp.routerlens.tuning import tune_routers
kill_at = int(os.environ.get("KILL_AT", "0"))
def cb(step, logs):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
tune_routers(make_model("olmoe"), make_tokenizer(), examples(10), examples(4, 10), config=CFG,
             out=sys.argv[1], progress=False, callback=cb)
"""


def test_resume_after_sigkill_gives_same_weights(tmp_path, tokenizer):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(HERE)))
    out = tmp_path / "killed"
    env = {**os.environ, "KILL_AT": "5", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / STATE_FILE).is_file() and not (out / WEIGHTS_FILE).exists()
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 4
    env["KILL_AT"] = "0"
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    # uninterrupted, in this process, same settings
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tune_routers(
            make_model("olmoe"),
            make_tokenizer(),
            examples(10),
            examples(4, 10),
            config=CFG,
            out=tmp_path / "straight",
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    resumed = load_file(str(out / WEIGHTS_FILE))
    assert sorted(resumed) == sorted(ref.weights)
    assert all(torch.equal(resumed[n], ref.weights[n]) for n in resumed)
    a = json.loads((out / CONFIG_FILE).read_text())
    b = json.loads((tmp_path / "straight" / CONFIG_FILE).read_text())
    assert a["history"] == b["history"] and a["best_step"] == b["best_step"]
