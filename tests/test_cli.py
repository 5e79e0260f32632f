"""The command line as a newcomer uses it: help everywhere, one-line errors with exit 2, config files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_model

from moe_interp import cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_interp.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(cli._COMMANDS))
def test_help_everywhere(name, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--help"])
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["routerlens", "attention"])
def test_pipeline_commands_pass_through_their_help(name):
    res = run(name, "--help")
    assert res.returncode == 0 and "--out" in res.stdout


def test_architectures_lists_every_type(capsys):
    from moe_interp import supported_architectures

    assert cli.main(["architectures"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in supported_architectures())


def test_errors_are_one_line_with_exit_2():
    missing = run("trace", "--model", "/does/not/exist", "--prompt", "hi")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "moe-interp trace: error: model folder /does/not/exist does not exist"
    ]
    bad_flag = run("trace", "--bogus")
    assert bad_flag.returncode == 2 and "unrecognized arguments: --bogus" in bad_flag.stderr
    assert "Traceback" not in missing.stderr + bad_flag.stderr


def test_traceback_on_request(tmp_path):
    res = run("--traceback", "trace", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_trace_a_local_model_folder_with_a_config_file(tmp_path, tokenizer, capsys):
    folder = tmp_path / "model"
    make_model("qwen2_moe").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "opts.json"
    config.write_text(
        json.dumps(
            {
                "model": str(folder),
                "context": "Eiffel Tower is in Paris",
                "answer": "Paris",
                "no_figures": True,
            }
        )
    )
    out = tmp_path / "out"
    code = cli.main(
        ["trace", "--config", str(config), "--prompt", "The Eiffel Tower is in Paris.", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr()
    assert (out / "trace" / "tensors.safetensors").is_file() and (out / "routing.csv").is_file()
    assert "MoE layers [0, 2]" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modle": "x"}))
    assert cli.main(["trace", "--config", str(bad), "--prompt", "x"]) == 2
    assert "unknown option(s) ['modle']" in capsys.readouterr().err


def test_unsupported_model_is_a_one_line_error(tmp_path, tokenizer):
    import transformers

    folder = tmp_path / "llama"
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    res = run("trace", "--model", str(folder), "--prompt", "hello there")
    assert res.returncode == 2
    assert "model type 'llama' is not a supported MoE architecture" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_newcomer_regressions(tmp_path, capsys, monkeypatch):
    """Pipeline options in any order, a config's string prompt, flags replacing config lists, bad values."""
    seen = {}
    monkeypatch.setattr(cli, "_run_pipeline", lambda name, argv: seen.setdefault(name, argv) and 0)
    assert cli.main(["figures", "--out", "o", "--fast"]) == 0
    assert seen["figures"] == ["--out", "o", "--fast"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"out": "from-config"}))
    cli.main(["ceft", "--out", "o", "--config", str(cfg), "--traceback"])
    assert seen["ceft"] == ["--out", "from-config", "--out", "o"]  # later flags win in argparse

    parser = cli.build_parser()
    cfg.write_text(json.dumps({"prompt": "The capital of France is", "out": "x"}))
    args = cli._apply_config(parser, parser.parse_args(["trace", "--config", str(cfg)]))
    assert args.prompt == ["The capital of France is"] and args.out == "x"
    args = cli._apply_config(parser, parser.parse_args(["trace", "--config", str(cfg), "--prompt", "B"]))
    assert args.prompt == ["B"]

    assert cli.main(["trace", "--prompt", "hi", "--dtype", "float99"]) == 2
    assert "not a torch dtype" in capsys.readouterr().err
    assert cli.main(["demo", "--examples", "0"]) == 2
    assert "examples >= 1" in capsys.readouterr().err


def test_evaluate_a_records_file(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    record = {"question": "Where is the tower?", "context": "The tower is in Paris.", "answers": ["Paris"]}
    data.write_text(json.dumps(record) + "\n")
    assert cli.main(["evaluate", "--dataset", str(data), "--out", str(tmp_path / "r.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out)  # valid JSON: no NaN
    assert summary["n"] == 1 and summary["Po"] is None


def test_trace_records_file_gives_per_prompt_contexts(tmp_path, capsys):
    records = tmp_path / "p.jsonl"
    rows = [
        {
            "prompt": "Context: The tower is in Paris. Where is it?",
            "context": "The tower is in Paris.",
            "answer": "Paris",
        },
        {"prompt": "The capital of France is"},
    ]
    records.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "t"
    assert cli.main(["trace", "--prompts-file", str(records), "--out", str(out), "--no-figures"]) == 0
    from moe_interp import MoETrace

    t = MoETrace.load(out / "trace")
    assert set(t.spans[0]) == {"context", "answer"} and t.spans[1] == {}
    records.write_text('{"prompt": 5}\n')
    assert cli.main(["trace", "--prompts-file", str(records), "--out", str(out)]) == 2
    assert 'line 1: a record needs a string field "prompt"' in capsys.readouterr().err
    records.write_text('{"prompt": "x y", "id": 3}\n{"prompt": "x", "contxt": "x"}\n')
    assert cli.main(["trace", "--prompts-file", str(records), "--out", str(out)]) == 2
    assert "line 2: unknown field(s) ['contxt']" in capsys.readouterr().err


def test_python_m_entry_points_report_errors_in_one_line(monkeypatch, capsys):
    """``python -m moe_interp.<pipeline>`` exits 2 with one line for package errors (``run_main``), and
    re-raises with ``--traceback``; a main returning an int sets the exit status."""
    from moe_interp.errors import InputError, run_main

    def bad(argv):
        assert argv == ["--x"]
        raise InputError("--x is wrong")

    monkeypatch.setattr("sys.argv", ["prog", "--x"])
    with pytest.raises(SystemExit) as stop:
        run_main("python -m demo", bad)
    assert stop.value.code == 2 and capsys.readouterr().err == "python -m demo: error: --x is wrong\n"
    monkeypatch.setattr("sys.argv", ["prog", "--x", "--traceback"])
    with pytest.raises(InputError):
        run_main("python -m demo", bad)
    monkeypatch.setattr("sys.argv", ["prog"])
    with pytest.raises(SystemExit) as stop:
        run_main("python -m demo", lambda argv: 3)
    assert stop.value.code == 3
