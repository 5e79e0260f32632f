"""The accelerate engine: 2-process DDP = 1 process, resume after SIGKILL, accumulation, options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ceft_helpers import qa_records
from conftest import make_model, make_tokenizer
from safetensors.torch import load_file

from moe_interp.ceft import CEFTConfig, ceft, load_result, router_tuning, train
from moe_interp.errors import InputError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--lr", "1e-2", "--epochs", "2", "--batch-size", "4", "--threads", "1", "--method", "ceft"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ceft")
    model, tok = make_model("olmoe"), make_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in qa_records(16)))
    (d / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in qa_records(4)))
    (d / "experts.json").write_text(json.dumps({"0": [1, 2], "2": [0, 5]}))
    return d


def _files(d: Path) -> list[str]:
    return [
        "--model",
        str(d / "model"),
        "--train",
        str(d / "train.jsonl"),
        "--dev",
        str(d / "dev.jsonl"),
        "--experts",
        str(d / "experts.json"),
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    return env


def test_two_processes_match_one(workdir):
    """accelerate launch, 2 CPU processes over gloo (torchrun launcher + ACCELERATE_USE_CPU) = 1 process."""
    from moe_interp.ceft.train import main

    main([*_files(workdir), *ARGS, "--out", str(workdir / "one")])
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
        "--main_process_port",
        "29561",
        "-m",
        "moe_interp.ceft.train",
        *_files(workdir),
        *ARGS,
        "--out",
        str(workdir / "two"),
    ]
    run = subprocess.run(
        cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((workdir / "two" / "deltas.json").read_text())
    assert meta["num_processes"] == 2
    one, two = (
        load_file(str(workdir / "one" / "deltas.safetensors")),
        load_file(str(workdir / "two" / "deltas.safetensors")),
    )
    assert set(one) == set(two)
    for k in one:
        assert one[k].abs().max() > 1e-3  # trained
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from moe_interp.ceft.train import main
    import moe_interp.ceft.engine as engine
    real = engine.train
    def killing_train(*a, **kw):
        def cb(step, logs):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, callback=cb, **kw)
    engine.train = killing_train
    import moe_interp.ceft.train as t
    t.train = killing_train
    main(sys.argv[1:])
""")


def test_resume_after_sigkill(workdir):
    from moe_interp.ceft.train import main

    args = [*_files(workdir), *ARGS, "--checkpoint-every", "2"]
    out = workdir / "killed"
    run = subprocess.run(
        [sys.executable, "-c", KILLER, *args, "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -9, run.stderr[-3000:]
    assert not (out / "deltas.json").exists()
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 2
    main([*args, "--out", str(out)])  # resumes from step 2
    main([*args, "--out", str(workdir / "straight")])
    a, b = load_result(out), load_result(workdir / "straight")
    assert a.history == b.history
    for k in a.deltas:
        assert torch.equal(a.deltas[k], b.deltas[k]), k


def test_accumulation_and_options(tokenizer, tmp_path):
    model = make_model("olmoe")
    data, dev = qa_records(8), qa_records(4)
    base = CEFTConfig(lr=1e-2, epochs=1, batch_size=4)
    ref = train(model, tokenizer, data, dev, method=ceft({0: [1]}), config=base, progress=False)
    acc = train(
        model,
        tokenizer,
        data,
        dev,
        method=ceft({0: [1]}),
        progress=False,
        config=CEFTConfig(lr=1e-2, epochs=1, batch_size=4, grad_accum=2),
    )
    for k in ref.deltas:
        torch.testing.assert_close(acc.deltas[k], ref.deltas[k], rtol=0, atol=1e-6)
    gc = train(
        model,
        tokenizer,
        data,
        dev,
        method=ceft({0: [1]}),
        progress=False,
        config=CEFTConfig(lr=1e-2, epochs=1, batch_size=4, gradient_checkpointing=True),
    )
    for k in ref.deltas:
        torch.testing.assert_close(gc.deltas[k], ref.deltas[k], rtol=0, atol=1e-6)
    assert not model.is_activation_checkpointing and not model.training
    assert getattr(model, "_require_grads_hook", None) is None  # no hook left behind
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    bf = train(
        model,
        tokenizer,
        data,
        None,
        method=router_tuning(),
        progress=False,
        out=tmp_path / "rt",
        config=CEFTConfig(lr=1e-2, epochs=1, batch_size=4, mixed_precision="bf16"),
    )
    assert all(t.isfinite().all() for t in bf.deltas.values())
    assert load_result(tmp_path / "rt").trainable == bf.trainable
    assert not (tmp_path / "rt" / "checkpoint").exists()  # a finished run keeps only its results
    with pytest.raises(InputError, match="other settings"):
        train(
            model,
            tokenizer,
            data,
            None,
            method=router_tuning(lr=0.5),
            out=tmp_path / "rt",
            config=CEFTConfig(lr=1e-2, epochs=1, batch_size=4, mixed_precision="bf16"),
            progress=False,
        )
    with pytest.raises(InputError, match="grad_accum"):
        CEFTConfig(batch_size=5, grad_accum=2)
