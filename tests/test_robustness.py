"""Safe loading, clear errors, and property-based checks of spans and padding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_interp
from moe_interp.errors import DataError, InputError, MoEInterpError
from moe_interp.loading import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model")
    make_model("olmoe").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(folder, target)
    return target


def test_load_model_round_trip(folder, tokenizer):
    model, tok = load_model(folder)
    assert not model.training and len(tok) == len(tokenizer)
    t = moe_interp.trace(model, "The Eiffel Tower is in Paris", tokenizer=tok)
    assert t.model_type == "olmoe"


def test_truncated_weights_name_the_file(folder, tmp_path):
    target = _copy(folder, tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(DataError, match=r"model\.safetensors"):
        load_model(target)


def test_malformed_config_names_the_file(folder, tmp_path):
    target = _copy(folder, tmp_path)
    (target / "config.json").write_text("{ not json")
    with pytest.raises(DataError, match=r"config\.json is not valid JSON"):
        load_model(target)
    (target / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(DataError, match="no 'model_type'"):
        load_model(target)


def test_pickled_weights_are_refused(folder, tmp_path):
    target = _copy(folder, tmp_path)
    state = {
        k: v for k, v in __import__("safetensors.torch").torch.load_file(target / "model.safetensors").items()
    }
    torch.save(state, target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    with pytest.raises(DataError, match="pytorch_model.bin: pickled weights are never loaded"):
        load_model(target)


def test_remote_code_needs_opt_in(folder, tmp_path):
    target = _copy(folder, tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="trust_remote_code=True"):
        load_model(target)


def test_malformed_tokenizer_names_the_file(folder, tmp_path):
    target = _copy(folder, tmp_path)
    (target / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(DataError, match="tokenizer"):
        load_model(target)


def test_missing_folder():
    with pytest.raises(DataError, match="does not exist"):
        load_model("/nonexistent/model")


def test_tokenizer_that_does_not_match_the_model(tokenizer):
    import transformers

    config = transformers.OlmoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    small = transformers.OlmoeForCausalLM(config)
    with pytest.raises(InputError, match="embedding has 64 rows"):
        moe_interp.trace(small, "The Eiffel Tower is in Paris", tokenizer=tokenizer)


def test_out_of_memory_suggests_smaller_options(tokenizer, monkeypatch):
    model = make_model("mixtral")

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: boom())
    try:
        with pytest.raises(MoEInterpError, match="expert_outputs=False") as info:
            moe_interp.trace(model, ["a b c"] * 3, tokenizer=tokenizer, expert_outputs=True)
        assert "batch of 3" in str(info.value)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ properties
WORD = st.text(alphabet=st.sampled_from(list("abcXYZ éü東京-.,'") + [" "]), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.text(alphabet="ab é.", max_size=10),
    context_words=st.lists(WORD, min_size=1, max_size=6),
    answer_at=st.integers(0, 5),
    repeat=st.booleans(),
    after=st.text(alphabet="ab ?", max_size=10),
)
def test_spans_are_exact_for_any_text(tokenizer, before, context_words, answer_at, repeat, after):
    context = " ".join(context_words).strip() or "x"
    answer = context_words[min(answer_at, len(context_words) - 1)].strip() or context[0]
    if answer not in context:
        answer = context[0]
    if repeat:
        context = f"{context} {answer}"
    prompt = f"{before}{context}{after}"
    model = _MODEL
    t = moe_interp.trace(model, prompt, context=context, answer=answer, tokenizer=tokenizer)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    start = prompt.find(context)
    covered = {i for a, b in t.spans[0]["context"] for i in range(a, b)}
    expected = {i for i, (s, e) in enumerate(offsets) if e > s and s < start + len(context) and e > start}
    assert covered == expected
    occurrences = [start + i for i in range(len(context)) if context.startswith(answer, i)]

    def whole(char: int) -> bool:  # within the context, no word character glued to a word-like edge
        word = lambda ch: ch.isalnum() or ch == "_"  # noqa: E731
        i, j = char - start, char - start + len(answer)
        left = i == 0 or not word(context[i - 1]) or not word(answer[0])
        right = j >= len(context) or not word(context[j]) or not word(answer[-1])
        return left and right

    occurrences = [c for c in occurrences if whole(c)] or occurrences  # whole words first
    assert len(t.spans[0]["answer"]) == len(occurrences)
    for (a, b), char in zip(t.spans[0]["answer"], occurrences, strict=True):
        # the token span covers the answer's characters, and every token in it touches them
        assert offsets[a][0] <= char and offsets[b - 1][1] >= char + len(answer)
        assert all(offsets[i][0] < char + len(answer) and offsets[i][1] > char for i in range(a, b))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_padding_never_enters_statistics(tokenizer, lengths):
    prompts = [" ".join(["Paris"] * n) for n in lengths]
    t = moe_interp.trace(_MODEL, prompts, tokenizer=tokenizer, attention=False)
    n_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert t.router_logits.shape[1] == n_tokens == len(t.tokens)
    assert int(t.selection_counts().sum()) == n_tokens * t.top_k * len(t.layers)
    for i, p in enumerate(prompts):  # each prompt's routing equals its unbatched routing
        one = moe_interp.trace(_MODEL, p, tokenizer=tokenizer, attention=False)
        torch.testing.assert_close(t.router_logits[:, t.token_slice(i)], one.router_logits, atol=1e-5, rtol=0)


_MODEL = make_model("olmoe")


def test_answers_never_in_contexts_is_a_clear_warning(tokenizer):
    from moe_interp.analysis import span_attention
    from moe_interp.data import QAExample

    examples = [
        QAExample(
            id=f"x{i}",
            context="The sky is blue.",
            question="Where is it?",
            answers=("Paris",),
            memorised_answer=None,
            counterfactual_answer=None,
            source="test",
        )
        for i in range(3)
    ]
    with pytest.warns(UserWarning, match="none of the 3 examples .first id 'x0'"):
        result = span_attention(_MODEL, tokenizer, examples)
    assert result.n == 3  # CAG is still measured
