"""Prompt formatting with spans, batched generation / scoring, and resumable evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_model, make_tokenizer
from tokenizers import processors

import moe_interp.evaluation as ev
from moe_interp.data import QAExample
from moe_interp.errors import DataError, InputError
from moe_interp.evaluation import evaluate, generate_answers, score_answers, split_continuation
from moe_interp.prompts import build_prompt, encode_prompt, format_example

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONTEXTS = [
    "The Eiffel Tower is in Paris. Paris is in France.",
    "The mother tongue of Danielle Darrieux is French.",
    "Tokyo 東京 café",
    "Paris",
    "The tower is in Rome, not paris.",
    "French café naïve Paris Paris Paris and the answer French again.",
    "Danielle",
]
QUESTIONS = ["Where is the Eiffel Tower?", "What is the mother tongue of Danielle Darrieux?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: far faster for tiny models on a shared, loaded CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return make_model("olmoe")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT
    return tok


def _examples(n: int = 7) -> list[QAExample]:
    out = []
    for i in range(n):
        ctx = CONTEXTS[i % len(CONTEXTS)] if i != 3 else None  # one closed-book example
        out.append(
            QAExample(
                id=f"ex{i}",
                context=ctx,
                question=QUESTIONS[i % 2],
                answers=("Paris", "French") if i % 2 == 0 else ("French",),
                memorised_answer="Rome" if i % 3 else None,
            )
        )
    return out


# --- prompts -------------------------------------------------------------------------------------------


def test_paper_format_equals_build_prompt_and_spans_are_exact():
    ex = QAExample("a", CONTEXTS[0], QUESTIONS[0], ("Paris", "France", "Berlin"))
    fp = format_example(ex)
    assert fp.text == build_prompt(ex.context, ex.question)
    assert fp.text[slice(*fp.context)] == ex.context
    assert fp.text[slice(*fp.question)] == ex.question
    assert fp.text.endswith("Answer:") and fp.answer_prefix == " " and fp.add_special_tokens
    assert len(fp.answers["Paris"]) == 2 and fp.answers["Berlin"] == ()
    for answer, spans in fp.answers.items():
        assert all(fp.text[s:e] == answer for s, e in spans)
    assert fp.answer_in_context and fp.input_ids is None
    with pytest.raises(InputError, match="not tokenised"):
        _ = fp.context_tokens
    closed = format_example(QAExample("b", None, "Where?", ("Paris",)))
    assert closed.text == build_prompt(None, "Where?") and closed.context is None
    assert not closed.answer_in_context and closed.text[slice(*closed.question)] == "Where?"


def _assert_minimal_cover(fp, char_span, tok_span):
    """Tokens [s, e) are exactly the tokens whose characters overlap the char span."""
    s, e = tok_span
    cs, ce = char_span
    overlaps = [i for i, (a, b) in enumerate(fp.offsets) if a < ce and cs < b and a < b]
    assert overlaps == list(range(s, e))


@pytest.mark.parametrize("template", ["paper", "chat", "Q: {question}\nC: {context}\nA:"])
def test_token_spans_exact(chat_tokenizer, template):
    ex = QAExample("a", CONTEXTS[5], QUESTIONS[1], ("French", "Paris", "café naïve", "missing"))
    fp = format_example(ex, chat_tokenizer, template=template)
    ids, offsets = encode_prompt(chat_tokenizer, fp.text, add_special_tokens=fp.add_special_tokens)
    assert list(fp.input_ids) == ids and list(fp.offsets) == offsets
    assert chat_tokenizer.decode(list(fp.input_ids)) == fp.text
    _assert_minimal_cover(fp, fp.context, fp.context_tokens)
    _assert_minimal_cover(fp, fp.question, fp.question_tokens)
    for answer, tok_spans in fp.answer_tokens.items():
        assert len(tok_spans) == len(fp.answers[answer]) == ex.context.count(answer)
        for cspan, tspan in zip(fp.answers[answer], tok_spans, strict=True):
            assert fp.text[slice(*cspan)] == answer
            _assert_minimal_cover(fp, cspan, tspan)
            assert answer in chat_tokenizer.decode(list(fp.input_ids[slice(*tspan)]))


def test_chat_format(chat_tokenizer):
    ex = QAExample("a", CONTEXTS[0], QUESTIONS[0], ("Paris",))
    fp = format_example(ex, chat_tokenizer, template="chat")
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": build_prompt(ex.context, ex.question).removesuffix("\n\nAnswer:")}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert fp.text == expected and fp.text.endswith("<|assistant|>\n")
    assert fp.answer_prefix == "" and not fp.add_special_tokens
    assert fp.text[slice(*fp.context)] == ex.context


def test_format_errors(tokenizer):
    ex = QAExample("ex-7", "ctx", "q?", ("a",))
    with pytest.raises(InputError, match="no chat template"):
        format_example(ex, tokenizer, template="chat")
    with pytest.raises(InputError, match="needs a tokenizer"):
        format_example(ex, template="chat")
    with pytest.raises(InputError, match=r"\{answer\}"):
        format_example(ex, template="{context} {question} {answer}")
    with pytest.raises(InputError, match="no \\{question\\} slot"):
        format_example(ex, template="{context}")
    with pytest.raises(InputError, match="ex-9.*context"):
        format_example(QAExample("ex-9", None, "q?", ("a",)), template="{context} {question}")


def test_encode_prompt_drops_trailing_eos():
    tok = make_tokenizer()
    text = build_prompt("The Eiffel Tower is in Paris.", "Where?")
    assert encode_prompt(tok, text)[0] == tok(text)["input_ids"]  # nothing appended: nothing dropped
    # the template changes after the tokenizer was first seen: the cached count is checked, not trusted
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.eos_token_id)]
    )
    assert tok(text)["input_ids"][-1] == tok.eos_token_id
    ids, offsets = encode_prompt(tok, text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and len(offsets) == len(ids)


# --- generation and scoring ----------------------------------------------------------------------------


def _prompts() -> list[str]:
    return [build_prompt(c, QUESTIONS[i % 2]) for i, c in enumerate(CONTEXTS)] + [build_prompt(None, "Q?")]


def test_batched_generation_equals_one_at_a_time(model, tokenizer):
    model.train()
    model.model.layers[0].eval()  # a mixed state must survive
    flags = [m.training for m in model.modules()]
    gen_config = model.generation_config.to_dict()
    prompts = _prompts()
    batched = generate_answers(model, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and len(set(batched)) > 3
    assert [m.training for m in model.modules()] == flags
    assert model.generation_config.to_dict() == gen_config
    assert tokenizer.padding_side == "right"  # never touched
    model.eval()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_batched_generation_other_architectures(model_type, tokenizer):
    m = make_model(model_type)
    prompts = _prompts()[:5]
    batched = generate_answers(m, tokenizer, prompts, batch_size=5, max_new_tokens=4)
    assert batched == [generate_answers(m, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]


def test_stop_strings_cut_generation(model, tokenizer):
    prompts = _prompts()[:3]
    full = generate_answers(model, tokenizer, prompts, max_new_tokens=6, stop=())
    for p, text in zip(prompts, full, strict=True):
        if len(text) < 3:
            continue
        stop = text[2]
        cut = generate_answers(model, tokenizer, [p], max_new_tokens=6, stop=[stop])[0]
        assert cut == text[: text.index(stop)].strip()


def _reference_logprob(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    head, tail = split_continuation(tokenizer, prompt, answer)
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    pos = torch.arange(len(head) - 1, len(head) + len(tail) - 1)
    return logp[pos, torch.tensor(tail)].sum().item(), len(tail)


def test_score_answers_exact(model, tokenizer):
    prompts = _prompts()
    answers = [" Paris", " French", " café naïve", " Paris, France", " 東京", " x", " Danielle D.", " y"]
    scores = score_answers(model, tokenizer, prompts, answers, batch_size=3)
    one = score_answers(model, tokenizer, prompts, answers, batch_size=1)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ref, n = _reference_logprob(model, tokenizer, p, a)
        assert scores.n_tokens[i] == n == len(scores.token_logprobs[i])
        assert scores.logprob[i].item() == pytest.approx(ref, abs=1e-4)
        assert one.logprob[i].item() == pytest.approx(ref, abs=1e-4)
    torch.testing.assert_close(scores.mean, scores.logprob / scores.n_tokens)


def test_score_and_generate_input_errors(model, tokenizer):
    with pytest.raises(InputError, match=r"answers\[1\]"):
        score_answers(model, tokenizer, ["a", "b"], [" x", ""])
    with pytest.raises(InputError, match="2 prompts but 1 answers"):
        score_answers(model, tokenizer, ["a", "b"], [" x"])
    with pytest.raises(InputError, match="single string"):
        generate_answers(model, tokenizer, "a prompt")
    with pytest.raises(InputError, match=r"prompts\[0\].*no tokens"):
        generate_answers(model, tokenizer, [""])


# --- evaluate ------------------------------------------------------------------------------------------


def test_evaluate_rows_and_summary(model, tokenizer):
    exs = _examples()
    res = evaluate(model, tokenizer, exs, max_new_tokens=4, progress=False)
    assert list(res["id"]) == [e.id for e in exs]
    assert list(res.columns) == list(ev.BASE_COLUMNS)
    assert list(res["has_context"]) == [e.context is not None for e in exs]
    absent = res.set_index("id")["answer_in_context"]
    assert not absent["ex3"] and not absent["ex6"] and absent["ex0"]  # closed-book, answer not in context
    assert res["po"].isna().tolist() == [e.memorised_answer is None for e in exs]
    s = res.summary()
    assert s["n"] == 7 and s["EM"] == res.EM == res["em"].mean() and s["n_memorised"] == 4
    sub = res[res.answer_in_context]
    assert isinstance(sub, ev.EvalFrame) and sub.summary()["n"] == int(res.answer_in_context.sum())


def test_evaluate_score_mode(model, tokenizer):
    exs = _examples(4)
    res = evaluate(model, tokenizer, exs, mode="score", batch_size=2, progress=False)
    for ex, (_, row) in zip(exs, res.iterrows(), strict=True):
        cands = [*ex.answers, *([ex.memorised_answer] if ex.memorised_answer else [])]
        assert row.prediction in cands
        fp = format_example(ex)
        lps = score_answers(model, tokenizer, [fp.text] * len(cands), [" " + c for c in cands]).logprob
        assert row.prediction == cands[int(lps.argmax())]
        assert row.logprob == pytest.approx(lps[: len(ex.answers)].max().item(), abs=1e-4)
    assert 0 <= res.MR <= 1 or math.isnan(res.MR)


def test_evaluate_resumes_after_torn_line(model, tokenizer, tmp_path, monkeypatch):
    exs = _examples()
    full = evaluate(model, tokenizer, exs, max_new_tokens=4, batch_size=3, progress=False)
    out = tmp_path / "res.jsonl"
    evaluate(model, tokenizer, exs[:3], out=out, max_new_tokens=4, batch_size=2, progress=False)
    with open(out, "a") as fh:
        fh.write('{"id": "ex3", "prediction": "Par')  # killed mid-write
    seen: list[str] = []
    real = ev.generate_answers

    def counting(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(ev, "generate_answers", counting)
    resumed = evaluate(model, tokenizer, exs, out=out, max_new_tokens=4, batch_size=3, progress=False)
    assert len(seen) == 4  # only the missing examples were generated
    pd.testing.assert_frame_equal(resumed, full)
    lines = out.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(e.id for e in exs)
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert summary["n"] == 7 and summary["EM"] == full.EM and summary["config"]["mode"] == "generate"
    again = evaluate(model, tokenizer, exs, out=out, max_new_tokens=4, progress=False)
    assert len(seen) == 4  # nothing left to do
    pd.testing.assert_frame_equal(again, full)


def test_evaluate_refuses_mismatched_or_corrupt_output(model, tokenizer, tmp_path):
    exs = _examples(2)
    out = tmp_path / "r.jsonl"
    evaluate(model, tokenizer, exs, out=out, max_new_tokens=2, progress=False)
    with pytest.raises(InputError, match="configuration"):
        evaluate(model, tokenizer, exs, out=out, max_new_tokens=3, progress=False)
    lines = out.read_text().splitlines()
    out.write_text("not json\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 1"):
        evaluate(model, tokenizer, exs, out=out, max_new_tokens=2, progress=False)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (QAExample("q-less", "ctx", "", ("a",)), r"examples\[1\] \(id 'q-less'\): question"),
        (QAExample("ex0", "ctx", "q?", ("a",)), "duplicate id"),
        ({"id": "x", "question": "q"}, r"record 1 has none of the answer fields"),  # dicts are read, checked
        (QAExample("", "ctx", "q?", ("a",)), "id must be a non-empty string"),
    ],
)
def test_evaluate_bad_examples(model, tokenizer, bad, message):
    with pytest.raises(InputError, match=message):
        evaluate(model, tokenizer, [_examples(1)[0], bad], progress=False)


def test_evaluate_bad_arguments(model, tokenizer):
    with pytest.raises(InputError, match="unknown mode"):
        evaluate(model, tokenizer, _examples(1), mode="sample", progress=False)
    with pytest.raises(InputError, match="no chat template"):
        evaluate(model, tokenizer, _examples(1), template="chat", progress=False)


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import make_model, make_tokenizer
import moe_interp.evaluation as ev
from test_evaluation import _examples
calls = []
real = ev.generate_answers
def dying(*a, **kw):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
ev.generate_answers = dying
ev.evaluate(make_model("olmoe"), make_tokenizer(), _examples(), out={out!r}, max_new_tokens=4,
            batch_size=2, progress=False)
"""


def test_evaluate_survives_sigkill(model, tokenizer, tmp_path):
    out = tmp_path / "killed.jsonl"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(out.read_text().splitlines()) == 4  # two batches of two written before the kill
    assert not (tmp_path / "killed.summary.json").exists()
    full = evaluate(model, tokenizer, _examples(), max_new_tokens=4, batch_size=2, progress=False)
    resumed = evaluate(model, tokenizer, _examples(), out=out, max_new_tokens=4, batch_size=2, progress=False)
    pd.testing.assert_frame_equal(resumed, full)


def test_resume_refuses_a_model_that_answers_differently(tmp_path):
    """Rows written by one model are never reused for another (here: the same model under expert masks)."""
    from moe_interp.demo import load_demo
    from moe_interp.routerlens import demo_examples, mask_experts

    model, tok = load_demo()
    examples = demo_examples("conflict_test", limit=4)
    out = tmp_path / "r.jsonl"
    first = evaluate(model, tok, examples, out=out, progress=False, max_new_tokens=4)
    again = evaluate(model, tok, examples, out=out, progress=False, max_new_tokens=4)
    assert again.EM == first.EM
    spec = {m: list(range(8)) for m in range(4)}
    with mask_experts(model, spec), pytest.raises(InputError, match="answers differently"):
        evaluate(model, tok, examples, out=out, progress=False, max_new_tokens=4)
    # a mask the probe text may never route through, and a tiny weight change, are refused too
    with mask_experts(model, {3: [0]}), pytest.raises(InputError, match="answers differently"):
        evaluate(model, tok, examples, out=out, progress=False, max_new_tokens=4)
    router = model.model.layers[2].mlp.gate.weight
    with torch.no_grad():
        router[0, 0] += 1e-3
    try:
        with pytest.raises(InputError, match="answers differently"):
            evaluate(model, tok, examples, out=out, progress=False, max_new_tokens=4)
    finally:
        with torch.no_grad():
            router[0, 0] -= 1e-3


def test_dict_records_are_accepted():
    from moe_interp.demo import load_demo, load_split

    model, tok = load_demo()
    records = load_split("conflict_test")[:3]
    from_dicts = evaluate(model, tok, records, progress=False, max_new_tokens=4)
    from moe_interp.routerlens import demo_examples

    from_examples = evaluate(
        model, tok, demo_examples("conflict_test", limit=3), progress=False, max_new_tokens=4
    )
    assert from_dicts.EM == from_examples.EM and from_dicts.Pc == from_examples.Pc
