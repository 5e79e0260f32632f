"""Answer character spans, char -> token span mapping, and the decoding fallback for offsets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_interp.data.spans import char_to_token_spans, find_answer_spans, offsets_from_decoding
from moe_interp.errors import InputError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- find_answer_spans ---------------------------------------------------------------------------------


def test_every_occurrence_sorted():
    ctx = "Paris is in France. Paris!"
    assert find_answer_spans(ctx, "Paris") == [(0, 5), (20, 25)]
    assert find_answer_spans(ctx, ["France", "Paris"]) == [(0, 5), (12, 18), (20, 25)]


def test_overlapping_and_nested_answers():
    assert find_answer_spans("aaa", "aa") == [(0, 2), (1, 3)]
    ctx = "Paris, France"
    assert find_answer_spans(ctx, ["Paris", "Paris, France", "Paris"]) == [(0, 5), (0, 13)]


def test_answers_at_start_and_end_and_whole_context():
    assert find_answer_spans("abc", "abc") == [(0, 3)]
    assert find_answer_spans("xy and xy", "xy") == [(0, 2), (7, 9)]


def test_regex_metacharacters_are_literal():
    assert find_answer_spans("C++ and C# (1.5)", ["C++", "(1.5)", "."]) == [(0, 3), (11, 16), (13, 14)]


def test_empty_and_missing_answers():
    assert find_answer_spans("abc", ["", "zzz"]) == []
    assert find_answer_spans("abc", []) == []


def test_case_modes():
    ctx = "paris and PARIS and Paris"
    assert find_answer_spans(ctx, "Paris") == [(20, 25)]  # exact match wins, no fallback
    assert find_answer_spans(ctx, "Paris", case="insensitive") == [(0, 5), (10, 15), (20, 25)]
    assert find_answer_spans("only paris here", "Paris") == [(5, 10)]  # fallback
    assert find_answer_spans("only paris here", "Paris", case="sensitive") == []
    with pytest.raises(InputError):
        find_answer_spans("x", "x", case="lower")  # type: ignore[arg-type]


def test_case_fallback_keeps_original_offsets_with_length_changing_lowercase():
    # "İ".lower() is two code points; offsets must still index the original string.
    ctx = "İstanbul and istanbul"
    assert find_answer_spans(ctx, "ISTANBUL") == [(0, 8), (13, 21)]


def test_whole_word():
    ctx = "1 in 1988, Parisian Paris U.S.A"
    assert find_answer_spans(ctx, "1", whole_word=True) == [(0, 1)]
    assert find_answer_spans(ctx, "Paris", whole_word=True) == [(20, 25)]
    assert find_answer_spans(ctx, "U.S.", whole_word=True) == [(26, 30)]  # '.' edge is unconstrained
    assert find_answer_spans(ctx, "1") == [(0, 1), (5, 6)]


def test_unicode_offsets_are_code_points():
    ctx = "北京是中国的首都。Café 😀 Röntgen"
    assert find_answer_spans(ctx, "中国") == [(3, 5)]
    assert find_answer_spans(ctx, "Röntgen") == [(ctx.index("R"), len(ctx))]
    assert find_answer_spans(ctx, "😀") == [(14, 15)]


_ALPHABET = st.sampled_from(list("ab A") + ["é", "北", "😀", "\n", "İ"])


@given(ctx=st.text(_ALPHABET, max_size=30), answers=st.lists(st.text(_ALPHABET, max_size=4), max_size=3))
@FAST
def test_spans_equal_brute_force(ctx, answers):
    expected = sorted(
        {(i, i + len(a)) for a in answers if a for i in range(len(ctx)) if ctx.startswith(a, i)}
    )
    assert find_answer_spans(ctx, answers, case="sensitive") == expected
    fallback = find_answer_spans(ctx, answers)
    if expected:
        assert fallback == expected
    for s, e in find_answer_spans(ctx, answers, case="insensitive"):
        assert any(ctx[s:e].lower() == a.lower() for a in answers)


# --- char_to_token_spans -------------------------------------------------------------------------------

#            <s>     The     Ġcap     ital     Ġof       ĠParis    .
WORD_OFFS = [(0, 0), (0, 3), (3, 7), (7, 11), (11, 14), (14, 20), (20, 21)]


def test_char_to_token_hand_computed():
    # "The capital of Paris." ; "Paris" = chars 15..20 lies inside token 5 (" Paris" = 14..20)
    assert char_to_token_spans(WORD_OFFS, [(15, 20)]) == [(5, 6)]
    assert char_to_token_spans(WORD_OFFS, [(4, 11)]) == [(2, 4)]  # "capital" = 2 tokens
    assert char_to_token_spans(WORD_OFFS, [(5, 6)]) == [(2, 3)]  # inside a token
    assert char_to_token_spans(WORD_OFFS, [(0, 3)]) == [(1, 2)]  # BOS (0, 0) never overlaps
    assert char_to_token_spans(WORD_OFFS, [(10, 12)]) == [(3, 5)]  # straddles a boundary
    assert char_to_token_spans(WORD_OFFS, [(7, 11), (11, 14)]) == [(3, 4), (4, 5)]  # touching, not overlap
    assert char_to_token_spans(WORD_OFFS, [(21, 30)]) == [None]  # past the end (e.g. truncated)


def test_char_to_token_gap_and_inputs():
    offs = [(0, 3), (4, 7)]  # trimmed offsets: the space (3, 4) belongs to no token
    assert char_to_token_spans(offs, [(3, 4)]) == [None]
    assert char_to_token_spans(torch.tensor(offs), [(2, 5)]) == [(0, 2)]
    assert char_to_token_spans(offs, []) == []
    with pytest.raises(InputError, match="invalid character span"):
        char_to_token_spans(offs, [(3, 3)])
    with pytest.raises(InputError, match="ONE sequence"):
        char_to_token_spans(torch.tensor([offs]), [(0, 1)])


# --- with a real (in-memory) BPE tokenizer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The capital of France is Paris. Paris is not Parisian.",
        "北京是中国的首都。Café crème, résumé, naïve.",
        "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics in 1901.",
    ] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_bpe_answer_tokens(bpe):
    text = "Röntgen won the Nobel Prize in 1901, in Paris."
    enc = bpe(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = find_answer_spans(text, ["Paris", "1901"])
    tok_spans = char_to_token_spans(enc["offset_mapping"], spans)
    decoded = [bpe.decode(enc["input_ids"][a:b]) for a, b in tok_spans]  # type: ignore[misc]
    assert [d.strip() for d in decoded] == ["1901", "Paris"]


_TEXT = st.text(
    st.sampled_from(list("Paris is nt, ") + ["é", "北", "京", "😀", "ö", "\n"]), min_size=1, max_size=40
)


@given(text=_TEXT, data=st.data())
@FAST
def test_decoding_fallback_matches_fast_offsets(bpe, text, data):
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    fast = [
        tuple(o) for o in bpe(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    ]
    slow = offsets_from_decoding(bpe, ids, text)
    assert slow == fast
    assert offsets_from_decoding(bpe, ids) == fast  # text=None: the decode of all ids
    # Special tokens around the text are zero-width.
    with_special = offsets_from_decoding(bpe, [bpe.bos_token_id, *ids, bpe.eos_token_id], text)
    assert with_special == [(0, 0), *fast, (len(text), len(text))]
    # Token spans cover the character span, and their edge tokens really overlap it.
    s = data.draw(st.integers(0, len(text) - 1))
    e = data.draw(st.integers(s + 1, len(text)))
    (span,) = char_to_token_spans(slow, [(s, e)])
    assert span is not None
    a, b = span
    assert slow[a][0] <= s and slow[b - 1][1] >= e
    assert slow[a][1] > s and slow[b - 1][0] < e
    assert text[s:e] in bpe.decode(ids[a:b])


def test_decoding_fallback_rejects_lossy_decoder():
    class Lower:
        def decode(self, ids, **kwargs):
            return "".join("ab"[i] for i in ids).upper()

    with pytest.raises(InputError, match="not a prefix"):
        offsets_from_decoding(Lower(), [0, 1], "ab")
    assert offsets_from_decoding(Lower(), [0, 1]) == [(0, 1), (1, 2)]


def test_decoding_fallback_byte_fallback_metaspace():
    """Llama-style tokenizer: '▁' word prefix, <0xNN> byte-fallback tokens, leading space stripped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(256)}}
    pieces = ["▁", "P", "a", "r", "i", "s", "▁P", "▁Pa", "▁Par", "▁Pari", "▁Paris", "▁i", "▁is"]
    vocab.update({p: len(vocab) + k for k, p in enumerate(pieces)})
    merges = [("▁", "P"), ("▁P", "a"), ("▁Pa", "r"), ("▁Par", "i"), ("▁Pari", "s"), ("▁", "i"), ("▁i", "s")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    text = "Paris 北京 is"
    enc = sp(text, return_offsets_mapping=True, add_special_tokens=False)
    assert len(enc["input_ids"]) == 9  # ▁Paris ▁ + 6 byte tokens + ▁is
    fast = [tuple(o) for o in enc["offset_mapping"]]
    assert offsets_from_decoding(sp, [0, *enc["input_ids"]], text) == [(0, 0), *fast]
    assert char_to_token_spans(fast, find_answer_spans(text, "京")) == [(5, 8)]
    with pytest.raises(InputError, match="not a prefix"):  # the decoder drops the leading space
        offsets_from_decoding(sp, sp(" Paris", add_special_tokens=False)["input_ids"], " Paris")
